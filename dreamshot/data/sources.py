"""Where a storyboard group comes from: a manifest record's `source` (dreamshot/data/manifest.py), the
`data.sources` a run trains on and the `roles.source` that `dreamshot prepare` writes.

A module of its own, free of torch and PIL (numpy only to draw a toy world's labels): the config checks
`data.sources` when it loads (`Config.validate`), so a misspelt source, or one the toy world draws for no training
group, fails in a second, not once the model is built.
"""

SOURCES = ("real", "synthetic")


# The index of a toy group's generator stream for its label and sensor noise (toyworld.py).
CAMERA_STREAM = 1


def toy_camera(seed: int, index: int):
    """The generator that labels toy group `index` of a world seeded `seed` (its first draw: `toy_source`) and
    then draws its sensor noise. numpy is imported here, on first use only."""
    import numpy as np

    return np.random.default_rng([seed, index, CAMERA_STREAM])


def toy_source(camera, real_share: float) -> str:
    """A toy group's source: `real` when the first uniform draw in [0, 1) of its `camera` is below `real_share`."""
    return "real" if camera.random() < real_share else "synthetic"


def toy_world_sources(real_share: float, seed: int, groups: int) -> tuple[str, ...]:
    """The sources of the first `groups` groups of a toy world seeded `seed`: one draw per group, read only while
    a source is missing, none at a share of 0 or 1 (which label every group alike)."""
    if real_share <= 0:
        return ("synthetic",)
    if real_share >= 1:
        return ("real",)
    drawn: set[str] = set()
    for index in range(groups):
        drawn.add(toy_source(toy_camera(seed, index), real_share))
        if len(drawn) == len(SOURCES):
            break
    return tuple(source for source in SOURCES if source in drawn)
