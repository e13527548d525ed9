"""What every benchmark loader returns: stories of characters (with reference images) and shots (with texts).

All paths are absolute. A shot's texts follow ViStoryBench's fields: `scene` ("Setting Description"),
`camera` ("Shot Perspective Design"), `action` ("Static Shot Description"); `prompt` is the text the
storyboard model is given for the shot. `image` and `masks` are ground truth where the benchmark has them
(previous frames for s2s; role masks crop characters in place of the detector).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

TAGS = ("realistic_human", "unrealistic_human", "non_human")
# Character tag whose identity is measured with face encoders; every other tag uses the general image encoder.
FACE_TAG = "realistic_human"


@dataclass(frozen=True)
class BenchCharacter:
    key: str
    name: str
    tag: str
    # The role prompt the storyboard model is given with the reference image.
    prompt: str
    images: tuple[Path, ...]
    # One mask per reference image (None where it has none).
    masks: tuple[Path | None, ...] = ()
    # The reference images CIDS crops, where the benchmark's metric code reads other files than `images`
    # (ViStoryBench's CIDS reads only `.jpg`); None: `images`.
    cids_images: tuple[Path, ...] | None = None

    @property
    def identity_images(self) -> tuple[Path, ...]:
        return self.images if self.cids_images is None else self.cids_images


@dataclass(frozen=True)
class BenchShot:
    # 1-based, the number in the output file name (`shot_01.png`).
    index: int
    prompt: str
    scene: str
    camera: str
    action: str
    # Keys of the characters appearing, in the benchmark's order.
    characters: tuple[str, ...]
    image: Path | None = None
    masks: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchStory:
    id: str
    characters: dict[str, BenchCharacter]
    shots: tuple[BenchShot, ...]
    # s2s: the first `previous` shots are given (their images are conditions); the rest are drawn.
    previous: int = 0

    def scored_shots(self, mode: str) -> tuple[BenchShot, ...]:
        """The shots a mode draws, and so the shots its metrics are computed on."""
        return self.shots[self.previous :] if mode == "s2s" else self.shots

    def has_masks(self) -> bool:
        """Every listed character has a mask in its shot and every reference image has one."""
        shots = all(key in shot.masks for shot in self.shots for key in shot.characters)
        references = all(mask is not None for c in self.characters.values() for mask in c.masks)
        return shots and references and all(len(c.masks) == len(c.images) for c in self.characters.values())


@dataclass(frozen=True)
class Benchmark:
    name: str
    stories: tuple[BenchStory, ...]

    def characters(self) -> list[BenchCharacter]:
        return [c for story in self.stories for c in story.characters.values()]
