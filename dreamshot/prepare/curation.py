"""Stage 1, data curation (appendix A.1): keep videos by resolution, bitrate and date, read from the container.

Unit: videos. A video the container library cannot open is dropped as unreadable rather than stopping the run.
"""

from __future__ import annotations

from dataclasses import asdict

from dreamshot.prepare.config import CurationConfig, PrepareConfig
from dreamshot.prepare.stage import StageResult, VideoJob, unreadable
from dreamshot.prepare.video import VideoInfo, probe
from dreamshot.utils.errors import DataError

UNIT = "videos"


def run(job: VideoJob, inputs: dict, cfg: PrepareConfig, backends) -> StageResult:
    try:
        info = probe(job.path)
    except DataError as e:
        return unreadable(e, "unreadable")
    reason = rejection(info, cfg.curation)
    data = asdict(info)
    if reason is not None:
        return StageResult(data, kept=0, dropped={reason: 1})
    return StageResult(data, kept=1)


def rejection(info: VideoInfo, cfg: CurationConfig) -> str | None:
    """Why a video is dropped (a category, so that counts add up over videos), or None to keep it."""
    if info.frames < 1 or info.fps <= 0:
        return "no frames"
    if min(info.width, info.height) < cfg.min_short_side:
        return f"below {cfg.min_short_side}p"
    if info.bitrate_kbps is not None and info.bitrate_kbps < cfg.min_bitrate_kbps:
        return f"below {cfg.min_bitrate_kbps:g} kbps"
    if cfg.min_year is not None and info.year is not None and info.year < cfg.min_year:
        return f"dated before {cfg.min_year}"
    return None
