"""Finding each story character in its generated shots (the front end of CIDS and of single-character
alignment): crop, embed with the character's encoder, assign crops to characters.

A character tagged `realistic_human` is embedded with the face encoder, every other one with the general image
encoder (CLIP); crops are scored against each listed character with that character's encoder, so characters
of different kinds in one shot compete on their own scales. When no reference crop of a character yields a
feature (no face found), its whole reference images are embedded instead, as ViStoryBench does; a character
whose references still give no feature is `unusable`, and ViStoryBench then scores no CIDS for the story.

A shot is `evaluated` when at least one of its listed characters can be scored against one of its crops (it
lists characters, the detector found something, and the character's encoder found a feature in a crop): only
those shots get a single-character action score.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from PIL import Image

from dreamshot.eval.benchmarks.types import FACE_TAG, BenchCharacter, BenchShot, BenchStory
from dreamshot.eval.crops import DetectorCrops, MaskCrops
from dreamshot.eval.extractors import Encoder
from dreamshot.eval.metrics import assign, best_reference_scores, found
from dreamshot.eval.reading import open_as_published

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Match:
    """A character found in a shot: the crop and its feature (D,) from the character's encoder."""

    shot: int
    crop: Image.Image
    feature: torch.Tensor


@dataclass
class StoryMatches:
    """Per character key: reference features (R, D) and the matches in the shots, in shot order."""

    references: dict[str, torch.Tensor] = field(default_factory=dict)
    matches: dict[str, list[Match]] = field(default_factory=dict)
    # Shot indices where some listed character could be scored against some crop.
    evaluated: set[int] = field(default_factory=set)

    @property
    def unusable(self) -> list[str]:
        """Keys of the characters whose references give no feature."""
        return [key for key, features in self.references.items() if not found(features).any()]

    def in_shot(self, index: int) -> dict[str, Match]:
        return {key: m for key, matches in self.matches.items() for m in matches if m.shot == index}


class CharacterMatcher:
    """`match(story, shots)` -> StoryMatches. `encoders` maps "general" (and "face" when the benchmark has
    realistic humans) to an Encoder."""

    def __init__(self, crops: DetectorCrops | MaskCrops, encoders: Mapping[str, Encoder]) -> None:
        self.crops = crops
        self.encoders = dict(encoders)

    def encoder_kind(self, character: BenchCharacter) -> str:
        return "face" if character.tag == FACE_TAG and "face" in self.encoders else "general"

    def match(self, story: BenchStory, shots: Mapping[int, Image.Image]) -> StoryMatches:
        result = StoryMatches()
        for key, character in story.characters.items():
            result.references[key] = self.reference_features(character)
            result.matches[key] = []
        if result.unusable:
            reasons = "; ".join(self.why_unusable(story.characters[key]) for key in result.unusable)
            log.warning("story %s: no CIDS or single-character action (as ViStoryBench): %s", story.id, reasons)
            return result
        for shot in story.shots:
            if shot.index in shots:
                matched = self.match_shot(story, shot, shots[shot.index], result.references)
                if matched is not None:
                    result.evaluated.add(shot.index)
                    for key, match in matched.items():
                        result.matches[key].append(match)
        return result

    def why_unusable(self, character: BenchCharacter) -> str:
        """Why `character`'s references give no feature, for the warning."""
        if not character.identity_images:
            if character.images:  # only ViStoryBench's CIDS reads fewer files than the references (`.jpg`)
                return (
                    f"{character.key!r} has no .jpg reference image, the only kind ViStoryBench's CIDS reads "
                    f"({len(character.images)} of other kinds)"
                )
            return f"{character.key!r} has no reference image"
        no_face = " (no face found in them)" if self.encoder_kind(character) == "face" else ""
        return f"no feature in any reference of {character.key!r}{no_face}"

    def reference_features(self, character: BenchCharacter) -> torch.Tensor:
        """(R, D) features of the character's reference crops ((0, 0) without reference images)."""
        if not character.identity_images:
            return torch.zeros(0, 0)
        encoder = self.encoders[self.encoder_kind(character)]
        features = encoder(self.crops.reference_crops(character))
        if not found(features).any():
            whole = [open_as_published(path, f"character {character.key!r}") for path in character.identity_images]
            features = encoder(whole)
        return features

    def match_shot(
        self, story: BenchStory, shot: BenchShot, image: Image.Image, references: dict[str, torch.Tensor]
    ) -> dict[str, Match] | None:
        """The characters of `shot` found in its generated `image`; None when the shot is not evaluated."""
        candidates = self.crops.shot_crops(image, shot)
        if not candidates:
            return None
        listed = list(shot.characters)
        kinds = {self.encoder_kind(story.characters[key]) for key in listed}
        crops = [crop for _, crop in candidates]
        features = {kind: self.encoders[kind](crops) for kind in kinds}
        if self.crops.fixed:
            pairs = {listed.index(owner): p for p, (owner, _) in enumerate(candidates)}
        else:
            scores = torch.stack(
                [best_reference_scores(features[self.encoder_kind(story.characters[k])], references[k]) for k in listed]
            )
            pairs = assign(scores)
        matched = {}
        for c, p in pairs.items():
            feature = features[self.encoder_kind(story.characters[listed[c]])][p]
            if found(feature[None]).item():
                matched[listed[c]] = Match(shot.index, crops[p], feature)
        # Nothing matched means no listed character could be scored against any crop (see the module docstring).
        return matched or None
