"""API keys are read from the environment only and reach no file, log or W&B run: `dreamshot eval`, a training
run (with the in-training evaluation) and `dreamshot prepare` (VLM grouping and annotation) all ask a loopback
chat server with the key, and then the key's value is searched in every file they wrote and in everything they
printed. A key written into a config (an endpoint's userinfo or query, or in place of a variable's name) is
refused without being repeated."""

from __future__ import annotations

import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dreamshot.cli import main
from dreamshot.config.load import load_config
from dreamshot.prepare.config import load_prepare_config
from dreamshot.prepare.toyvideo import render_toy_video, toy_overrides
from dreamshot.utils.errors import ConfigError

KEY_ENV = "DREAMSHOT_TEST_JUDGE_KEY"
# Small and fast: tiny model, toy stories of at most three 32 x 48 shots, one sampler step, only the judge.
SMALL = [
    "data.resolution=[32,48]",
    "inference.steps=1",
    "eval.toy.groups=1",
    "eval.toy.image_size=[32,48]",
    "eval.toy.max_shots=3",
    "eval.metrics=[alignment]",
    "logger.backend=wandb",
    f"eval.judge.api_key_env={KEY_ENV}",
]


@pytest.fixture
def secret(monkeypatch) -> str:
    """A fresh key in the judge's key variable (and in the default one, which no config here names)."""
    key = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, key)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return key


