"""How much `dreamshot prepare` may write, from the videos' container metadata (nothing decoded), so that a disk
too small for it is reported before the first video is decoded."""

from __future__ import annotations

import math

from dreamshot.prepare.config import PrepareConfig
from dreamshot.prepare.curation import rejection
from dreamshot.prepare.stage import VideoJob
from dreamshot.prepare.video import probe
from dreamshot.utils.errors import DataError

# State files and manifest lines of one video.
RECORDS_PER_VIDEO = 2**16


def prepare_bytes(jobs: list[VideoJob], cfg: PrepareConfig) -> int:
    """At most what `prepare` writes for `jobs`, uncompressed (PNG is smaller): for each video curation keeps,
    one full-size keyframe per shot it can hold (a kept shot lasts `shots.min_shot_seconds` and one frame at
    least) with a mask per role (`roles.max_roles`), and per group (`grouping.min_shots` keyframes at least) a
    reference image and mask per role, the size of a frame at most."""
    total = 0
    for job in jobs:
        try:
            info = probe(job.path)
        except DataError:
            continue  # dropped as unreadable by curation
        if rejection(info, cfg.curation) is not None:
            continue
        shots = max(1, math.floor(info.frames / max(1.0, cfg.shots.min_shot_seconds * info.fps)))
        groups = math.ceil(shots / cfg.grouping.min_shots)
        roles, frame = cfg.roles.max_roles, info.width * info.height
        total += shots * frame * (3 + roles) + groups * roles * frame * 4 + RECORDS_PER_VIDEO
    return total
