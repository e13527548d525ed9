"""Trainer strategies: every shipped trainer option builds a strategy DeepSpeed / Lightning accept, impossible
combinations are config errors, and a DeepSpeed ZeRO-2 / ZeRO-3 run keeps nothing frozen in its checkpoints,
writes its LoRA as the fp32 master weights of its bf16 mode, exports it without a conversion step and (ZeRO-2)
encodes its shots with the float32 VAE, from pixels its bf16 mode left as loaded; a step regresses the float32
latents as under DDP.

The DeepSpeed runs are subprocesses executing this file (`python tests/test_strategy.py STAGE OUT [--cpu]`), so
DeepSpeed's process group and environment variables never leak into the test process. On a CUDA machine they
are the real thing (`gpu`); `--cpu` runs the same training through DeepSpeed's CPU accelerator (gloo) by
lifting Lightning's CUDA-only guard, which checks everything but the CUDA kernels (`slow`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from deepspeed.runtime.config import DeepSpeedConfig
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from safetensors.torch import load_file

from dreamshot.cli import main
from dreamshot.config.load import group_options, load_config
from dreamshot.config.schema import STRATEGIES
from dreamshot.data.bucketing import StoryboardBatch
from dreamshot.diffusion.conditioning import BatchPlan
from dreamshot.diffusion.flow_matching import velocity_target
from dreamshot.inference.loading import _module_lora
from dreamshot.training.callbacks import CHECKPOINT_LORA_KEY, EXPORT_FILES, gathered_lora
from dreamshot.training.ema import LoraEma
from dreamshot.training.module import DreamShotModule
from dreamshot.training.strategy import (
    DEEPSPEED_BUCKET_ELEMENTS,
    LoraDeepSpeedStrategy,
    build_strategy,
    keep_trainable_weights,
    weights_kept,
)
from dreamshot.training.train import build_trainer
from dreamshot.utils.errors import ConfigError

FAST = ["logger=csv", "data.toy.groups=4", "data.val_groups=1", "data.toy.max_shots=3", "data.toy.max_roles=2"]


def _trainer(*overrides):
    return load_config("smoke", [*FAST, *overrides]).trainer


# --- construction and validation ----------------------------------------------------------------------------


def test_shipped_trainer_options_build():
    options = group_options("trainer")
    built = {option: build_strategy(_trainer(f"trainer={option}"), micro_batch=1) for option in options}
    assert built["cpu"] == "auto"
    for option, stage in (("gpu", 2), ("zero3", 3)):
        assert isinstance(built[option], LoraDeepSpeedStrategy)
        assert built[option].config["zero_optimization"]["stage"] == stage
    for option in ("ddp", "ddp_cpu"):
        assert isinstance(built[option], DDPStrategy) and built[option]._start_method == "popen"
    assert _trainer("trainer=gpu").precision == "bf16-mixed" and _trainer("trainer=gpu").gradient_checkpointing


# The shipped trainer option of each ZeRO stage.
TRAINER_OF_STAGE = {2: "gpu", 3: "zero3"}


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_config_is_valid_for_deepspeed(stage):
    strategy = build_strategy(_trainer(f"trainer={TRAINER_OF_STAGE[stage]}"), micro_batch=2)
    assert isinstance(strategy, DeepSpeedStrategy)
    # Checkpoints must not hold the frozen backbone.
    assert strategy.exclude_frozen_parameters
    zero = strategy.config["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == DEEPSPEED_BUCKET_ELEMENTS
    # What Lightning adds before deepspeed.initialize (accumulation, precision), parsed by DeepSpeed itself.
    parsed = DeepSpeedConfig({**strategy.config, "gradient_accumulation_steps": 3, "bf16": {"enabled": True}})
    assert parsed.zero_optimization_stage == stage and parsed.train_batch_size == 2 * 3


def test_ddp_strategy_settings():
    spawn = build_strategy(_trainer("trainer=ddp_cpu", "trainer.strategy=ddp_spawn"), micro_batch=1)
    assert isinstance(spawn, DDPStrategy) and spawn._start_method == "spawn"
    assert spawn._ddp_kwargs == {
        "find_unused_parameters": False,
        "gradient_as_bucket_view": True,
        "forward_sync_buffers": False,
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.strategy=deepspeed_stage_2"], "runs on CUDA GPUs only: set trainer.accelerator=gpu"),
        (["trainer=gpu", "trainer.accelerator=cpu"], "runs on CUDA GPUs only"),
        (["trainer.strategy=fsdp"], f"trainer.strategy must be one of {', '.join(STRATEGIES)}"),
        (["trainer=ddp_cpu", "trainer.devices=0"], "trainer.devices must be >= 1"),
        (["trainer.num_nodes=0"], "trainer.num_nodes must be >= 1"),
        (["trainer=gpu", "trainer.strategy=deepspeed_stage_3"], "trainer.compile_blocks is not supported with"),
        *(
            (setting, f"trainer.precision={precision} with trainer.strategy={strategy} trains the LoRA in 16 bits")
            for precision in ("bf16-true", "16-true")
            for strategy, setting in (
                ("auto", [f"trainer.precision={precision}"]),
                ("ddp", ["trainer=ddp", "trainer.accelerator=cpu", f"trainer.precision={precision}"]),
                ("ddp_spawn", ["trainer=ddp_cpu", "trainer.strategy=ddp_spawn", f"trainer.precision={precision}"]),
            )
        ),
        *(
            (["trainer=gpu", "trainer.strategy=deepspeed_stage_3", "trainer.compile_blocks=false", setting], key)
            for setting, key in (
                ("trainer.sample.every_n_steps=2", "trainer.sample.every_n_steps is not supported with"),
                ("eval.callback.enabled=true", "eval.callback.enabled is not supported with"),
            )
        ),
    ],
)
def test_impossible_trainer_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", overrides)


@pytest.mark.parametrize("option", ["gpu", "zero3"])
def test_deepspeed_takes_half_true_precision(option):
    """DeepSpeed keeps fp32 masters of the LoRA whatever the precision's name (`_check_half_weights`)."""
    assert _trainer(f"trainer={option}", "trainer.precision=bf16-true").precision == "bf16-true"


