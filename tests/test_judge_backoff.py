"""The judge client under load, against loopback servers: 429 / 5xx answers are asked again after a backoff
(Retry-After honoured, total wait bounded) apart from the published temperature rule, and no more than
`max_concurrency` requests are ever in flight."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from PIL import Image

from dreamshot.config.load import load_config
from dreamshot.config.schema import JudgeConfig
from dreamshot.eval import judge as judge_module
from dreamshot.eval.judge import (
    JudgeRequestError,
    JudgeUnavailable,
    OpenAIChatBackend,
    Question,
    build_judge,
    retry_after_seconds,
)
from dreamshot.utils.errors import ConfigError

MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "t"}]}]


class LoadServer:
    """POST /v1/chat/completions: answers from a script of (status, headers) first, then 200 "Score: 2" after
    `delay_s`; records each request's temperature and the most requests it ever held at once."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, str]]] = []
        self.temperatures: list[float] = []
        self.delay_s = 0.0
        self.in_flight = self.most_in_flight = 0
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    server.temperatures.append(body["temperature"])
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                    status, headers = server.script.pop(0) if server.script else (200, {})
                time.sleep(server.delay_s)
                # Before answering: from the moment the client has the answer its slot may go to another request.
                with lock:
                    server.in_flight -= 1
                reply = {"choices": [{"message": {"content": "Score: 2"}}]} if status == 200 else {"error": "busy"}
                data = json.dumps(reply).encode()
                self.send_response(status)
                for name, value in {"Content-Length": str(len(data)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.request_queue_size = 64  # every client thread gets connected; the client is what must wait
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def config(self, **changes) -> JudgeConfig:
        endpoint = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        return JudgeConfig(endpoint=endpoint, retry_wait_s=0.0, backoff_base_s=0.001, backoff_max_s=0.01, **changes)


@pytest.fixture
def server():
    load = LoadServer()
    yield load
    load.httpd.shutdown()
    load.httpd.server_close()


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The backoff waits the client asks for (each still slept, so they stay tiny)."""
    asked: list[float] = []

    def recorded(seconds: float) -> None:
        asked.append(seconds)
        time.sleep(seconds)

    # Only the judge module's view of `time`: the server threads sleep too.
    monkeypatch.setattr(judge_module, "time", SimpleNamespace(sleep=recorded, monotonic=time.monotonic))
    return asked


def test_429_and_5xx_are_asked_again_at_the_same_temperature(server, sleeps, tmp_path):
    server.script.extend([(429, {}), (503, {}), (500, {})])
    judge = build_judge(server.config(), tmp_path / "cache.jsonl")
    assert judge.score(Image.new("RGB", (8, 8)), "text", "scene") == 2
    # Three refusals, then the answer: one attempt of the published rule, so the temperature never rose.
    assert server.temperatures == [0.0] * 4 and judge.stats.failed == 0
    assert len(sleeps) == 3
    for n, wait in enumerate(sleeps):  # full jitter under base * 2**n, capped at backoff_max_s
        assert 0.0 <= wait <= min(0.01, 0.001 * 2**n)


def test_retry_after_is_honoured_in_seconds_and_as_a_date(server, sleeps, monkeypatch):
    server.script.append((429, {"Retry-After": "0"}))
    backend = OpenAIChatBackend(server.config(), None)
    assert backend.complete(MESSAGES, 0.0) == "Score: 2"
    assert sleeps == [0.0]
    now = datetime(2025, 1, 1, tzinfo=UTC)
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_a_retry_after_past_the_total_wait_fails_at_once(server, sleeps):
    server.script.append((503, {"Retry-After": "3600"}))
    backend = OpenAIChatBackend(server.config(backoff_total_s=60.0), None)
    with pytest.raises(JudgeUnavailable, match=r"HTTP 503 .* after 1 tries \(backoff given up"):
        backend.complete(MESSAGES, 0.0)
    assert sleeps == [] and len(server.temperatures) == 1


def test_the_total_backoff_is_bounded_then_the_judge_is_unavailable(server, sleeps, tmp_path):
    server.script.extend([(503, {})] * 10_000)  # overloaded for good
    cfg = server.config(backoff_total_s=0.05, max_retries=2)
    judge = build_judge(cfg, tmp_path / "cache.jsonl")
    start = time.monotonic()
    with pytest.raises(JudgeUnavailable, match=r"HTTP 503 .*backoff given up, eval\.judge\.backoff_total_s=0\.05"):
        judge.score(Image.new("RGB", (8, 8)), "text", "camera")
    # The bound is a hang's (10,000 scripted 503s), loose enough for a machine loaded by other jobs.
    assert time.monotonic() - start < 10.0 and judge.stats.failed == 0  # not a failed attempt scoring 0
    assert sum(sleeps) <= 0.05
    assert set(server.temperatures) == {0.0} and len(server.temperatures) > 1


def test_other_client_errors_are_not_backed_off(server, sleeps):
    server.script.append((400, {}))
    with pytest.raises(JudgeRequestError, match="HTTP 400"):
        OpenAIChatBackend(server.config(), None).complete(MESSAGES, 0.0)
    assert sleeps == [] and len(server.temperatures) == 1


def test_requests_in_flight_never_exceed_max_concurrency(server, tmp_path):
    server.delay_s = 0.05
    judge = build_judge(server.config(max_concurrency=3), tmp_path / "cache.jsonl")
    questions = [Question(Image.new("RGB", (8, 8), (i, 0, 0)), f"shot {i}", "scene") for i in range(12)]
    # More threads than slots, as several evaluations sharing one judge would ask.
    threads = [threading.Thread(target=judge.score_many, args=(questions[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert server.most_in_flight == 3 and len(server.temperatures) == 12
    assert judge.stats.asked == 12 and len((tmp_path / "cache.jsonl").read_text().splitlines()) == 12
    assert judge.score_many(questions[:2]) == [2, 2] and judge.stats.cached == 2


def test_load_settings_are_checked_and_credentials_in_the_endpoint_refused():
    with pytest.raises(ConfigError, match="eval.judge.max_concurrency must be >= 1"):
        load_config(None, ["eval.judge.max_concurrency=0"])
    with pytest.raises(ConfigError, match="eval.judge.backoff_total_s must be > 0"):
        load_config(None, ["eval.judge.backoff_total_s=0"])
    with pytest.raises(ConfigError, match="holds credentials") as err:
        load_config(None, ["eval.judge.endpoint=https://me:sk-in-url@api.example.com/v1"])
    assert "sk-in-url" not in str(err.value)
