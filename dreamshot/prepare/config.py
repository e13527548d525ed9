"""Settings of `dreamshot prepare` (the appendix A pipeline), one section per stage.

A standalone config rather than a field of the run `Config`: building a dataset from videos happens once,
before and apart from any training run, and its settings (detector, thresholds, backends) are not an
experiment's. `load_prepare_config` reads an optional yaml file over the defaults below, with the same
checks as the run config (unknown keys and wrong types are errors naming the key and the file). Defaults
are the paper's values where it gives them (appendix A.1: 720p, 800 kbps, 2015).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dreamshot.config.load import describe_error, merge_checked, read_yaml
from dreamshot.config.values import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UNIT, Rule, check_values
from dreamshot.data.sources import SOURCES
from dreamshot.utils.errors import ConfigError
from dreamshot.utils.secrets import check_endpoint, check_key_variable

DETECTORS = ("content", "adaptive", "threshold", "histogram", "hash")
AESTHETIC_BACKENDS = ("none", "aesthetic_v25")
OVERLAY_BACKENDS = ("none", "corner_logo")
SHOT_BACKENDS = ("auto", "opencv", "pyav")
JUDGES = ("features", "vlm")
SEGMENTERS = ("border_colour",)
ANNOTATORS = ("placeholder", "vlm")
# Not on / off: YAML reads those as booleans.
DEINTERLACE = ("auto", "always", "never")

# Bounded values of a prepare config (every number must also be finite: `check_values`).
PREPARE_RULES: dict[str, Rule] = {
    "curation.min_bitrate_kbps": NON_NEGATIVE,
    # PySceneDetect's thresholds are all levels of a non-negative difference, intensity or score.
    "shots.threshold": NON_NEGATIVE,
    "shots.min_scene_len": NON_NEGATIVE,
    "shots.min_shot_seconds": NON_NEGATIVE,
    "keyframes.motion_tolerance": NON_NEGATIVE,
    "keyframes.min_relative_sharpness": UNIT,
    "quality.min_sharpness": NON_NEGATIVE,
    "quality.min_contrast": NON_NEGATIVE,
    # A judge that sees one keyframe at a time never puts two together: every group would be dropped.
    "grouping.window": Rule(">= 2", lambda v: v >= 2),
    "grouping.similarity": UNIT,
    "roles.min_role_area": UNIT,
    "roles.role_similarity": UNIT,
    "roles.max_roles": AT_LEAST_ONE,
    "vlm.image_size": AT_LEAST_ONE,
    "vlm.max_retries": AT_LEAST_ONE,
    "vlm.timeout_s": POSITIVE,
}


@dataclass
class CurationConfig:
    """Stage 1: filters on the container metadata (PyAV); nothing is decoded."""

    # Videos whose shorter side is below this many pixels are dropped (paper: below 720p).
    min_short_side: int = 720
    # Videos below this overall bitrate are dropped (paper: 800 kbps).
    min_bitrate_kbps: float = 800.0
    # Videos dated before this year are dropped (paper: 2015); videos without a date in their metadata pass.
    min_year: int | None = 2015


@dataclass
class ShotsConfig:
    """Stage 2: shot boundaries with PySceneDetect."""

    # content | adaptive | threshold | histogram | hash (PySceneDetect's detectors).
    detector: str = "content"
    # The detector's threshold (adaptive: its adaptive_threshold). None: PySceneDetect's default.
    threshold: float | None = None
    # Cuts closer together than this many seconds are merged by the detector (its flash filter).
    min_scene_len: float = 0.5
    # Shots shorter than this many seconds (flashes, transitions) are dropped.
    min_shot_seconds: float = 1.0
    # PySceneDetect's decoder: auto (pyav for a video whose first frame is flagged interlaced or whose first video
    # stream is not the one played, cover art, else opencv, which sees no cut in interlaced video here and reads
    # only the first video stream, but is faster) | opencv | pyav.
    backend: str = "auto"


@dataclass
class KeyframeConfig:
    """Stage 3: one keyframe per shot, by the combined ranking of sharpness and motion."""

    # Frames are scored on their luma downscaled to this width; optical flow runs at half of it.
    analysis_width: int = 320
    # Weights of the sharpness rank (sharpest first) and the motion rank (stillest first) in the combined rank.
    sharpness_weight: float = 0.7
    motion_weight: float = 0.3
    # Motion (a share of the frame width per frame) is ranked in steps of this size, so that encoder noise in a
    # steady pan does not outvote sharpness: motions in one step [k, k+1) * tolerance tie. 0: ranked as measured.
    motion_tolerance: float = 0.002
    # Frames less sharp than this share of their shot's sharpest frame are never keyframes (blur, fades).
    min_relative_sharpness: float = 0.5
    # Interlaced frames (DVD, TV, camcorders) are scored and stored deinterlaced (FFmpeg's bwdif), since their
    # combing scores as sharpness: auto (the frames the decoder flags interlaced) | always (every frame, for
    # footage flagged progressive wrongly) | never.
    deinterlace: str = "auto"


@dataclass
class QualityConfig:
    """Stage 4: filters on each keyframe."""

    # Variance of the Laplacian at the analysis width; keyframes below are blurry and dropped.
    min_sharpness: float = 30.0
    # Standard deviation of the grey levels (0-255); keyframes below are contentless (black, flat) and dropped.
    min_contrast: float = 8.0
    # none | aesthetic_v25 (Aesthetic Predictor v2.5 through dreamshot.eval; needs the two weight paths below).
    aesthetic: str = "none"
    aesthetic_siglip: str | None = None
    aesthetic_head: str | None = None
    # Keyframes scoring below this (1-10 scale) are dropped.
    min_aesthetic: float = 4.5
    # Watermark / subtitle detector: none | corner_logo (a static mark in a corner across the video's keyframes).
    overlay: str = "none"


@dataclass
class GroupingConfig:
    """Stage 5: keyframes into storyboard groups with a sliding window (paper Fig. 10)."""

    # features (offline: image-feature similarity) | vlm (a vision-language judge; needs `vlm`).
    judge: str = "features"
    # Keyframes the judge sees at once, and how many consecutive windows share.
    window: int = 8
    overlap: int = 3
    # features judge: a keyframe joins a group when its colour-layout similarity to one of its members is >= this.
    similarity: float = 0.3
    # Groups with fewer keyframes are dropped; longer ones are split into consecutive parts (paper: 2-30 shots).
    min_shots: int = 2
    max_shots: int = 30


@dataclass
class RolesConfig:
    """Stage 6: role masks and references, shot annotations and role prompts."""

    # border_colour (offline: regions that differ from the frame border's colours per row).
    segmenter: str = "border_colour"
    # placeholder (offline template text) | vlm (needs `vlm`).
    annotator: str = "placeholder"
    # Regions smaller than this share of the frame are not roles.
    min_role_area: float = 0.01
    # Regions of different shots are one role when their colour similarity is >= this.
    role_similarity: float = 0.8
    # At most this many roles per group (the most frequent ones).
    max_roles: int = 4
    # The manifest `source` of the groups: real (films, web video) or synthetic (generated video).
    source: str = "real"


@dataclass
class VlmConfig:
    """The vision-language model behind `grouping.judge: vlm` and `roles.annotator: vlm`: any
    OpenAI-compatible chat-completions endpoint, through the evaluation judge's client (dreamshot.eval.judge)."""

    # Base URL ending before /chat/completions (no user, password or key in it). None: the vlm backends cannot be
    # selected.
    endpoint: str | None = None
    model: str = "gpt-4.1"
    # Environment variable holding the API key (the key itself never goes into a config or a log: a value that
    # looks like a key is refused).
    api_key_env: str = "OPENAI_API_KEY"
    # Side of the square JPEG each image is sent as.
    image_size: int = 512
    # Attempts per question (a failed request or an answer that does not parse is asked again).
    max_retries: int = 3
    timeout_s: float = 120.0