def test_zero3_keeps_an_average_of_the_weights():
    """Each ZeRO-3 rank averages its own partition of each master weight (`training/ema.py`)."""
    zero3 = ["trainer=gpu", "trainer.strategy=deepspeed_stage_3", "trainer.compile_blocks=false"]
    assert load_config("smoke", [*zero3, "optim.ema_decay=0.9"]).optim.ema_decay == 0.9


def test_checkpointed_state_keeps_only_trainable_weights():
    module = DreamShotModule(load_config("smoke", FAST))
    trainable = module.lora_keys()
    # umT5's encoder.embed_tokens is a tied alias of its `shared` embedding: named_parameters() does not list
    # it, so DeepSpeed's exclude_frozen_parameters alone would keep it.
    listed = {name for name, _ in module.named_parameters()}
    assert "adapter.text_encoder.encoder.embed_tokens.weight" in set(module.state_dict()) - listed
    module.register_state_dict_post_hook(keep_trainable_weights)
    assert set(module.state_dict()) == trainable


def test_weights_kept_undoes_a_cast_without_its_rounding():
    """What ZeRO-2 does to the VAE after DeepSpeed's bf16 cast: the float32 weights come back as they were, not
    bf16-rounded, and stay the same parameters (nothing that holds them is left behind)."""
    module = torch.nn.Linear(8, 8)
    before = [parameter.detach().clone() for parameter in module.parameters()]
    parameters = list(module.parameters())
    assert any(not torch.equal(weight, weight.bfloat16().float()) for weight in before)
    with weights_kept(module):
        for parameter in module.parameters():
            parameter.data = parameter.data.bfloat16()  # as the engine's `_cast_module_mixed_precision`
    assert all(now is then for now, then in zip(module.parameters(), parameters, strict=True))
    assert all(p.dtype == torch.float32 and torch.equal(p, b) for p, b in zip(parameters, before, strict=True))


# --- the batch under DeepSpeed's bf16 mode -------------------------------------------------------------------


