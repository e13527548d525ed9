"""The vision-language judge of the Alignment score (EVAL.md "Alignment").

Four dimensions, each scored 0-4: `scene` (the shot's setting), `camera` (its shot perspective) and
`character_action` (its static description) on the full shot, `single_character_action` on one character's
crop. The judge sees one user message: the dimension's rubric, the shot text, for a single character "Evaluated
Character Name is <name>", and the image resized to 512 x 512 JPEG. Published settings: temperature 0, seed 123,
max_tokens 512; the score is the first match of `(score|Score):\\s*[a-zA-Z]*\\s*(\\d+)`; up to 10 attempts, each
failure raising the temperature by 0.1, else 0.

The rubrics here are this project's own wording; `eval.judge.prompt_dir` replaces any of them with a file
`<dimension>.txt` (e.g. the published prompt files), and the prompt text is part of the cache key.

Backends: `OpenAIChatBackend` talks to any OpenAI-compatible `/chat/completions` endpoint (the key comes from
an environment variable and is never logged); a local VLM plugs in by implementing `ChatBackend.complete`.
Answers are cached on disk by (image hash, text, dimension, prompt, model), so a rerun costs nothing; failed
questions are not cached, so a rerun asks them again.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from dreamshot.config.schema import JudgeConfig
from dreamshot.eval.metrics import ALIGNMENT_DIMENSIONS
from dreamshot.utils.errors import ConfigError

SCORE_PATTERN = re.compile(r"(score|Score):\s*[a-zA-Z]*\s*(\d+)")
TEMPERATURE_STEP = 0.1

_ANSWER_FORMAT = (
    "Reply with one short sentence of reasoning, then a final line exactly of the form 'Score: N' where N is "
    "an integer from 0 to 4."
)
_SCALE = (
    "Scale: 4 = fully consistent, every stated detail is visible; 3 = consistent with minor deviations; "
    "2 = partly consistent, some stated details missing or wrong; 1 = mostly inconsistent; 0 = unrelated."
)
PROMPTS = {
    "scene": "You judge a storyboard shot. Does the image show the setting described in the text (place, "
    f"time of day, weather, props, atmosphere)? Ignore the characters and the camera. {_SCALE} {_ANSWER_FORMAT}",
    "camera": "You judge a storyboard shot. Does the image use the camera design described in the text (shot "
    "size such as close-up / medium / wide, angle, viewpoint, composition)? Ignore what the characters do. "
    f"{_SCALE} {_ANSWER_FORMAT}",
    "character_action": "You judge a storyboard shot. Does the image show the characters, their count, poses, "
    f"actions, expressions and interactions as described in the text? Ignore the background. {_SCALE} "
    f"{_ANSWER_FORMAT}",
    "single_character_action": "You judge one character cropped from a storyboard shot. Does this character's "
    "appearance, pose, action and expression match what the text says about the named character? Ignore the "
    f"other characters. {_SCALE} {_ANSWER_FORMAT}",
}


class JudgeRequestError(Exception):
    """A failed request (network error, HTTP error status, malformed response): the judge retries."""


class ChatBackend(Protocol):
    """Answers one chat-completions request. `model` names the judge (it is part of the cache key)."""

    model: str

    def complete(self, messages: list[dict[str, Any]], temperature: float) -> str:
        """The assistant's reply text; raises JudgeRequestError on failure."""
        ...


