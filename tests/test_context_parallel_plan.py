"""The planner under context parallelism, the long-storyboard windows it sets, the config rules and the toy world's
long groups."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dreamshot.cli import main
from dreamshot.config.load import load_config
from dreamshot.config.schema import ModelConfig, ToyWorldConfig, TransformerConfig
from dreamshot.data.datamodule import StoryboardDataModule
from dreamshot.data.toyworld import ensure_toyworld
from dreamshot.planner.communication import context_parallel_bytes
from dreamshot.planner.flops import SELF_SCORES, training_flops
from dreamshot.planner.memory import activation_memory
from dreamshot.planner.plan import GIB, config_training, config_workload, longest_storyboard, plan_phase, shot_window
from dreamshot.planner.report import render
from dreamshot.planner.shape import model_shape
from dreamshot.planner.workload import Training, Workload
from dreamshot.utils.errors import ConfigError

TOY = ModelConfig(transformer=TransformerConfig(num_layers=2, num_attention_heads=2, attention_head_dim=32))
# 3 frames of 8 tokens (T = 24), bf16.
WORK = Workload(frames=3, tokens_per_frame=8, text_len=4, target_frames=2, checkpointing=True)


@pytest.fixture(scope="module")
def toy_shape():
    return model_shape(TOY, count_encoders=False)


def test_cp_splits_the_activations_and_the_attention_by_the_degree(toy_shape):
    training = Training()
    alone = activation_memory(toy_shape, WORK, training)
    shared = activation_memory(toy_shape, dataclasses.replace(WORK, context_parallel=2), training)
    for name in ("block inputs", "attention backward"):
        assert shared[name].bytes * 2 == alone[name].bytes
    assert shared["one block recomputed"].bytes < alone["one block recomputed"].bytes
    flops = training_flops(toy_shape, dataclasses.replace(WORK, context_parallel=2))
    assert 2 * flops.forward[SELF_SCORES] == training_flops(toy_shape, WORK).forward[SELF_SCORES]
    # An odd sequence is padded: 25 tokens over 4 GPUs hold 7 each.
    assert dataclasses.replace(WORK, frames=5, tokens_per_frame=5, context_parallel=4).rank_tokens == 7


def test_the_flops_table_says_its_counts_are_one_gpus_share_under_cp(toy_shape):
    shared = render(
        "", toy_shape, [plan_phase("", toy_shape, dataclasses.replace(WORK, context_parallel=2), Training())], 80
    )
    assert "FLOPs per GPU, 1/2 of a sample" in shared and "FLOP per sample" not in shared
    assert "FLOPs per sample" in render("", toy_shape, [plan_phase("", toy_shape, WORK, Training())], 80)


def test_ulysses_and_ring_traffic_by_hand(toy_shape):
    work = dataclasses.replace(WORK, context_parallel=2)
    share = 12 * 64 * 2  # 12 tokens x D = 64 x bf16
    # Per block: forward and its replay 4 all-to-alls of share·(N-1)/N each, backward 4 more.
    assert context_parallel_bytes(toy_shape, work, "ulysses") == {
        "ulysses attention (all-to-all of q, k, v, out)": 2 * (2 + 1) * 4 * share // 2
    }
    ring = context_parallel_bytes(toy_shape, work, "ring")
    assert list(ring.values()) == [2 * (2 * 2 * share + 2 * share + 2 * 12 * 64 * 4 * 2)]
    racl = context_parallel_bytes(toy_shape, dataclasses.replace(work, racl_blocks=1), "ulysses")
    assert racl["RACL key all-gather"] == 3 * share
    assert context_parallel_bytes(toy_shape, WORK, "ulysses") == {}


def test_longest_storyboard_grows_with_the_degree(toy_shape):
    training = Training()
    memory = plan_phase("", toy_shape, WORK, training).total_bytes(True) / GIB

    def longest(degree):
        work = dataclasses.replace(WORK, context_parallel=degree)
        return longest_storyboard(toy_shape, work, training, memory * 4, False, 10_000)

    assert longest(1) < longest(2) < longest(4) < 10_000


def test_the_paper_recipes_long_storyboards_fit_at_cp_4_not_alone(capsys):
    argv = ["plan", "dreamshot", "--refs", "4", "--phase", "2"]
    assert main([*argv, "--shots", "30", "--context-parallel", "4"]) == 0
    out = capsys.readouterr().out
    assert "it fits in 80 GiB" in out and "ulysses attention" in out and "video tokens per GPU" in out
    assert main([*argv, "--shots", "40", "--context-parallel", "4"]) == 0
    assert "it fits in 80 GiB" in capsys.readouterr().out
    assert main([*argv, "--shots", "40"]) == 0
    assert "it does NOT fit in 80 GiB" in capsys.readouterr().out


def test_shot_window_is_max_shots_alone_and_what_fits_under_cp():
    cfg = load_config("toy_long_storyboard")
    assert shot_window(cfg, 3, 30) == 30  # the tiny model fits any toy storyboard
    cfg.trainer.device_memory_gib = 1e-3  # then nothing fits: one shot at a time
    assert shot_window(cfg, 3, 30) == 1
    work = config_workload(cfg, 30, 3, 6, 0.1)
    assert work.context_parallel == 2 and work.racl_blocks == 1 and config_training(cfg).world_size == 2
    cfg.trainer.context_parallel.degree = 1
    assert shot_window(cfg, 3, 30) == cfg.data.max_shots == 12


def test_datamodule_trains_long_storyboards_whole_under_cp(tmp_path):
    cfg = load_config("toy_long_storyboard", [f"output_dir={tmp_path}", "data.toy.groups=3"])
    whole = StoryboardDataModule(cfg.data, tmp_path, cfg.seed, shot_window=lambda refs, longest: longest)
    whole.setup("fit")
    windowed = StoryboardDataModule(cfg.data, tmp_path, cfg.seed)
    windowed.setup("fit")
    assert windowed.max_shots == 12 and {windowed.train_set.num_shots(i) for i in range(2)} == {12}
    assert all(whole.train_set.num_shots(i) >= 24 for i in range(2))


def test_toy_world_makes_30_shot_groups(tmp_path):
    manifest = ensure_toyworld(ToyWorldConfig(groups=2, min_shots=30, max_shots=30, image_size=[32, 48]), tmp_path)
    groups = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [len(group["shots"]) for group in groups] == [30, 30]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer=ddp_cpu", "trainer.devices=3", "trainer.context_parallel.degree=2"], "not divide the world size 3"),
        (["trainer=ddp_cpu", "trainer.devices=4", "trainer.context_parallel.degree=4"], "does not divide the 2"),
        (["trainer.context_parallel.degree=2"], "trainer.strategy=auto cannot host it"),
        (["trainer=ddp_cpu", "trainer.context_parallel.degree=0"], "degree must be >= 1"),
        (["trainer=ddp_cpu", "trainer.context_parallel.attention=all"], "trainer.context_parallel.attention"),
        (["inference.context_parallel.degree=4"], "inference.context_parallel.degree=4 does not divide the 2"),
        (
            ["trainer=gpu", "trainer.devices=8", "trainer.context_parallel.degree=8"]
            + ["trainer.context_parallel.attention=ring", "data.resolution=[48,80]"],
            "degree 8 must divide the 15 tokens per frame",
        ),
        (
            ["trainer=gpu", "trainer.context_parallel.degree=2", "trainer.context_parallel.attention=ring"]
            + ["data.aspect_buckets=true"],
            "trainer.context_parallel.attention=ring cannot pad.*data.aspect_buckets",
        ),
    ],
)
def test_context_parallel_config_rules(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", overrides)


def test_plan_refuses_gpus_that_the_configured_degree_does_not_divide(capsys):
    """--gpus replaces the world size the config was checked against: its CP degree must still divide it."""
    assert main(["plan", "toy_long_storyboard", "--gpus", "3"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "trainer.context_parallel.degree=2" in line and "3 GPU(s)" in line
    assert main(["plan", "toy_long_storyboard", "--gpus", "3", "--context-parallel", "1"]) == 0


def test_plan_refuses_ring_attention_that_would_have_to_pad(capsys):
    """The trainer refuses ring at a resolution whose tokens per frame the degree does not divide: so does the plan."""
    argv = ["plan", "smoke", "trainer=gpu", "trainer.context_parallel.attention=ring", "--context-parallel", "8"]
    assert main([*argv, "--resolution", "48x80"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "ring" in line and "15 tokens per frame" in line
    assert main([*argv, "--resolution", "64x128"]) == 0  # 32 tokens per frame


def test_context_parallel_configs_that_load():
    ring = load_config(
        "smoke", ["trainer=gpu", "trainer.context_parallel.degree=2", "trainer.context_parallel.attention=ring"]
    ).trainer
    assert (ring.context_parallel.degree, ring.context_parallel.attention) == (2, "ring")
    assert (ring.strategy, ring.accelerator, ring.devices) == ("deepspeed_stage_2", "gpu", 8)
    ulysses = load_config("smoke", ["trainer=ddp_cpu", "trainer.context_parallel.degree=2"]).trainer
    assert (ulysses.context_parallel.degree, ulysses.context_parallel.attention) == (2, "ulysses")
    assert (ulysses.strategy, ulysses.accelerator, ulysses.devices) == ("ddp", "cpu", 2)


def test_ring_under_checkpointing_counts_what_its_blocks_keep(toy_shape, capsys):
    ring = dataclasses.replace(WORK, context_parallel=2, context_parallel_attention="ring")
    ulysses = dataclasses.replace(ring, context_parallel_attention="ulysses")
    kept = activation_memory(toy_shape, ring, Training())
    # 2 blocks x 12 tokens a GPU x (q, k, v, output, merged output: 5 x D = 64 x bf16, + fp32 LSE of 2 heads).
    assert kept["ring attention kept"].bytes == 2 * 12 * (5 * 64 * 2 + 4 * 2)
    assert activation_memory(toy_shape, ulysses, Training()).keys() == kept.keys() - {"ring attention kept"}
    unchecked = dataclasses.replace(ring, checkpointing=False)
    assert "ring attention kept" not in activation_memory(toy_shape, unchecked, Training())
    # The config's attention reaches the plan.
    cfg = load_config("smoke", ["trainer.context_parallel.attention=ring"])
    assert config_workload(cfg, 3, 1, 8, 0.0).context_parallel_attention == "ring"
