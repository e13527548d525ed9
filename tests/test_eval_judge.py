"""The alignment judge against an OpenAI-compatible server the tests run on loopback: request settings, score
parsing, retries with rising temperature, the answer cache, the API key kept out of logs; the Alignment metric's
per-shot and per-story rounding."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from dreamshot.config.schema import JudgeConfig
from dreamshot.eval.benchmarks.types import BenchCharacter, BenchShot, BenchStory
from dreamshot.eval.identity import Match, StoryMatches
from dreamshot.eval.judge import AnswerCache, JudgeUnavailable, build_judge, parse_score
from dreamshot.eval.story_metrics import AlignmentMetric, StorySample
from dreamshot.eval.suite import MetricSuite

KEY = "sk-loopback-secret"


class ChatServer:
    """Replies to POST /v1/chat/completions from a script of (status, content) and records every request."""

    def __init__(self) -> None:
        self.script: list[tuple[int, str]] = []
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, content = server.script.pop(0) if server.script else (200, "Score: 1")
                reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                data = json.dumps(reply if status == 200 else {"error": content}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/v1"


@pytest.fixture(scope="module")
def server():
    chat = ChatServer()
    yield chat
    chat.httpd.shutdown()
    chat.httpd.server_close()


@pytest.fixture
def judge_cfg(server, tmp_path, monkeypatch) -> JudgeConfig:
    server.script.clear()
    server.requests.clear()
    monkeypatch.setenv("LOOPBACK_JUDGE_KEY", KEY)
    return JudgeConfig(
        endpoint=server.endpoint, api_key_env="LOOPBACK_JUDGE_KEY", retry_wait_s=0.0, backoff_base_s=0.001
    )


def _image(colour=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (96, 64), colour)


def test_parse_score_follows_the_published_pattern():
    assert parse_score("The sky matches.\nScore: 3") == 3
    assert parse_score("score: Level 2, later Score: 4") == 2  # first match, a word may stand between
    assert parse_score("SCORE: 3") is None and parse_score("3/4") is None


def test_request_settings_retries_and_cache_hit_on_rerun(server, judge_cfg, tmp_path):
    server.script.extend([(500, "overloaded"), (200, "Looks right."), (200, "Mostly right.\nScore: 3")])
    judge = build_judge(judge_cfg, tmp_path / "cache.jsonl")
    assert judge.score(_image(), "A rainy street at night.", "scene") == 3
    # The 500 is asked again after a backoff at the same temperature; the unparsable answer raises it.
    assert [r["body"]["temperature"] for r in server.requests] == [0.0, 0.0, 0.1]
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == f"Bearer {KEY}"
    body = first["body"]
    assert (body["model"], body["seed"], body["max_tokens"]) == ("gpt-4.1", 123, 512)
    # ViStoryBench's gptv_query posts exactly these fields: its top_p argument never reaches the request.
    assert set(body) == {"model", "messages", "temperature", "seed", "max_tokens"}
    [message] = body["messages"]
    texts = [part["text"] for part in message["content"] if part["type"] == "text"]
    assert texts[1] == "A rainy street at night." and "setting" in texts[0]
    url = message["content"][-1]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (512, 512)

    rerun = build_judge(judge_cfg, tmp_path / "cache.jsonl")  # a new process reading the same cache
    assert rerun.score(_image(), "A rainy street at night.", "scene") == 3
    assert len(server.requests) == 3 and rerun.stats.cached == 1 and rerun.stats.asked == 0
    # Another dimension, text or image is another question.
    rerun.score(_image(), "A rainy street at night.", "camera")
    rerun.score(_image((0, 0, 255)), "A rainy street at night.", "scene")
    assert len(server.requests) == 5


def test_every_attempt_failing_scores_zero_and_is_asked_again(server, judge_cfg, tmp_path):
    judge_cfg.max_retries = 3
    server.script.extend([(200, "no idea")] * 3)
    judge = build_judge(judge_cfg, tmp_path / "cache.jsonl")
    assert judge.score(_image(), "text", "camera") == 0
    assert len(server.requests) == 3 and judge.stats.failed == 1
    server.script.append((200, "Score: 2"))
    assert build_judge(judge_cfg, tmp_path / "cache.jsonl").score(_image(), "text", "camera") == 2


def test_single_character_question_sends_the_rubric_as_a_system_message_and_key_stays_out_of_files(
    server, judge_cfg, tmp_path
):
    server.script.append((200, "Score: 4"))
    judge = build_judge(judge_cfg, tmp_path / "cache.jsonl")
    assert judge.score(_image(), "Ana waves.", "single_character_action", character="Ana") == 4
    system, user = server.requests[0]["body"]["messages"]
    assert system == {"role": "system", "content": [{"type": "text", "text": judge.prompts["single_character_action"]}]}
    assert user["role"] == "user" and [part["type"] for part in user["content"]] == ["text", "text", "image_url"]
    assert [part.get("text") for part in user["content"][:2]] == ["Ana waves.", "Evaluated Character Name is Ana"]
    assert user["content"][-1]["image_url"]["detail"] == "low"
    assert KEY not in (tmp_path / "cache.jsonl").read_text() and KEY not in repr(judge.backend)


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_judge_that_refuses_the_key_is_unavailable_not_zero(server, judge_cfg, tmp_path, status):
    server.script.extend([(status, "no")] * 3)
    judge = build_judge(judge_cfg, tmp_path / "cache.jsonl")
    with pytest.raises(JudgeUnavailable, match=rf"HTTP {status} from http://127\.0\.0\.1:\d+/v1/chat/completions"):
        judge.score(_image(), "text", "scene")
    assert len(server.requests) == 1  # asking again cannot help
    with pytest.raises(JudgeUnavailable):  # the questions after it are not asked
        judge.score(_image((0, 0, 9)), "text", "scene")
    assert len(server.requests) == 1 and not (tmp_path / "cache.jsonl").exists()


def test_a_question_no_attempt_of_which_got_an_answer_is_unavailable(server, judge_cfg, tmp_path):
    judge_cfg.max_retries = 3
    server.script.extend([(400, "bad request")] * 3)
    with pytest.raises(JudgeUnavailable, match=r"no answer in 3 attempts \(HTTP 400 from"):
        build_judge(judge_cfg, tmp_path / "cache.jsonl").score(_image(), "text", "scene")
    assert [r["body"]["temperature"] for r in server.requests] == [0.0, 0.1, 0.2]


def test_an_unreachable_judge_makes_alignment_missing_with_the_reason(tmp_path, monkeypatch):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # nothing listens there once the socket is closed
    cfg = JudgeConfig(endpoint=f"http://127.0.0.1:{port}/v1", retry_wait_s=0.0, backoff_base_s=0.001)
    cfg.backoff_total_s = 0.05
    judge = build_judge(cfg, tmp_path / "cache.jsonl")
    story = BenchStory("s", {}, (BenchShot(1, "p", "scene", "cam", "act", ()),))
    metric = AlignmentMetric(judge, None)
    metric.update(StorySample(story, {1: _image()}))
    metric.update(StorySample(BenchStory("t", {}, story.shots), {1: _image()}))
    assert metric.compute() == {} and metric.per_story == {}
    assert "the judge cannot answer" in metric.failure and "backoff given up" in metric.failure
    assert "ConnectionRefusedError" in metric.failure or "URLError" in metric.failure


def test_prompt_files_replace_rubrics_and_change_the_cache_key(server, judge_cfg, tmp_path):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "scene.txt").write_text("Published scene rubric.")
    plain = build_judge(judge_cfg, tmp_path / "cache.jsonl")
    judge_cfg.prompt_dir = str(tmp_path / "prompts")
    custom = build_judge(judge_cfg, tmp_path / "cache.jsonl")
    assert custom.prompts["scene"] == "Published scene rubric." and custom.prompts["camera"] == plain.prompts["camera"]
    image = _image()
    assert plain.cache_key(image, "t", "scene", None) != custom.cache_key(image, "t", "scene", None)
    assert plain.cache_key(image, "t", "camera", None) == custom.cache_key(image, "t", "camera", None)


class ScriptedJudge:
    """Scores looked up by (dimension, character)."""

    def __init__(self, scores: dict) -> None:
        self.scores = scores
        self.batches: list[int] = []

    def score(self, image, text, dimension, character=None) -> int:
        return self.scores[(dimension, character)]

    def score_many(self, questions) -> list[int]:
        self.batches.append(len(questions))
        return [self.score(q.image, q.text, q.dimension, q.character) for q in questions]


class GivenMatches:
    def __init__(self, matches: StoryMatches) -> None:
        self.result = matches

    def match(self, story, shots) -> StoryMatches:
        return self.result


def test_alignment_metric_rounds_single_character_scores_per_shot_then_per_story(tmp_path):
    characters = {k: BenchCharacter(k, k.upper(), "non_human", k, ()) for k in ("a", "b")}
    shots = (
        BenchShot(1, "p", "scene", "cam", "act", ("a", "b")),
        BenchShot(2, "p", "scene", "cam", "act", ("a",)),
        BenchShot(3, "p", "scene", "cam", "act", ("b",)),  # nothing detected: not evaluated
        BenchShot(4, "p", "scene", "cam", "act", ()),  # no listed character: not evaluated
    )
    story = BenchStory("s", characters, shots)
    crop, feature = _image(), torch.ones(2)
    found = StoryMatches(
        matches={"a": [Match(1, crop, feature), Match(2, crop, feature)], "b": [Match(1, crop, feature)]},
        evaluated={1, 2},
    )
    scores = {
        ("scene", None): 3,
        ("camera", None): 2,
        ("character_action", None): 1,
        ("single_character_action", "A"): 3,
        ("single_character_action", "B"): 4,
    }
    judge = ScriptedJudge(scores)
    metric = AlignmentMetric(judge, GivenMatches(found))
    metric.update(StorySample(story, {i: _image() for i in (1, 2, 3, 4)}))
    values = {k: v.item() for k, v in metric.compute().items()}
    # The story's 4 x 3 shot questions and 3 crop questions, asked as one concurrent batch.
    assert judge.batches == [15]
    # Shot 1: round(3.5) = 4 (half to even); shot 2: 3; shots 3 and 4 are left out; story: round(3.5) = 4.
    assert values["alignment_single_character_action"] == 4
    assert values["alignment_scene"] == 3 and values["alignment_camera"] == 2
    assert values["alignment"] == pytest.approx((3 + 2 + 1 + 4) / 4)


def test_a_story_without_evaluated_shots_has_no_single_character_value_and_alignment_is_the_dataset_mean():
    characters = {"a": BenchCharacter("a", "A", "non_human", "a", ())}
    story = BenchStory("s", characters, (BenchShot(1, "p", "scene", "cam", "act", ("a",)),))
    judge = ScriptedJudge({("scene", None): 4, ("camera", None): 4, ("character_action", None): 4})
    metric = AlignmentMetric(judge, GivenMatches(StoryMatches(matches={"a": []})))
    metric.update(StorySample(story, {1: _image()}))
    assert "alignment_single_character_action" not in metric.per_story["s"]
    assert "alignment_single_character_action" not in metric.compute()
    # A second story with an evaluated shot: Alignment is the mean of the four dataset-level averages.
    other = BenchStory("t", characters, story.shots)
    found = StoryMatches(matches={"a": [Match(1, _image(), torch.ones(2))]}, evaluated={1})
    judge.scores = {**judge.scores, ("scene", None): 2, ("single_character_action", "A"): 1}
    metric.matcher = GivenMatches(found)
    metric.update(StorySample(other, {1: _image()}))
    values = {k: v.item() for k, v in metric.compute().items()}
    assert values["alignment_scene"] == 3 and values["alignment_single_character_action"] == 1
    assert values["alignment"] == pytest.approx((3 + 4 + 4 + 1) / 4)


def test_single_character_action_no_story_has_is_missing_with_the_reason_not_left_blank():
    """No shot of any story scored a character (e.g. the detector found nothing anywhere): the table must say why
    single-character action and Alignment have no value, not print a bare '-'."""
    characters = {"a": BenchCharacter("a", "A", "non_human", "a", ())}
    story = BenchStory("s", characters, (BenchShot(1, "p", "scene", "cam", "act", ("a",)),))
    judge = ScriptedJudge({("scene", None): 4, ("camera", None): 4, ("character_action", None): 4})
    suite = MetricSuite({"alignment": AlignmentMetric(judge, GivenMatches(StoryMatches(matches={"a": []})))})
    suite.update(StorySample(story, {1: _image()}))
    missing = suite.missing_values()
    assert set(missing) == {"alignment_single_character_action", "alignment"}
    assert "no shot of any story could score a listed character" in missing["alignment"]
    assert set(suite.compute()) == {"alignment_scene", "alignment_camera", "alignment_character_action"}


def test_alignment_without_character_crops_has_three_dimensions(tmp_path):
    story = BenchStory("s", {}, (BenchShot(1, "p", "scene", "cam", "act", ()),))
    metric = AlignmentMetric(
        ScriptedJudge({("scene", None): 4, ("camera", None): 0, ("character_action", None): 2}), None
    )
    metric.update(StorySample(story, {1: _image()}))
    assert set(metric.compute()) == {"alignment_scene", "alignment_camera", "alignment_character_action"}


def test_cache_survives_a_truncated_last_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = AnswerCache(path)
    cache.put("k1", 3, "Score: 3")
    with path.open("a") as f:
        f.write('{"key": "k2", "sco')  # a crash mid-write
    reread = AnswerCache(path)
    assert reread.get("k1") == 3 and reread.get("k2") is None


def test_the_answer_after_a_torn_line_is_kept(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"key": "k1", "score": 3, "reply": "Score: 3"}\n{"key": "k2", "sco')  # a crash mid-write
    AnswerCache(path).put("k3", 2, "Score: 2")
    reread = AnswerCache(path)
    assert (reread.get("k1"), reread.get("k2"), reread.get("k3")) == (3, None, 2)


@pytest.mark.parametrize(
    ("key", "value"), [("image_size", 256), ("temperature", 0.3), ("seed", 7), ("max_tokens", 64), ("model", "o4")]
)
def test_every_setting_that_changes_an_answer_changes_the_cache_key(judge_cfg, tmp_path, key, value):
    before = build_judge(judge_cfg, tmp_path / "cache.jsonl").cache_key(_image(), "t", "scene", None)
    setattr(judge_cfg, key, value)
    after = build_judge(judge_cfg, tmp_path / "cache.jsonl").cache_key(_image(), "t", "scene", None)
    assert before != after
