"""No shipped ablation is a no-op: each differs from its baseline in what a run does, on the same input.

Every experiment tagged `ablation` is found in experiments/ (a new one is covered without editing this file). Its
baseline is the experiment it `extends:`; in a sweep, its members are compared with each other. Each config,
moved to the tiny Wan (`model=tiny data=toy trainer=cpu`, the experiment's own settings on top), is probed on one
fixed input: the guided velocity of Eq. 9 at one sampling step of a fixed r2s request (the DiT forward: positions,
LoRA rank, timesteps; and ω1, ω2), the training loss of a fixed toy batch (L_FM + λ·L_RACL) and the training groups
of a fixed manifest (data.sources). The LoRA gets fixed nonzero weights, since B = 0 at init would hide its rank.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dreamshot.config.load import EXPERIMENTS_DIR, available_experiments, load_config, load_runs, read_yaml
from dreamshot.config.schema import Config, DataConfig, ToyWorldConfig
from dreamshot.data.datamodule import StoryboardDataModule
from dreamshot.data.toyworld import ensure_toyworld
from dreamshot.diffusion.conditioning import BatchPlan
from dreamshot.inference.pipeline import StoryboardPipeline, StoryboardRequest, initial_noise
from dreamshot.training.module import DreamShotModule

# One CPU process: an experiment that splits its storyboards over a group (toy_long_storyboard) runs without it.
# A toy world of both sources: data_sources's members train on one of them (refused at load if it had none).
TINY = ["model=tiny", "data=toy", "data.toy.real_share=0.5", "trainer=cpu", "trainer.context_parallel.degree=1"]
ABLATIONS = [name for name in available_experiments() if "ablation" in load_runs(name, TINY)[0].tags]
# Two results are "the same" within float32 noise of a different summation order (a shifted RoPE index, say).
SAME = {"rtol": 1e-4, "atol": 1e-6}


@dataclass
class Probe:
    velocity: torch.Tensor
    loss: torch.Tensor
    train_groups: tuple[str, ...]

    def differences(self, other: Probe) -> list[str]:
        found = [
            name
            for name in ("velocity", "loss")
            if not torch.allclose(getattr(self, name), getattr(other, name), **SAME)
        ]
        return found + (["train_groups"] if self.train_groups != other.train_groups else [])


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablations")
    # Real and synthetic groups, so that data.sources changes the training set.
    manifest = ensure_toyworld(ToyWorldConfig(groups=8, real_share=0.5, max_shots=3, max_roles=2), root / "toyworld")
    data = DataConfig(manifest=str(manifest), val_groups=2)
    loader = StoryboardDataModule(data, root, seed=0)
    loader.setup("fit")
    batch = next(b for b in loader.train_dataloader() if b.num_refs > 1 and b.shot_masks.sum() > 0)
    g = torch.Generator().manual_seed(0)
    request = StoryboardRequest(
        ["Wide shot: <Role 1> and <Role 2>.", "Close-up: <Role 2>."],
        (32, 48),
        torch.rand(2, 3, 32, 48, generator=g) * 2 - 1,
        ["<Role 1>: a red star", "<Role 2>: a blue circle"],
    )
    cache: dict[tuple, object] = {}

    def cached(key: tuple, compute):
        # Sweep members share most of their settings: each part is computed once per settings it reads.
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    def module_for(cfg: Config) -> DreamShotModule:
        module = DreamShotModule(cfg)
        generator = torch.Generator().manual_seed(1)
        state = module.adapter.lora_state_dict()
        module.adapter.load_lora_state_dict(
            {k: torch.randn(v.shape, generator=generator) * 0.05 for k, v in sorted(state.items())}
        )
        return module

    def loss(module: DreamShotModule, racl_weight: float) -> torch.Tensor:
        plan = BatchPlan("r2s", 0, False, (False,) * batch.batch_size)
        return module.model_step(batch, plan, torch.Generator().manual_seed(0), racl_weight=racl_weight)["loss"]

    def velocity(module: DreamShotModule, cfg: Config) -> torch.Tensor:
        pipeline = StoryboardPipeline(module.adapter, cfg)
        noise = initial_noise(pipeline.latent_shape(request), 0)
        return pipeline.velocity(pipeline.encode(request), noise, torch.tensor(700.0))

    def train_groups(cfg: Config) -> tuple[str, ...]:
        groups = StoryboardDataModule(dataclasses.replace(cfg.data, manifest=str(manifest), val_groups=2), root, 0)
        groups.setup("fit")
        return tuple(record.id for record in groups.train_records)

    @torch.no_grad()
    def run(cfg: Config) -> Probe:
        racl = (tuple(cfg.racl_blocks()), cfg.racl.mask_threshold, cfg.racl.absent_negative)  # the weight: the loss
        model = (cfg.seed, repr(cfg.model), repr(cfg.storyboard), repr(cfg.diffusion), racl)
        module = cached(model, lambda: module_for(cfg))
        return Probe(
            velocity=cached((*model, repr(cfg.inference)), lambda: velocity(module, cfg)),
            loss=cached((*model, cfg.racl_weight(0)), lambda: loss(module, cfg.racl_weight(0))),
            train_groups=cached(("data", repr(cfg.data)), lambda: train_groups(cfg)),
        )

    return run


def test_ablations_are_found_in_the_experiment_files():
    assert {"pos_neg", "toy_pos_neg", "pos_phase", "pos_last", "racl_ablation", "toy_lora_rank"} <= set(ABLATIONS)


@pytest.mark.parametrize("experiment", ABLATIONS)
def test_every_ablation_differs_from_its_baseline_on_the_same_input(experiment, probe):
    runs = load_runs(experiment, TINY)
    if len(runs) > 1:
        probes = {cfg.name: probe(cfg) for cfg in runs}
        for (a, first), (b, second) in itertools.combinations(probes.items(), 2):
            assert first.differences(second), f"{a} and {b} do the same on the same input"
        return
    parent = read_yaml(Path(EXPERIMENTS_DIR) / f"{experiment}.yaml").get("extends")
    assert parent, f"{experiment}: an ablation names its baseline with `extends:` (or is a sweep)"
    (baseline,) = load_runs(parent, TINY)
    assert probe(runs[0]).differences(probe(baseline)), f"{experiment} does what {parent} does on the same input"


def test_neg_without_a_gap_is_the_baseline(probe):
    """What the test above measures: Neg-Pos without a gap only shifts every RoPE index by -K, which RoPE (relative
    positions) cannot see; the configured gap is what makes pos_neg an ablation."""
    (baseline,) = load_runs("toy_dreamshot", TINY)
    no_gap = load_config("toy_dreamshot", [*TINY, "storyboard.layout=neg", "storyboard.neg_offset=0"])
    assert probe(no_gap).differences(probe(baseline)) == []
    (with_gap,) = load_runs("toy_pos_neg", TINY)
    assert with_gap.storyboard.neg_offset > 0
    assert "velocity" in probe(with_gap).differences(probe(baseline))
