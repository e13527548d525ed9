"""Pictures people look at: role masks on the token grid, attention maps."""
