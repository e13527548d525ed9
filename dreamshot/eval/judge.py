"""The vision-language judge of the Alignment score (EVAL.md "Alignment").

Four dimensions, each scored 0-4: `scene` (the shot's setting), `camera` (its shot perspective) and
`character_action` (its static description) on the full shot, `single_character_action` on one character's
crop. As ViStoryBench asks them: for the three shot dimensions one user message holds the dimension's rubric,
the shot text and the image; for a single character the rubric is a system message, and the user message
holds the shot text, "Evaluated Character Name is <name>" and the crop ("low" detail). Images are resized to
512 x 512 JPEG. Published settings: temperature 0, seed 123, max_tokens 512; the score is the first match of
`(score|Score):\\s*[a-zA-Z]*\\s*(\\d+)` (the first of any number of matches, as upstream's `re.findall(...)[0]`);
up to 10 attempts, each failure raising the temperature by 0.1, and 0 when every answer that arrived failed to
parse. No `top_p` is sent: ViStoryBench's callers pass top_p=0.2 to its `gptv_query`, which leaves it out of
the request body (checked at the commit tests/data/vistorybench/expected.json records).

The rubrics here are this project's own wording; `eval.judge.prompt_dir` replaces any of them with a file
`<dimension>.txt` (e.g. the published prompt files), and the prompt text is part of the cache key.

Backends: `OpenAIChatBackend` talks to any OpenAI-compatible `/chat/completions` endpoint (the key comes from
an environment variable and is never logged); a local VLM plugs in by implementing `ChatBackend.complete`.
Answers are cached on disk by everything that changes one: the image hash, text, dimension, character,
prompt, model, the backend's sampling settings (seed, max_tokens), the starting temperature and the image size
it is sent at; so a rerun with the same settings costs nothing, and one with other settings asks again. Failed
questions are not cached, so a rerun asks them again.

Load (not part of the published protocol): at most `max_concurrency` requests of a backend are in flight at
once, whatever the number of threads asking (`Judge.score_many` asks with that many); an HTTP 429 or 5xx
answer, a refused connection or a timeout is asked again at the same temperature after an exponential backoff
with full jitter, or after the server's Retry-After, until the waits of that request would pass
`backoff_total_s`. (The published client instead retries forever, raising the temperature by 0.2 up to 1.0
after each non-200 answer, so its scores depend on the server's load; ours do not.)

A judge that cannot answer is never a score of 0: an HTTP 401 / 403 / 404 / 407 (refused key, unknown model or
endpoint), a backoff given up (unreachable or overloaded), or a question none of whose attempts got an answer
raises `JudgeUnavailable`, and the Alignment metric is then reported missing with that reason.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import io
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from dreamshot.config.schema import JudgeConfig
from dreamshot.eval.metrics import ALIGNMENT_DIMENSIONS
from dreamshot.utils.errors import ConfigError, DreamShotError

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


# HTTP statuses that say the judge is configured wrong (key, model, endpoint, proxy): asking again cannot help.
FATAL_STATUSES = {
    401: "the API key is refused (eval.judge.api_key_env)",
    403: "the API key is refused (eval.judge.api_key_env)",
    404: "no such endpoint or model (eval.judge.endpoint, eval.judge.model)",
    407: "the proxy asks for credentials",
}


class JudgeRequestError(Exception):
    """A failed attempt at one question (an HTTP error status about that request, a malformed response)."""


class JudgeUnavailable(DreamShotError):
    """The judge cannot answer: its scores would be wrong, so the Alignment metric is missing with this reason."""


class _TryLater(Exception):
    """HTTP 429 or 5xx, a refused connection or a timeout: ask again later (`retry_after`: the server's
    Retry-After, in seconds)."""

    def __init__(self, what: str, retry_after: float | None = None) -> None:
        super().__init__(what)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Backoff:
    """Waits between the tries of one request the server answered with 429 or 5xx.

    Try n (0-based) waits the server's Retry-After when it gave one, else a uniform draw from
    [0, min(max_s, base_s * 2**n)] ("full jitter": clients that were refused together do not come back
    together). A request gives up when its next wait would end more than `total_s` after its first try.
    """

    base_s: float = 1.0
    max_s: float = 60.0
    total_s: float = 300.0

    def wait(self, retry: int, retry_after: float | None, rng: random.Random) -> float:
        if retry_after is not None:
            return retry_after
        # The exponent stops growing long before max_s is reached (and before 2**n overflows a float).
        return rng.uniform(0.0, min(self.max_s, self.base_s * 2.0 ** min(retry, 64)))


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A Retry-After header (seconds, or an HTTP date) as seconds from `now`; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class ChatBackend(Protocol):
    """Answers one chat-completions request. `model` names the judge and `settings` holds what else, besides
    the messages and the temperature, changes its answers (e.g. seed, max_tokens); both are part of the cache
    key."""

    model: str
    settings: dict[str, Any]

    def complete(self, messages: list[dict[str, Any]], temperature: float) -> str:
        """The assistant's reply text; raises JudgeRequestError for a failed attempt, JudgeUnavailable when
        the judge cannot answer at all."""
        ...


class OpenAIChatBackend:
    """POST `<endpoint>/chat/completions` with the published sampling settings (urllib, no client library).

    Thread-safe; at most `cfg.max_concurrency` requests are in flight at once, and 429 / 5xx answers are asked
    again after a `Backoff` (see the module docstring).
    """

    def __init__(self, cfg: JudgeConfig, api_key: str | None) -> None:
        if not cfg.endpoint:
            raise ConfigError("eval.judge.endpoint is not set")
        self.url = cfg.endpoint.rstrip("/").removesuffix("/chat/completions") + "/chat/completions"
        self.model = cfg.model
        self.settings = {"seed": cfg.seed, "max_tokens": cfg.max_tokens}
        self.timeout = cfg.timeout_s
        self.backoff = Backoff(cfg.backoff_base_s, cfg.backoff_max_s, cfg.backoff_total_s)
        self._slots = threading.BoundedSemaphore(cfg.max_concurrency)
        self._rng = random.Random()
        self._api_key = api_key

    def __repr__(self) -> str:
        # The key is deliberately absent.
        return f"OpenAIChatBackend(url={self.url!r}, model={self.model!r})"

    def complete(self, messages: list[dict[str, Any]], temperature: float) -> str:
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": round(temperature, 6),
            **self.settings,
        }
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        reply = self._send(urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST"))
        try:
            return str(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise JudgeRequestError(f"no choices[0].message.content in the reply of {self.url}") from None

    def _send(self, request: urllib.request.Request) -> Any:
        """The decoded JSON reply, asking again after a backoff while the server answers 429 / 5xx or cannot
        be reached."""
        deadline, retry = time.monotonic() + self.backoff.total_s, 0
        while True:
            try:
                return self._post(request)
            except _TryLater as e:
                wait = self.backoff.wait(retry, e.retry_after, self._rng)
                if time.monotonic() + wait > deadline:
                    raise JudgeUnavailable(
                        f"{e} from {self.url} after {retry + 1} tries (backoff given up, "
                        f"eval.judge.backoff_total_s={self.backoff.total_s:g})"
                    ) from None
                # Outside `_post`: the bound is on requests in flight, and a waiting one holds no slot.
                time.sleep(wait)
                retry += 1

    def _post(self, request: urllib.request.Request) -> Any:
        """One HTTP exchange: the decoded JSON reply. Raises _TryLater on 429 / 5xx / no connection,
        JudgeUnavailable on a FATAL_STATUSES answer, else JudgeRequestError."""
        with self._slots:
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                if e.code == 429 or e.code >= 500:
                    raise _TryLater(f"HTTP {e.code}", retry_after_seconds(e.headers.get("Retry-After"))) from None
                if e.code in FATAL_STATUSES:
                    raise JudgeUnavailable(f"HTTP {e.code} from {self.url}: {FATAL_STATUSES[e.code]}") from None
                raise JudgeRequestError(f"HTTP {e.code} from {self.url}") from None
            except json.JSONDecodeError:
                raise JudgeRequestError(f"a reply of {self.url} is not JSON") from None
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                reason = getattr(e, "reason", None) or e
                raise _TryLater(f"{type(e).__name__} ({reason})") from None


class AnswerCache:
    """Judge answers on disk, one JSON object per line ({"key", "score", "reply"}); later lines win."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.answers: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8")
            for line in text.splitlines():
                # A line cut short by a crash is skipped: its question is simply asked again.
                try:
                    entry = json.loads(line)
                    self.answers[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
            if text and not text.endswith("\n"):
                # End the torn line, so the next answer starts a line of its own instead of joining it.
                with self.path.open("a", encoding="utf-8") as f:
                    f.write("\n")

    def get(self, key: str) -> int | None:
        entry = self.answers.get(key)
        return None if entry is None else int(entry["score"])

    def put(self, key: str, score: int, reply: str) -> None:
        entry = {"key": key, "score": score, "reply": reply}
        # One writer at a time, so lines of judges asking from several threads never interleave.
        with self._lock:
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


@dataclass(frozen=True)
class Question:
    """One judge question: `image` against `text` on `dimension` (`character`: single_character_action)."""

    image: Image.Image
    text: str
    dimension: str
    character: str | None = None


class Judge:
    """Scores (image, text) pairs on the four alignment dimensions through a ChatBackend, with the cache.

    Thread-safe: `score_many` asks from `workers` threads at once.
    """

    def __init__(
        self,
        backend: ChatBackend,
        cache: AnswerCache,
        prompts: dict[str, str] | None = None,
        temperature: float = 0.0,
        max_retries: int = 10,
        retry_wait_s: float = 0.0,
        image_size: int = 512,
        workers: int = 1,
    ) -> None:
        self.backend, self.cache = backend, cache
        self.prompts = {**PROMPTS, **(prompts or {})}
        self.temperature, self.max_retries, self.retry_wait_s = temperature, max_retries, retry_wait_s
        self.image_size, self.workers = image_size, workers
        self.stats = JudgeStats()
        self._stats_lock = threading.Lock()
        # Set by the first question the judge cannot answer: the questions after it are not asked.
        self.unavailable: JudgeUnavailable | None = None

    def score(self, image: Image.Image, text: str, dimension: str, character: str | None = None) -> int:
        """0-4 score of `image` against `text` on `dimension`: 0 when every answer fails to parse;
        JudgeUnavailable when the judge cannot answer (see the module docstring)."""
        if dimension not in ALIGNMENT_DIMENSIONS:
            raise ValueError(f"unknown alignment dimension {dimension!r}")
        key = self.cache_key(image, text, dimension, character)
        cached = self.cache.get(key)
        if cached is not None:
            self._count("cached")
            return cached
        self._count("asked")
        messages = self.messages(image, text, dimension, character)
        answered, failure = False, None
        for attempt in range(self.max_retries):
            if self.unavailable is not None:
                raise self.unavailable
            try:
                reply = self.backend.complete(messages, self.temperature + attempt * TEMPERATURE_STEP)
            except JudgeRequestError as e:
                failure = e
                time.sleep(self.retry_wait_s)
                continue
            except JudgeUnavailable as e:
                self.unavailable = e
                raise
            answered = True
            score = parse_score(reply)
            if score is not None:
                self.cache.put(key, score, reply)
                return score
        if not answered:
            self.unavailable = JudgeUnavailable(f"no answer in {self.max_retries} attempts ({failure})")
            raise self.unavailable
        self._count("failed")
        return 0

    def score_many(self, questions: Sequence[Question]) -> list[int]:
        """The scores of `questions`, in order, asked from `workers` threads (the backend bounds how many
        requests are in flight)."""
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda q: self.score(q.image, q.text, q.dimension, q.character), questions))

    def _count(self, name: str) -> None:
        with self._stats_lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def messages(self, image: Image.Image, text: str, dimension: str, character: str | None) -> list[dict]:
        """The chat messages of one question, laid out as ViStoryBench sends them (module docstring)."""
        rubric = {"type": "text", "text": self.prompts[dimension]}
        if character is None:
            return [
                {
                    "role": "user",
                    "content": [rubric, {"type": "text", "text": text}, image_content(image, self.image_size)],
                }
            ]
        # Character crops are small: "low" detail, as the published code sends them.
        content = [
            {"type": "text", "text": text},
            {"type": "text", "text": f"Evaluated Character Name is {character}"},
            image_content(image, self.image_size, "low"),
        ]
        return [{"role": "system", "content": [rubric]}, {"role": "user", "content": content}]

    def cache_key(self, image: Image.Image, text: str, dimension: str, character: str | None) -> str:
        prompt = hashlib.sha256(self.prompts[dimension].encode()).hexdigest()[:16]
        parts = [image_hash(image), text, dimension, character or "", prompt, self.backend.model]
        parts += [sorted(self.backend.settings.items()), self.temperature, self.image_size]
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
        cfg.max_concurrency,
    )
