"""Where a storyboard group comes from: a manifest record's `source` (dreamshot/data/manifest.py), the
`data.sources` a run trains on and the `roles.source` that `dreamshot prepare` writes.

A module of its own, free of torch, numpy and PIL: the config checks `data.sources` when it loads
(`Config.validate`), so a misspelt source fails in a second, not once the model is built.
"""

SOURCES = ("real", "synthetic")