class OpenAIChatBackend:
    """POST `<endpoint>/chat/completions` with the published sampling settings (urllib, no client library)."""

    def __init__(self, cfg: JudgeConfig, api_key: str | None) -> None:
        if not cfg.endpoint:
            raise ConfigError("eval.judge.endpoint is not set")
        self.url = cfg.endpoint.rstrip("/").removesuffix("/chat/completions") + "/chat/completions"
        self.model = cfg.model
        self.seed, self.max_tokens, self.timeout = cfg.seed, cfg.max_tokens, cfg.timeout_s
        self._api_key = api_key

    def __repr__(self) -> str:
        # The key is deliberately absent.
        return f"OpenAIChatBackend(url={self.url!r}, model={self.model!r})"

    def complete(self, messages: list[dict[str, Any]], temperature: float) -> str:
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": round(temperature, 6),
            "seed": self.seed,
            "max_tokens": self.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise JudgeRequestError(f"HTTP {e.code} from {self.url}") from None
        except (urllib.error.URLError, TimeoutError, OSError, json.JSONDecodeError) as e:
            raise JudgeRequestError(f"{type(e).__name__} from {self.url}") from None
        try:
            return str(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise JudgeRequestError(f"no choices[0].message.content in the reply of {self.url}") from None


class AnswerCache:
    """Judge answers on disk, one JSON object per line ({"key", "score", "reply"}); later lines win."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.answers: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                # A line cut short by a crash is skipped: its question is simply asked again.
                try:
                    entry = json.loads(line)
                    self.answers[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def get(self, key: str) -> int | None:
        entry = self.answers.get(key)
        return None if entry is None else int(entry["score"])

    def put(self, key: str, score: int, reply: str) -> None:
        entry = {"key": key, "score": score, "reply": reply}
        self.answers[key] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def parse_score(reply: str) -> int | None:
    """The first `Score: N` of a reply (a word may stand between, as in "Score: Level 3"), else None."""
    match = SCORE_PATTERN.search(reply)
    return int(match.group(2)) if match else None


def image_hash(image: Image.Image) -> str:
    """SHA-256 of an image's RGB pixels and size (independent of the file format it came from)."""
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def image_content(image: Image.Image, side: int, detail: str | None = None) -> dict[str, Any]:
    """An `image_url` message part: the image resized to side x side, as a base64 JPEG data URL."""
    buffer = io.BytesIO()
    image.convert("RGB").resize((side, side)).save(buffer, format="JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    part: dict[str, Any] = {"type": "image_url", "image_url": {"url": url}}
    if detail:
        part["image_url"]["detail"] = detail
    return part


@dataclass
class JudgeStats:
    asked: int = 0
    cached: int = 0
    failed: int = 0


class Judge:
    """Scores (image, text) pairs on the four alignment dimensions through a ChatBackend, with the cache."""

    def __init__(
        self,
        backend: ChatBackend,
        cache: AnswerCache,
        prompts: dict[str, str] | None = None,
        temperature: float = 0.0,
        max_retries: int = 10,
        retry_wait_s: float = 0.0,
        image_size: int = 512,
    ) -> None:
        self.backend, self.cache = backend, cache
        self.prompts = {**PROMPTS, **(prompts or {})}
        self.temperature, self.max_retries, self.retry_wait_s = temperature, max_retries, retry_wait_s
        self.image_size = image_size
        self.stats = JudgeStats()

    def score(self, image: Image.Image, text: str, dimension: str, character: str | None = None) -> int:
        """0-4 score of `image` against `text` on `dimension` (0 when every attempt fails)."""
        if dimension not in ALIGNMENT_DIMENSIONS:
            raise ValueError(f"unknown alignment dimension {dimension!r}")
        key = self.cache_key(image, text, dimension, character)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats.cached += 1
            return cached
        self.stats.asked += 1
        messages = self.messages(image, text, dimension, character)
        for attempt in range(self.max_retries):
            try:
                reply = self.backend.complete(messages, self.temperature + attempt * TEMPERATURE_STEP)
            except JudgeRequestError:
                time.sleep(self.retry_wait_s)
                continue
            score = parse_score(reply)
            if score is not None:
                self.cache.put(key, score, reply)
                return score
        self.stats.failed += 1
        return 0

    def messages(self, image: Image.Image, text: str, dimension: str, character: str | None) -> list[dict]:
        content: list[dict[str, Any]] = [
            {"type": "text", "text": self.prompts[dimension]},
            {"type": "text", "text": text},
        ]
        if character is not None:
            content.append({"type": "text", "text": f"Evaluated Character Name is {character}"})
        # Character crops are small: "low" detail, as the published code sends them.
        content.append(image_content(image, self.image_size, "low" if character is not None else None))
        return [{"role": "user", "content": content}]

    def cache_key(self, image: Image.Image, text: str, dimension: str, character: str | None) -> str:
        prompt = hashlib.sha256(self.prompts[dimension].encode()).hexdigest()[:16]
        parts = [image_hash(image), text, dimension, character or "", prompt, self.backend.model]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def read_prompts(folder: str | Path | None) -> dict[str, str]:
    """`<dimension>.txt` files of `folder` (those present), replacing the built-in rubrics."""
    if folder is None:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"eval.judge.prompt_dir: {folder} is not a folder")
    return {d: (folder / f"{d}.txt").read_text(encoding="utf-8") for d in PROMPTS if (folder / f"{d}.txt").is_file()}


def build_judge(cfg: JudgeConfig, cache_path: Path) -> Judge:
    """The judge of `cfg` with its OpenAI-compatible backend; the key is read from `cfg.api_key_env`."""
    backend = OpenAIChatBackend(cfg, os.environ.get(cfg.api_key_env))
    return Judge(
        backend,
        AnswerCache(cfg.cache or cache_path),
        read_prompts(cfg.prompt_dir),
        cfg.temperature,
        cfg.max_retries,
        cfg.retry_wait_s,
        cfg.image_size,
    )
