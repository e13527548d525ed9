"""The vision-language backends of `dreamshot prepare`: the grouping judge and the annotator (appendix A.1).

Both ask a chat-completions model through the evaluation judge's client (`dreamshot.eval.judge`): one user
message with the instruction and the images, temperature 0, raised by 0.1 at each retry. An answer that
does not parse is asked again; when every attempt fails the run stops with a DataError naming the video
(finished videos keep their state, so a rerun resumes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

import numpy as np
from PIL import Image

from dreamshot.config.schema import JudgeConfig
from dreamshot.data.toyworld import role_tag
from dreamshot.eval.judge import ChatBackend, JudgeRequestError, OpenAIChatBackend, image_content
from dreamshot.prepare.config import VlmConfig
from dreamshot.prepare.roles import Annotation
from dreamshot.utils.errors import ConfigError, DataError

T = TypeVar("T")

GROUP_PROMPT = (
    "These {count} images are keyframes of one video, in temporal order, numbered 1 to {count}. Group the "
    "keyframes that form one coherent narrative sequence within one scene (same place, same characters, "
    "continuous action). Answer with exactly {count} comma-separated integers, one per keyframe in order: "
    "equal numbers for keyframes of one group, 0 for a keyframe that fits no group. Example for 5 keyframes: "
    "1,1,2,2,0"
)
SHOT_PROMPT = (
    "Describe this storyboard shot in one sentence: camera perspective (close-up / medium / wide, angle), "
    "environment, what the characters do, visual style. {roles}Answer with the sentence only."
)
ROLE_PROMPT = (
    "Describe the character in this image in one sentence: gender, ethnicity, appearance, hairstyle, "
    "clothing (or, for a non-human character, its form, colours and texture). Answer with the sentence only."
)
STYLE_PROMPT = "Name the visual style of these images in at most five words (e.g. 'realistic film', '3D animation')."
_LABELS = re.compile(r"-?\d+")


class VlmClient:
    """Asks a chat model about images; `ask(images, prompt, parse)` returns the first answer that parses."""

    def __init__(self, backend: ChatBackend, image_size: int, max_retries: int) -> None:
        self.backend, self.image_size, self.max_retries = backend, image_size, max_retries

    def ask(self, images: list[np.ndarray], prompt: str, parse: Callable[[str], T | None], what: str) -> T:
        parts = [image_content(Image.fromarray(image), self.image_size) for image in images]
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt}, *parts]}]
        for attempt in range(self.max_retries):
            try:
                answer = parse(self.backend.complete(messages, 0.1 * attempt))
            except JudgeRequestError:
                continue
            if answer is not None:
                return answer
        raise DataError(f"{what}: the VLM ({self.backend.model}) gave no usable answer in {self.max_retries} attempts")


def build_client(cfg: VlmConfig, key: str) -> VlmClient:
    """The client of `cfg`; `key` names the setting that selected it, for the error when none is configured."""
    if not cfg.endpoint:
        raise ConfigError(f"{key}: 'vlm' needs a vision-language model, but vlm.endpoint is not set")
    judge_cfg = replace(
        JudgeConfig(), endpoint=cfg.endpoint, model=cfg.model, api_key_env=cfg.api_key_env, timeout_s=cfg.timeout_s
    )
    return VlmClient(OpenAIChatBackend(judge_cfg, os.environ.get(cfg.api_key_env)), cfg.image_size, cfg.max_retries)


def parse_labels(answer: str, count: int) -> list[int | None] | None:
    """`count` group labels from an answer like "1,1,2,0" (0 = no group), or None if it has another count."""
    numbers = [int(n) for n in _LABELS.findall(answer)]
    if len(numbers) != count or any(n < 0 for n in numbers):
        return None
    return [n if n > 0 else None for n in numbers]


def parse_sentence(answer: str) -> str | None:
    """The first non-empty line of an answer, without quotes; None when there is none."""
    lines = [line.strip().strip('"') for line in answer.splitlines() if line.strip()]
    return lines[0] if lines else None


class VlmJudge:
    """`GroupJudge` through a VLM: it labels a window of keyframes (GROUP_PROMPT)."""

    def __init__(self, client: VlmClient) -> None:
        self.client = client

    def group(self, images: list[np.ndarray]) -> list[int | None]:
        prompt = GROUP_PROMPT.format(count=len(images))
        return self.client.ask(images, prompt, lambda a: parse_labels(a, len(images)), "grouping window")


class VlmAnnotator:
    """`Annotator` through a VLM: one question per shot, per role and one for the style."""

    name = "vlm"
    placeholder = False

    def __init__(self, client: VlmClient) -> None:
        self.client = client

    def annotate(
        self, shots: list[np.ndarray], shot_roles: list[list[int]], references: list[np.ndarray]
    ) -> Annotation:
        texts = [
            self._shot(image, [references[k] for k in roles], roles)
            for image, roles in zip(shots, shot_roles, strict=True)
        ]
        prompts = [
            f"{role_tag(k)}: {self.client.ask([crop], ROLE_PROMPT, parse_sentence, 'role description')}"
            for k, crop in enumerate(references)
        ]
        style = self.client.ask(shots, STYLE_PROMPT, parse_sentence, "style")
        return Annotation(texts, prompts, style)

    def _shot(self, image: np.ndarray, crops: list[np.ndarray], roles: list[int]) -> str:
        """The shot comes first, then the reference crop of each role in it, so the tags can be placed."""
        tags = ", ".join(role_tag(k) for k in roles)
        hint = f"The images after the first show its characters, in order: {tags}; name them so. " if roles else ""
        return self.client.ask([image, *crops], SHOT_PROMPT.format(roles=hint), parse_sentence, "shot annotation")
