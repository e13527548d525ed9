"""Where a storyboard group comes from: a manifest record's `source` (dreamshot/data/manifest.py), the
`data.sources` a run trains on and the `roles.source` that `dreamshot prepare` writes.

A module of its own, free of torch, numpy and PIL: the config checks `data.sources` when it loads
(`Config.validate`), so a misspelt source fails in a second, not once the model is built.
"""

SOURCES = ("real", "synthetic")


def toy_world_sources(real_share: float) -> tuple[str, ...]:
    """The sources a toy world's groups can have: toyworld.py labels a group `real` when a uniform draw in [0, 1)
    is below `real_share`, which never happens at 0 and always does at 1."""
    if real_share <= 0:
        return ("synthetic",)
    return ("real",) if real_share >= 1 else SOURCES
