"""The two-phase curriculum inside one run, resume across the phase switch, and RACL in training."""

import csv
import dataclasses

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from dreamshot.config.load import load_config
from dreamshot.data.datamodule import StoryboardDataModule
from dreamshot.diffusion import racl as racl_module
from dreamshot.diffusion.conditioning import BatchPlan
from dreamshot.training.module import DreamShotModule
from dreamshot.training.train import train

CURRICULUM = [
    "logger=csv",
    "data.toy.groups=5",
    "data.val_groups=1",
    "data.toy.max_shots=3",
    "data.toy.max_roles=2",
    "racl.weight=0.5",
    "trainer.max_steps=4",
    "trainer.checkpoint_every_n_steps=1",
    "trainer.val_check_interval=2",
    "curriculum=[{steps: 2, resolution: [64, 112], use_racl: true},"
    " {steps: 2, resolution: [80, 128], use_racl: false}]",
]


class Record(L.Callback):
    """Remembers (step, batch resolution, λ) of every training batch; stops the run after `stop_at` steps."""

    def __init__(self, stop_at=None):
        self.seen, self.stop_at = [], stop_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, tuple(batch.shots.shape[-2:]), pl_module.racl_weight))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


def _cfg(tmp_path, name, *extra):
    return load_config("smoke", [*CURRICULUM, f"output_dir={tmp_path / name}", *extra])


def test_phases_switch_resolution_and_racl_in_one_run(tmp_path):
    record = Record()
    out = train(_cfg(tmp_path, "run"), [record])
    assert record.seen == [(0, (64, 112), 0.5), (1, (64, 112), 0.5), (2, (80, 128), 0.0), (3, (80, 128), 0.0)]
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    racl_steps = {int(r["step"]) for r in rows if r.get("train/loss_racl")}
    assert racl_steps and max(racl_steps) < 2  # RACL only in phase 1
    assert any(r.get("val/racl_in_mask") for r in rows)  # the diagnostic is logged in validation


@pytest.mark.parametrize("stop_at", [1, 2])  # mid-phase, and exactly at the phase switch
def test_resume_continues_in_the_right_phase(tmp_path, stop_at):
    straight = train(_cfg(tmp_path, "straight"))
    first = Record(stop_at=stop_at)
    interrupted = train(_cfg(tmp_path, "resumed"), [first])
    resumed = Record()
    ckpt = interrupted / "checkpoints" / f"step{stop_at:06d}.ckpt"
    train(_cfg(tmp_path, "resumed", f"trainer.ckpt_path={ckpt}"), [resumed])
    assert [s[0] for s in first.seen] == list(range(stop_at))
    assert resumed.seen == [
        (step, (64, 112) if step < 2 else (80, 128), 0.5 if step < 2 else 0.0) for step in range(stop_at, 4)
    ]
    a, b = load_file(straight / "lora.safetensors"), load_file(interrupted / "lora.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def _toy_batch(cfg, out):
    dm = StoryboardDataModule(cfg.data, out, cfg.seed)
    dm.setup("fit")
    return next(b for b in dm.train_dataloader() if b.num_refs > 1 and b.shot_masks.sum() > 0)


def test_zero_weight_captures_nothing(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "zero", "racl.weight=0")
    module = DreamShotModule(cfg)
    batch = _toy_batch(cfg, tmp_path)
    calls = []
    original = racl_module.role_attention_maps
    monkeypatch.setattr(
        "dreamshot.models.wan.role_capture.role_attention_maps", lambda *a: calls.append(1) or original(*a)
    )
    plan = BatchPlan("r2s", 0, False, (False,))
    losses = module.model_step(batch, plan, torch.Generator().manual_seed(0), racl_weight=0.0)
    assert not calls and set(losses) == {"loss", "loss_fm"}
    losses = module.model_step(batch, plan, torch.Generator().manual_seed(0), racl_weight=0.5)
    assert calls and losses["loss"] > losses["loss_fm"] and losses["loss_racl"] > 0


def test_validation_noise_follows_the_storyboards_not_their_place_or_rank(tmp_path, monkeypatch):
    # A rank validates every n-th batch of the set: val/loss of the same weights must not depend on the devices.
    cfg = _cfg(tmp_path, "val")
    module = DreamShotModule(cfg)
    batch = _toy_batch(cfg, tmp_path)
    logged = []
    monkeypatch.setattr(module, "log_dict", lambda values, **kwargs: logged.append(float(values["val/loss"])))
    module.validation_step(batch, 0)
    module._trainer = type("Trainer", (), {"distributed_sampler_kwargs": {"num_replicas": 2, "rank": 1}})()
    module.validation_step(batch, 3)
    assert logged[0] == logged[1]


def test_a_repeated_validation_batch_weighs_nothing_in_val_metrics(tmp_path, monkeypatch):
    # The sampler pads the ranks' shares with repeats; weighed like the others they would count twice in val/*.
    cfg = _cfg(tmp_path, "val")
    module = DreamShotModule(cfg)
    batch = _toy_batch(cfg, tmp_path)
    weights = []
    monkeypatch.setattr(module, "log_dict", lambda values, batch_size, sync_dist: weights.append(batch_size))
    module.validation_step(batch, 0)
    module.validation_step(dataclasses.replace(batch, repeat=True), 1)
    # Floats: Lightning floors the mean over the ranks of an integer sum of batch sizes (the 2-process twin tells).
    assert weights == [batch.batch_size, 0] and all(isinstance(weight, float) for weight in weights)


def test_racl_steps_raise_the_in_mask_share(tmp_path):
    cfg = _cfg(tmp_path, "learn", "model.lora.rank=16")
    torch.manual_seed(0)
    module = DreamShotModule(cfg)
    batch = _toy_batch(cfg, tmp_path)
    plan = BatchPlan("r2s", 0, False, (False,))
    optimizer = torch.optim.AdamW(module.adapter.trainable_parameters(), lr=1e-2)

    def share():
        with torch.no_grad():
            return module.model_step(batch, plan, torch.Generator().manual_seed(0), diagnostic=True)["racl_in_mask"]

    before = share()
    for _ in range(12):
        # Fixed noise: the test isolates what the RACL gradient does to the attention, not FM noise.
        losses = module.model_step(batch, plan, torch.Generator().manual_seed(0), racl_weight=1.0)
        optimizer.zero_grad()
        (losses["loss"] - losses["loss_fm"]).backward()  # the RACL term alone
        optimizer.step()
    after = share()
    assert after > before + 0.15, (before, after)


def test_a_racl_step_runs_under_bf16_autocast(tmp_path, bce_refused_in_autocast):
    """`trainer=ddp` (bf16-mixed without DeepSpeed) runs the training step in autocast, where CUDA refuses
    binary_cross_entropy ("unsafe to autocast"); CPU's autocast allows it, so the test refuses it as CUDA does."""
    cfg = _cfg(tmp_path, "autocast")
    module = DreamShotModule(cfg)
    batch = _toy_batch(cfg, tmp_path)
    plan = BatchPlan("r2s", 0, False, (False,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = module.model_step(batch, plan, torch.Generator().manual_seed(0), racl_weight=0.5)
    assert torch.isfinite(losses["loss"]) and losses["loss_racl"] > 0
    losses["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.adapter.trainable_parameters())
