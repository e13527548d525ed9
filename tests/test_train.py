"""End-to-end training on the tiny Wan and the toy world: artifacts, logged metrics, resume."""

import csv
import json
import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from safetensors.torch import load_file

from dreamshot.config.load import load_config
from dreamshot.diffusion.conditioning import MODES
from dreamshot.training.module import DreamShotModule
from dreamshot.training.train import train

FAST = [
    "logger=csv",
    "data.toy.groups=4",
    "data.val_groups=1",
    "data.toy.max_shots=3",
    "data.toy.max_roles=2",
]


def _config(tmp_path, name, *overrides):
    return load_config("smoke", [*FAST, f"output_dir={tmp_path / name}", *overrides])


def _metric_names(out):
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        return set(next(csv.reader(f)))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    return train(
        _config(
            tmp,
            "run",
            "trainer.max_steps=3",
            "trainer.checkpoint_every_n_steps=3",
            "trainer.val_check_interval=3",
        )
    )


def test_checkpoint_holds_only_lora_weights(smoke_run):
    ckpt = torch.load(smoke_run / "checkpoints" / "last.ckpt", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert ckpt["global_step"] == 3 and ckpt["optimizer_states"]
    assert sum(ckpt["mix_counts"].get(f"mode_{m}", 0) for m in MODES) == 3


def test_exported_lora_matches_checkpoint(smoke_run):
    ckpt = torch.load(smoke_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    lora = load_file(smoke_run / "lora.safetensors")
    assert len(lora) == len(ckpt)
    for key, value in lora.items():
        # peft's exported names drop the adapter name ("default") that the live module carries.
        module_key = "adapter.transformer." + key.replace(".weight", ".default.weight")
        torch.testing.assert_close(ckpt[module_key], value)


def test_logged_metric_names(smoke_run):
    names = _metric_names(smoke_run)
    assert {"train/loss", "train/loss_fm", "val/loss", "val/loss_fm", "step"} <= names
    assert any(n.startswith("train/count_mode_") for n in names)
    # Every kind of condition dropout is counted, the joint drop (v_u of Eq. 9) included, even at 0.
    assert {f"train/count_drop_{kind}" for kind in ("refs", "text", "joint")} <= names


def test_role_mask_debug_image_is_written(smoke_run):
    from PIL import Image

    with Image.open(smoke_run / "debug" / "role_masks.png") as image:
        assert image.width > 256 and image.height > 100


def test_summary_and_saved_config(smoke_run):
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["loss_start"] > 0
    assert load_config(smoke_run / "config.yaml").trainer.max_steps == 3


def test_only_lora_parameters_train():
    module = DreamShotModule(load_config("smoke", FAST))
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(p.requires_grad for p in module.adapter.vae.parameters())
    assert not any(p.requires_grad for p in module.adapter.text_encoder.parameters())


def test_resume_with_safe_changes_continues_to_the_same_weights_and_records_them(tmp_path):
    # A constant learning rate (after a warm-up the resume interrupts) does not depend on the run's length.
    constant = ["optim.schedule=constant", "optim.warmup_steps=3"]
    straight = train(_config(tmp_path, "straight", "trainer.max_steps=4", *constant))
    train(_config(tmp_path, "resumed", "trainer.max_steps=2", *constant))
    # Longer, with other checkpoint, log and validation intervals: none changes a training step.
    safe = ["trainer.max_steps=4", "trainer.checkpoint_every_n_steps=1", "trainer.log_every_n_steps=3"]
    resumed = train(
        _config(tmp_path, "resumed", "trainer.ckpt_path=last", "trainer.val_check_interval=4", *constant, *safe)
    )
    ckpt = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    a, b = load_file(straight / "lora.safetensors"), load_file(resumed / "lora.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    (record,) = [json.loads(line) for line in (resumed / "resumes.jsonl").read_text().splitlines()]
    assert record["step"] == 2 and record["checkpoint"] == str(resumed / "checkpoints" / "last.ckpt")
    assert record["changed"] == {
        "trainer.max_steps": {"from": 2, "to": 4},
        "trainer.checkpoint_every_n_steps": {"from": 2, "to": 1},
        "trainer.log_every_n_steps": {"from": 1, "to": 3},
        "trainer.val_check_interval": {"from": 2, "to": 4},
    }
    assert load_config(resumed / "config.yaml").trainer.max_steps == 4
    names = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step000002.ckpt", "step000003.ckpt", "step000004.ckpt"]  # no "-v1" copies


def test_lora_dropout_draws_the_same_masks_resumed_and_whatever_the_validation(tmp_path):
    # Dropout draws from torch's global generator, which neither a checkpoint nor a validation pass may steer.
    run = ["model.lora.dropout=0.5", "optim.schedule=constant", "trainer.max_steps=4"]
    straight = train(_config(tmp_path, "straight", *run, "trainer.val_check_interval=100"))
    validated = [*run, "trainer.val_check_interval=1", "trainer.checkpoint_every_n_steps=2"]
    interrupted = train(_config(tmp_path, "resumed", *validated, "trainer.max_steps=2"))
    resumed = train(
        _config(tmp_path, "resumed", *validated, f"trainer.ckpt_path={interrupted / 'checkpoints' / 'last.ckpt'}")
    )
    a, b = load_file(straight / "lora.safetensors"), load_file(resumed / "lora.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


class MicroBatchLosses(L.Callback):
    """(storyboards, unscaled loss, the loss Lightning backpropagates) of every micro-batch, by optimizer step."""

    def __init__(self):
        self.by_step = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        micro = (batch.batch_size, float(pl_module._last_losses["loss"]), float(outputs["loss"]))
        self.by_step.setdefault(self.step, []).append(micro)


def test_under_gradient_accumulation_a_step_logs_and_summarises_the_mean_of_its_micro_batches(tmp_path):
    micro = MicroBatchLosses()
    run = [
        "data.toy.groups=5",
        "trainer.max_steps=2",
        "trainer.accumulate_grad_batches=2",
        "trainer.log_every_n_steps=1",
    ]
    out = train(_config(tmp_path, "run", *run), [micro])
    means = {step: sum(loss for _, loss, _ in losses) / len(losses) for step, losses in micro.by_step.items()}
    assert [len(losses) for losses in micro.by_step.values()] == [2, 2]
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        logged = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]}
    assert logged == pytest.approx(means, rel=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss_window"] == 1
    assert summary["loss_start"] == pytest.approx(means[0], rel=1e-6)
    assert summary["loss_end"] == pytest.approx(means[1], rel=1e-6)


def test_under_gradient_accumulation_a_step_weighs_its_micro_batches_by_their_storyboards(tmp_path):
    # Batches of 2 from buckets of odd sizes: some steps have a micro-batch of 2 and one of 1. The gradient is
    # linear in the backpropagated losses, so their sum being the mean over the step's storyboards makes the
    # step's gradient that of one big batch (not the mean of the micro-batches' means).
    shares = MicroBatchLosses()
    run = ["data.toy.groups=6", "data.batch_size=2", "trainer.max_steps=3", "trainer.accumulate_grad_batches=2"]
    out = train(_config(tmp_path, "run", *run, "trainer.log_every_n_steps=1"), [shares])
    means = {}
    for step, micro in shares.by_step.items():
        means[step] = sum(n * loss for n, loss, _ in micro) / sum(n for n, _, _ in micro)
        assert sum(backpropagated for _, _, backpropagated in micro) == pytest.approx(means[step], rel=1e-5)
    assert any(len({n for n, _, _ in micro}) > 1 for micro in shares.by_step.values())
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        logged = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]}
    assert logged == pytest.approx(means, rel=1e-6)


def test_every_optimizer_step_accumulates_as_many_micro_batches_also_across_a_data_pass(tmp_path):
    # 3 training groups of one bucket each: a pass of 3 batches would end in a step of 1 micro-batch.
    micro = MicroBatchLosses()
    train(_config(tmp_path, "run", "trainer.max_steps=3", "trainer.accumulate_grad_batches=2"), [micro])
    assert [len(losses) for losses in micro.by_step.values()] == [2, 2, 2]


class ValidationSteps(L.Callback):
    def __init__(self):
        self.steps = []

    def on_validation_start(self, trainer, pl_module):
        self.steps.append(trainer.global_step)


def test_validation_runs_every_n_optimizer_steps_under_gradient_accumulation(tmp_path):
    validations = ValidationSteps()
    run = ["trainer.max_steps=4", "trainer.accumulate_grad_batches=2", "trainer.val_check_interval=2"]
    train(_config(tmp_path, "run", *run), [validations])
    assert validations.steps == [2, 4]


def test_the_last_step_is_checkpointed_when_it_is_no_multiple_of_the_interval(tmp_path):
    out = train(_config(tmp_path, "run", "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=2"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt", "step000002.ckpt"]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_without_a_curriculum_every_data_pass_is_logged_as_the_one_phase(tmp_path):
    out = train(_config(tmp_path, "run", "trainer.max_steps=4"))  # 3 training groups: step 3 is in the 2nd pass
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["train/phase"]]
    assert {r["epoch"] for r in rows} == {"0", "1"}
    assert {float(r["train/phase"]) for r in rows} == {0.0}


def test_reference_tokens_get_timestep_zero(smoke_run):
    cfg = load_config("smoke", FAST)
    module = DreamShotModule(cfg)
    seen = []
    module.adapter.transformer.condition_embedder.timesteps_proj.register_forward_hook(
        lambda mod, args, out: seen.append(args[0].detach().clone())
    )
    from dreamshot.data.datamodule import StoryboardDataModule
    from dreamshot.diffusion.conditioning import BatchPlan

    dm = StoryboardDataModule(cfg.data, smoke_run, cfg.seed)
    dm.setup("fit")
    batch = next(b for b in dm.train_dataloader() if b.num_refs > 0)
    module.model_step(batch, BatchPlan("r2s", 0, False, (False,) * batch.batch_size), torch.Generator().manual_seed(0))
    timesteps = seen[-1].view(batch.batch_size, -1)
    tokens = timesteps.shape[1] // (batch.num_refs + batch.num_shots)
    assert (timesteps[:, : batch.num_refs * tokens] == 0).all()
    assert (timesteps[:, batch.num_refs * tokens :] > 0).all()


def test_s2s_given_shots_stay_clean_and_out_of_the_loss(smoke_run):
    from dreamshot.data.datamodule import StoryboardDataModule
    from dreamshot.diffusion.conditioning import BatchPlan

    cfg = load_config("smoke", FAST)
    module = DreamShotModule(cfg)
    dm = StoryboardDataModule(cfg.data, smoke_run, cfg.seed)
    dm.setup("fit")
    batch = next(b for b in dm.train_dataloader() if b.num_shots >= 2)
    clean = module.adapter.encode_storyboard(batch.shots, batch.refs, batch.shot_texts, batch.ref_texts).shots
    fed, predict = [], module.adapter.predict_velocity

    def spy(latents, timesteps, text, layout, capture=None, offset=0.0):
        fed.append(latents.clone())
        out = predict(latents, timesteps, text, layout, capture)
        out[:, :, ~layout.target_frames()] += offset  # change the prediction on the clean frames only
        return out

    plan = BatchPlan("s2s", 1, False, (False,) * batch.batch_size)
    module.adapter.predict_velocity = spy
    base = module.model_step(batch, plan, torch.Generator().manual_seed(0))["loss"]
    module.adapter.predict_velocity = lambda *a: spy(*a, offset=50.0)
    shifted = module.model_step(batch, plan, torch.Generator().manual_seed(0))["loss"]
    assert torch.equal(fed[0][:, :, :1], clean[:, :, :1])  # the given shot enters clean
    assert not torch.equal(fed[0][:, :, 1:], clean[:, :, 1:])  # the rest is noised
    assert torch.equal(base, shifted)


def test_lightning_product_tips_are_dropped_and_other_messages_kept(caplog):
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: try a product")
        rank_zero_info("GPU available: False, used: False")
    assert [record.getMessage() for record in caplog.records] == ["GPU available: False, used: False"]