@dataclass
class PrepareConfig:
    """The appendix A pipeline: videos in, storyboard groups (a training manifest) out."""

    curation: CurationConfig = field(default_factory=CurationConfig)
    shots: ShotsConfig = field(default_factory=ShotsConfig)
    keyframes: KeyframeConfig = field(default_factory=KeyframeConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    grouping: GroupingConfig = field(default_factory=GroupingConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    vlm: VlmConfig = field(default_factory=VlmConfig)

    def section(self, name: str) -> dict[str, Any]:
        """A section as plain data (the digest of a stage's settings)."""
        return asdict(getattr(self, name))

    def validate(self) -> None:
        """Value ranges (`PREPARE_RULES`), the VLM's credentials and cross-field rules; raises ConfigError naming
        the key."""
        check_values(self, PREPARE_RULES)
        check_endpoint(self.vlm.endpoint, "vlm.endpoint", "vlm.api_key_env")
        check_key_variable(self.vlm.api_key_env, "vlm.api_key_env")
        _choice(self.shots.detector, DETECTORS, "shots.detector")
        _choice(self.shots.backend, SHOT_BACKENDS, "shots.backend")
        _choice(self.keyframes.deinterlace, DEINTERLACE, "keyframes.deinterlace")
        _choice(self.quality.aesthetic, AESTHETIC_BACKENDS, "quality.aesthetic")
        _choice(self.quality.overlay, OVERLAY_BACKENDS, "quality.overlay")
        _choice(self.grouping.judge, JUDGES, "grouping.judge")
        _choice(self.roles.segmenter, SEGMENTERS, "roles.segmenter")
        _choice(self.roles.annotator, ANNOTATORS, "roles.annotator")
        _choice(self.roles.source, SOURCES, "roles.source")
        if self.keyframes.analysis_width < 32:
            raise ConfigError(f"keyframes.analysis_width must be >= 32, got {self.keyframes.analysis_width}")
        weights = (self.keyframes.sharpness_weight, self.keyframes.motion_weight)
        if min(weights) < 0 or max(weights) == 0:
            # Both 0 ranks nothing (every frame ties): refused rather than read silently as sharpness alone.
            raise ConfigError(
                "keyframes.sharpness_weight and keyframes.motion_weight must be >= 0, with at least one > 0; "
                f"got {weights[0]}, {weights[1]}"
            )
        grouping = self.grouping
        if not 0 <= grouping.overlap < grouping.window:
            raise ConfigError(
                f"grouping.overlap must be in 0..window-1, got {grouping.overlap} (window {grouping.window})"
            )
        if not 1 <= grouping.min_shots <= grouping.max_shots:
            raise ConfigError(
                f"need 1 <= grouping.min_shots <= grouping.max_shots, got {grouping.min_shots}, {grouping.max_shots}"
            )


def load_prepare_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PrepareConfig:
    """The defaults, then the yaml file at `path` (if any), then `key.sub=value` overrides; validated."""
    cfg = OmegaConf.structured(PrepareConfig)
    if path is not None:
        if not Path(path).exists():
            raise ConfigError(f"{path}: prepare config file not found")
        cfg = merge_checked(cfg, read_yaml(Path(path)), path)
    try:
        cfg = merge_checked(cfg, OmegaConf.from_dotlist(list(overrides or [])), "command line")
        config: PrepareConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"prepare config: {describe_error(e)}") from None
    config.validate()
    return config


def _choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