def _pixel_batch(shots: int = 2, refs: int = 1, size: tuple[int, int] = (32, 32)) -> StoryboardBatch:
    """One storyboard of 8-bit images, as the loader decodes them (most levels are no bf16 value)."""
    g = torch.Generator().manual_seed(0)

    def images(count: int) -> torch.Tensor:
        return torch.randint(0, 256, (1, count, 3, *size), generator=g) / 127.5 - 1

    return StoryboardBatch(
        ids=["ds"],
        sources=["synthetic"],
        shots=images(shots),
        shot_texts=[[f"shot {n}" for n in range(shots)]],
        refs=images(refs),
        ref_texts=[[f"role {k}" for k in range(refs)]],
        ref_masks=torch.zeros(1, refs, *size),
        shot_masks=torch.zeros(1, shots, refs, *size),
    )


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "encoded"])
def test_deepspeed_bf16_regresses_the_float32_latents(tmp_path, monkeypatch, cached):
    """A ZeRO-2 step as the Trainer of `trainer=gpu` runs it: the batch through the Trainer's precision plugin, the
    module cast to bf16 as DeepSpeed's bf16 mode casts it (no autocast), the VAE given its float32 weights back. The
    target the loss regresses is ε − z_0 of the stored float32 latents (or of the float32 pixels' float32 encoding),
    exactly as under DDP: Lightning's own DeepSpeedPrecision rounds the batch to bf16 first (z_0 up to 2^-9 off)."""
    cfg = load_config("smoke", [*FAST, "trainer=gpu", "trainer.compile_blocks=false", f"output_dir={tmp_path}"])
    # The config refuses DeepSpeed on CPU; Lightning builds its Trainer all the same (devices are checked at setup).
    cfg.trainer.accelerator, cfg.trainer.devices = "cpu", 1
    trainer = build_trainer(cfg, tmp_path, [CSVLogger(tmp_path)])
    module = DreamShotModule(cfg)
    batch = _pixel_batch()
    stored = module.adapter.encode_storyboard(batch.shots, batch.refs, batch.shot_texts, batch.ref_texts)
    if cached:  # as `dreamshot cache` stores them: float32 latents and texts, no images
        batch = dataclasses.replace(batch, shots=None, refs=None, latents=stored)
    with weights_kept(module.adapter.vae):  # as `LoraDeepSpeedStrategy.setup` around the engine's cast
        module.to(torch.bfloat16)
    module.trainer = trainer  # attached, as in a run
    targets = []

    def recorded_target(clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        targets.append((clean, noise))
        return velocity_target(clean, noise)

    monkeypatch.setattr("dreamshot.training.module.velocity_target", recorded_target)

    batch = trainer.precision_plugin.convert_input(batch)
    plan = BatchPlan("r2s", 0, False, (False,))
    loss = module.model_step(batch, plan, torch.Generator().manual_seed(0))["loss"]

    ((clean, noise),) = targets
    assert torch.isfinite(loss)
    assert clean.dtype == noise.dtype == torch.float32 and torch.equal(clean, stored.shots)
    exact = noise.double() - stored.shots.double()
    torch.testing.assert_close(velocity_target(clean, noise).double(), exact, rtol=2**-24, atol=0)


# --- the GPU throughput benchmark, dry run ------------------------------------------------------------------


def test_throughput_benchmark_dry_run_on_cpu(monkeypatch, capsys):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--tiny", "--device", "cpu", "--steps", "1"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "8 shots + 3 references" in out and "308 video + 352 text tokens" in out
    for line in ("matmul peak (measured)", "tokens/s", "model FLOPs per step", "MFU", "planned"):
        assert line in out
    (row,) = [row for row in out.splitlines() if row.startswith("tokens/s")]
    tokens_per_second = float(row.split()[1].replace(",", ""))
    assert tokens_per_second > 0


def test_throughput_benchmark_profiles_on_every_rank_and_only_the_first_writes(monkeypatch, capsys, tmp_path):
    # Under torchrun a profiled step runs the group's all-to-alls: a rank that skipped it would leave rank 0 waiting.
    from dreamshot.models.wan.context_parallel import ContextParallel

    class SecondRank(ContextParallel):
        rank = 1

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = importlib.import_module("train_throughput")
    profiled, profile_step = [], bench.profile_step
    monkeypatch.setattr(bench, "profile_step", lambda *args: profiled.append(args[2]) or profile_step(*args))
    path = tmp_path / "profile.txt"
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--tiny", "--device", "cpu", "--steps", "1"])
    args = bench.parse_args()
    args.profile = path
    bench.measure(args, torch.device("cpu"), SecondRank())
    assert profiled == [None] and not path.exists() and capsys.readouterr().out == ""


# --- real DeepSpeed runs ------------------------------------------------------------------------------------

STEPS = 2
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
RUNS = [
    pytest.param(stage, device, marks=[pytest.mark.slow] if device == "cpu" else [pytest.mark.gpu, CUDA])
    for device in ("cpu", "cuda")
    for stage in (2, 3)
]


# Beside the run folder: what the VAE's encoder ran in during the run's training steps (`VaeEncodes`).
VAE_ENCODES = "vae_encodes.json"


class VaeEncodes(L.Callback):
    """Records, for every training-time run of the VAE's encoder, the dtype of its weights and of its input, and
    whether its weights and its input (the pixels) hold more than bf16 precision (False where a bf16 cast rounded
    them)."""

    def __init__(self) -> None:
        self.runs: list[dict] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: DreamShotModule) -> None:
        def record(module: torch.nn.Module, args: tuple, output) -> None:
            if trainer.training:
                weights = list(module.parameters())
                self.runs.append(
                    {
                        "weights": str(weights[0].dtype),
                        "input": str(args[0].dtype),
                        # ZeRO-3 has released its gathered weights by now (empty): nothing to compare there.
                        "unrounded": any(w.numel() and not _bf16_valued(w) for w in weights),
                        "unrounded_input": not _bf16_valued(args[0]),
                    }
                )

        pl_module.adapter.vae.encoder.register_forward_hook(record)