@pytest.fixture
def judge_server():
    """A chat-completions server on loopback answering "Score: 3"; `auth` holds every Authorization header."""
    auth: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            auth.append(self.headers.get("Authorization"))
            data = json.dumps({"choices": [{"message": {"content": _answer(body)}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/v1", auth
    httpd.shutdown()
    httpd.server_close()


def _answer(body: dict) -> str:
    """A judge's score, or what `dreamshot prepare`'s VLM backends ask for: one group for every keyframe of a
    window, a sentence for a shot, a role or the style."""
    prompt = next(part["text"] for part in body["messages"][-1]["content"] if part["type"] == "text")
    if "comma-separated integers" in prompt:
        return ",".join("1" for _ in range(int(re.search(r"numbered 1 to (\d+)", prompt).group(1))))
    if "Answer with the sentence only" in prompt or "visual style" in prompt:
        return "A red box on a plain background."
    return "Looks right.\nScore: 3"


def _files_holding(root: Path, secret: str) -> list[str]:
    """Files under `root` whose bytes contain `secret` (W&B's binary run files included)."""
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_eval_keeps_the_key_out_of_results_cache_wandb_and_output(secret, judge_server, tmp_path, capfd):
    endpoint, auth = judge_server
    out = tmp_path / "eval"
    assert main(["eval", "toy", *SMALL, f"eval.judge.endpoint={endpoint}", "--base", "--out", str(out)]) == 0
    printed = capfd.readouterr()
    assert auth and set(auth) == {f"Bearer {secret}"}  # the key was read and sent
    written = {p.relative_to(out).parts[0] for p in out.rglob("*") if p.is_file()}
    assert {"results.json", "results.csv", "judge_cache.jsonl", "wandb"} <= written
    assert json.loads((out / "results.json").read_text())["metrics"]["alignment_scene"]["value"] == 3.0
    assert _files_holding(out / "wandb", endpoint)  # the search sees W&B's files: the config reached them
    assert _files_holding(out, secret) == []
    assert secret not in printed.out and secret not in printed.err


def test_training_keeps_the_key_out_of_its_config_checkpoints_and_wandb(secret, judge_server, tmp_path, capfd):
    endpoint, auth = judge_server
    run = [
        *SMALL,
        "data.toy.groups=3",
        "data.toy.max_shots=3",
        "data.toy.max_roles=2",
        "data.val_groups=1",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.checkpoint_every_n_steps=2",
        "eval.callback.enabled=true",
        "eval.callback.every_n_steps=2",
        "eval.callback.stories=1",
        "eval.callback.steps=1",
        f"eval.judge.endpoint={endpoint}",
        f"output_dir={tmp_path / 'run'}",
    ]
    assert main(["train", "smoke", *run]) == 0
    printed = capfd.readouterr()
    out = tmp_path / "run"
    assert auth and set(auth) == {f"Bearer {secret}"}  # the in-training evaluation asked the judge with the key
    config = (out / "config.yaml").read_text()
    assert f"api_key_env: {KEY_ENV}" in config  # the variable's name is kept, never its value
    assert list((out / "checkpoints").glob("*.ckpt")) and _files_holding(out / "wandb", endpoint)
    assert _files_holding(out, secret) == []
    assert secret not in printed.out and secret not in printed.err


def test_a_key_written_into_the_endpoint_is_refused_without_echoing_it(secret, tmp_path, capsys):
    endpoint = f"https://user:{secret}@api.example.com/v1"
    assert main(["train", "smoke", f"eval.judge.endpoint={endpoint}", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "eval.judge.endpoint holds credentials" in err and secret not in err
    assert not (tmp_path / "run").exists()


def test_prepare_keeps_the_key_out_of_its_manifest_state_and_output(secret, judge_server, tmp_path, capfd):
    endpoint, auth = judge_server
    render_toy_video(tmp_path / "videos" / "a.mp4", scenes=2, seed=0)
    out = tmp_path / "prepared"
    vlm = [f"vlm.endpoint={endpoint}", f"vlm.api_key_env={KEY_ENV}", "grouping.judge=vlm", "roles.annotator=vlm"]
    argv = ["prepare", str(tmp_path / "videos"), *toy_overrides(), *vlm, "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capfd.readouterr()
    assert auth and set(auth) == {f"Bearer {secret}"}  # grouping and annotation asked the VLM with the key
    assert (out / "manifest.jsonl").is_file() and list((out / "state").rglob("*.json"))
    assert _files_holding(out, "A red box on a plain background")  # the search sees the VLM's answers
    assert _files_holding(out, secret) == []
    assert secret not in printed.out and secret not in printed.err


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://api.example.com/v1?api-key={key}",
        "https://api.example.com/v1?alt=json&key={key}",
        "https://api.example.com/v1?access_token={key}",
        "https://{key}@api.example.com/v1",
        "https://user:{key}@api.example.com/v1",
    ],
)
def test_an_endpoint_holding_a_key_is_refused_without_repeating_it(secret, endpoint):
    with pytest.raises(ConfigError) as error:
        load_config("smoke", [f"eval.judge.endpoint={endpoint.format(key=secret)}"])
    assert "eval.judge.endpoint holds" in str(error.value) and secret not in str(error.value)
    with pytest.raises(ConfigError) as error:
        load_prepare_config(overrides=[f"vlm.endpoint={endpoint.format(key=secret)}"])
    assert "vlm.endpoint holds" in str(error.value) and secret not in str(error.value)


def test_harmless_query_parameters_and_variable_names_pass(secret, monkeypatch):
    monkeypatch.setenv("my_key_2", secret)
    cfg = load_config(
        "smoke",
        [
            "eval.judge.endpoint=https://x.openai.azure.com/openai?api-version=2024-02-01",
            "eval.judge.api_key_env=my_key_2",
        ],
    )
    assert cfg.eval.judge.api_key_env == "my_key_2"


@pytest.mark.parametrize("value", ["sk-proj-abc123", "hf_abcdEFG123", "AIzaSyA1b2c3", "xyz 123"])
def test_a_key_where_its_variable_name_belongs_is_refused_without_repeating_it(value):
    with pytest.raises(ConfigError, match="looks like a key itself") as error:
        load_config("smoke", [f"eval.judge.api_key_env={value}"])
    assert value not in str(error.value)
    with pytest.raises(ConfigError, match="vlm.api_key_env must name the environment variable"):
        load_prepare_config(overrides=[f"vlm.api_key_env={value}"])