def _bf16_valued(x: torch.Tensor) -> bool:
    return torch.equal(x, x.bfloat16().to(x.dtype))


# The decay of the runs' `optim.ema_decay`.
EMA_DECAY = 0.5


class MastersAndEma(L.Callback):
    """Records the LoRA's fp32 master weights (peft names, as DeepSpeed assembles them from the ranks' partitions:
    every rank takes part) when training starts and after every optimizer step, how many elements of each weight
    this rank's `LoraEma` averages, the trainable weights ZeRO-3 keeps whole on every rank (persistent), and the
    module's (bf16) LoRA once training has ended; each rank writes them to
    `<folder>/masters_rank<R>.pt`. After the run's own callbacks: the EMA has started, and at the end it has put
    the average in place but kept its state."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.masters: list[dict[str, torch.Tensor]] = []
        self._step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: DreamShotModule) -> None:
        self.masters, self._step = [gathered_lora(trainer, pl_module.adapter)], trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: DreamShotModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._step:
            self.masters.append(gathered_lora(trainer, pl_module.adapter))
            self._step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: DreamShotModule) -> None:
        (ema,) = (callback for callback in trainer.callbacks if isinstance(callback, LoraEma))
        averaged = {name: value.numel() for name, value in ema.average.items()}
        module = _module_copies(pl_module)
        persistent = [name for name, p in pl_module.named_parameters() if p.requires_grad and _persistent(p)]
        path = self.folder / f"masters_rank{trainer.global_rank}.pt"
        record = {"masters": self.masters, "averaged": averaged, "module": module, "persistent": persistent}
        torch.save(record, path)


def _persistent(parameter: torch.nn.Parameter) -> bool:
    """ZeRO-3 keeps the weight whole on every rank (below `stage3_param_persistence_threshold`)."""
    return getattr(parameter, "ds_persist", False)


def _module_copies(pl_module: DreamShotModule) -> dict[str, torch.Tensor]:
    """The module's LoRA weights (peft names), gathered where ZeRO-3 has partitioned them (every rank takes part)."""
    from deepspeed.runtime.zero import GatheredParameters

    trainable = {name: p for name, p in pl_module.adapter.transformer.named_parameters() if p.requires_grad}
    with GatheredParameters(list(trainable.values())):  # a no-op for weights DeepSpeed has not partitioned
        return pl_module.adapter.lora_state_dict({name: p.detach().clone() for name, p in trainable.items()})


def _recorded(folder: Path) -> list[dict]:
    """What `MastersAndEma` wrote into `folder`, rank 0's first."""
    return [torch.load(path, weights_only=True) for path in sorted(folder.glob("masters_rank*.pt"))]


def _ema_of(masters: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The EMA of the recorded masters in float64: starting at the first, then one update per optimizer step."""
    average = {key: value.double() for key, value in masters[0].items()}
    for step in masters[1:]:
        average = {key: EMA_DECAY * value + (1 - EMA_DECAY) * step[key].double() for key, value in average.items()}
    return average


def assert_is_the_masters_ema(found: dict[str, torch.Tensor], masters: list[dict[str, torch.Tensor]]) -> None:
    """`found` (float32) is the EMA of the fp32 masters, to float32's precision: an average of their bf16 copies is
    off by their rounding (2^-9 relative), and misses the updates below bf16's resolution."""
    expected = _ema_of(masters)
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert found[key].dtype == torch.float32
        torch.testing.assert_close(
            found[key].double(), value, rtol=1e-6, atol=1e-9, msg=lambda m, key=key: f"{key}: {m}"
        )


def assert_holds_the_average(module: dict[str, torch.Tensor], average: dict[str, torch.Tensor]) -> None:
    """The module's bf16 LoRA is the (float32) average, rounded."""
    assert module.keys() == average.keys()
    for key, value in average.items():
        assert module[key].dtype == torch.bfloat16 and torch.equal(module[key], value.bfloat16()), key


def _train_with_deepspeed(stage: int, out: Path, on_cpu: bool) -> None:
    from dreamshot.config.load import to_yaml
    from dreamshot.training import train as train_module
    from dreamshot.utils.io import atomic_write_text

    cfg = load_config(
        "smoke",
        [
            *FAST,
            f"trainer={TRAINER_OF_STAGE[stage]}",
            "trainer.devices=1",
            f"trainer.max_steps={STEPS}",
            f"trainer.checkpoint_every_n_steps={STEPS}",
            "trainer.val_check_interval=100",
            f"output_dir={out}",
            # The average (of the fp32 masters, each rank its fragment) replaces the master weights at the end.
            f"optim.ema_decay={EMA_DECAY}",
        ],
    )
    gpu_config = to_yaml(cfg)

    def build(trainer, micro_batch):
        strategy = build_strategy(trainer, micro_batch)
        # Partition even the tiny model's weights, so ZeRO-3 really gathers them.
        strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        if on_cpu:
            _run_on_deepspeeds_cpu_accelerator(strategy)
        return strategy

    train_module.build_strategy = build
    if on_cpu:
        cfg.trainer.accelerator = "cpu"
    encodes = VaeEncodes()
    train_module.train(cfg, callbacks=[encodes, MastersAndEma(out.parent)])
    # The run's config as a GPU run writes it (the CPU emulation changed the accelerator).
    atomic_write_text(out / "config.yaml", gpu_config)
    atomic_write_text(out.parent / VAE_ENCODES, json.dumps(encodes.runs))


def _run_on_deepspeeds_cpu_accelerator(strategy: DeepSpeedStrategy) -> None:
    """Lift Lightning's CUDA-only guards; DeepSpeed itself runs on its CPU accelerator with gloo."""
    import lightning.pytorch.strategies.deepspeed as lightning_deepspeed
    from lightning.pytorch.strategies import DDPStrategy

    lightning_deepspeed._validate_device_index_selection = lambda devices: None

    class OnCpu(type(strategy)):
        @property
        def root_device(self) -> torch.device:
            # DeepSpeed reads the device index; CPU devices have none.
            return torch.device("cpu", self.local_rank)

        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)

    strategy.__class__ = OnCpu


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    """Run folders of the DeepSpeed trainings, made on first use, keyed by (stage, device)."""
    runs: dict[tuple[int, str], Path] = {}

    def run(stage: int, device: str) -> Path:
        if (stage, device) not in runs:
            out = tmp_path_factory.mktemp(f"zero{stage}_{device}") / "run"
            command = [sys.executable, __file__, str(stage), str(out), *(["--cpu"] if device == "cpu" else [])]
            env = {**os.environ, "WANDB_MODE": "disabled"}
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stderr[-3000:]
            runs[stage, device] = out
        return runs[stage, device]

    return run


def _model_states(checkpoint_dir: Path) -> dict:
    (states,) = (checkpoint_dir / "checkpoint").glob("*mp_rank_00_model_states.pt")
    return torch.load(states, map_location="cpu", weights_only=True)


@pytest.mark.parametrize(("stage", "device"), RUNS)
def test_deepspeed_checkpoint_holds_lora_only(deepspeed_runs, stage, device):
    run = deepspeed_runs(stage, device)
    states = _model_states(run / "checkpoints" / "last.ckpt")
    assert states["global_step"] == STEPS
    lora_keys = {name for name in states["module"] if ".lora_" in name}
    assert lora_keys and set(states["module"]) == lora_keys
    assert not states["frozen_param_fragments"]
    gathered = states[CHECKPOINT_LORA_KEY]
    assert any(value.abs().sum() > 0 for key, value in gathered.items() if ".lora_B." in key), "LoRA never trained"


def _fp32_masters(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The LoRA's fp32 master weights (peft names) as DeepSpeed itself rebuilds them from the optimiser partitions
    of a checkpoint folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    masters = get_fp32_state_dict_from_zero_checkpoint(
        str(checkpoint_dir), tag="checkpoint", exclude_frozen_parameters=True
    )
    return _module_lora(masters)


@pytest.mark.parametrize(("stage", "device"), RUNS)
def test_deepspeed_lora_copies_hold_the_fp32_master_weights(deepspeed_runs, stage, device):
    """DeepSpeed's bf16 mode trains fp32 master weights in its optimiser and keeps bf16-rounded copies in the
    module: the checkpoint's gathered LoRA holds the masters, and the run's files their average (optim.ema_decay),
    which replaced the masters at the end."""
    run = deepspeed_runs(stage, device)
    last = run / "checkpoints" / "last.ckpt"
    states, masters = _model_states(last), _fp32_masters(last)
    module = _module_lora(states["module"])
    assert module.keys() == masters.keys() and all(value.dtype == torch.bfloat16 for value in module.values())
    assert any(not torch.equal(master, master.bfloat16().float()) for master in masters.values()), "no bf16 rounding"
    gathered = states[CHECKPOINT_LORA_KEY]
    assert gathered.keys() == masters.keys()
    assert all(gathered[key].dtype == torch.float32 and torch.equal(gathered[key], masters[key]) for key in masters)
    expected = _module_lora(states["callbacks"][LoraEma.__qualname__]["average"])
    exported = load_file(run / EXPORT_FILES["peft"])
    assert exported.keys() == expected.keys()
    assert all(exported[key].dtype == torch.float32 and torch.equal(exported[key], expected[key]) for key in expected)


@pytest.mark.parametrize(("stage", "device"), RUNS)
def test_deepspeed_ema_averages_the_fp32_masters(deepspeed_runs, stage, device):
    """Under DeepSpeed's bf16 mode the average follows the fp32 masters, not the module's bf16 copies of them: the
    run's LoRA file (the average at the end) and its last checkpoint's average are the EMA of the masters recorded
    after every step, and the module's copies end as the average too."""
    run = deepspeed_runs(stage, device)
    (recorded,) = _recorded(run.parent)
    assert len(recorded["masters"]) == STEPS + 1
    exported = load_file(run / EXPORT_FILES["peft"])
    assert_is_the_masters_ema(exported, recorded["masters"])
    assert_holds_the_average(recorded["module"], exported)
    average = _model_states(run / "checkpoints" / "last.ckpt")["callbacks"][LoraEma.__qualname__]["average"]
    assert_is_the_masters_ema(_module_lora(average), recorded["masters"])


@pytest.mark.parametrize(("stage", "device"), RUNS)
def test_deepspeed_zero2_vae_encodes_in_its_float32_weights(deepspeed_runs, stage, device):
    """DeepSpeed's bf16 mode casts the whole module, the frozen VAE's weights included: ZeRO-2 gets them back
    unrounded, so a run without a latent cache encodes its shots and references as sampling and `dreamshot cache`
    do, from the pixels as loaded (no bf16 cast of the batch); ZeRO-3 partitions them, and there they stay bf16 (as
    the planner counts them)."""
    encodes = json.loads((deepspeed_runs(stage, device).parent / VAE_ENCODES).read_text())
    dtype = str(torch.float32 if stage == 2 else torch.bfloat16)
    expected = {"weights": dtype, "input": dtype, "unrounded": stage == 2, "unrounded_input": stage == 2}
    assert encodes and all(run == expected for run in encodes)


@pytest.mark.parametrize(("stage", "device"), RUNS)
def test_deepspeed_run_exports_every_format_without_conversion(deepspeed_runs, stage, device, tmp_path):
    run = deepspeed_runs(stage, device)
    assert all((run / name).is_file() for name in EXPORT_FILES.values())
    assert main(["export", str(run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path)]) == 0
    for name in EXPORT_FILES.values():
        ours, theirs = load_file(tmp_path / name), load_file(run / name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)


if __name__ == "__main__":
    _train_with_deepspeed(int(sys.argv[1]), Path(sys.argv[2]), on_cpu="--cpu" in sys.argv)
