"""The LightningModule: wires the Wan adapter, the flow-matching loss and the optimiser. It computes nothing itself."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from pathlib import Path

import lightning as L
import torch

from dreamshot.config.load import to_yaml
from dreamshot.config.schema import Config
from dreamshot.data.bucketing import StoryboardBatch
from dreamshot.diffusion.conditioning import BatchPlan, ComposedBatch, compose, sample_plan
from dreamshot.diffusion.flow_matching import (
    add_noise,
    dit_timesteps,
    frame_masked_mse,
    sample_timesteps,
    velocity_target,
)
from dreamshot.diffusion.racl import attention_shares, build_role_plan, racl_loss, stack_plans, token_grid_masks
from dreamshot.inference.loading import load_lora, read_lora, with_lora
from dreamshot.models.wan.adapter import WanAdapter
from dreamshot.models.wan.context_parallel import ContextParallel
from dreamshot.models.wan.role_capture import RoleCapture
from dreamshot.training.guards import TrainingDivergedError, describe, drop_gradients, finite_gradients
from dreamshot.training.schedule import lr_factor
from dreamshot.utils.errors import WeightsError


class DreamShotModule(L.LightningModule):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        # Fine-tuning an existing LoRA: its rank, alpha and targets become the run's (`with_lora`), its weights
        # the starting point (a resumed run's checkpoint then replaces them).
        init_from = cfg.model.lora.init_from
        initial = read_lora(Path(init_from)) if init_from else None
        if initial is not None:
            cfg = with_lora(cfg, initial, f"model.lora.init_from={init_from}")
        self.cfg = cfg
        # Stored as yaml text so a checkpoint loads with torch.load(weights_only=True).
        self.save_hyperparameters({"config": to_yaml(cfg)})
        self.adapter = WanAdapter.seeded(
            cfg.model,
            cfg.seed,
            gradient_checkpointing=cfg.trainer.gradient_checkpointing,
            capture_blocks=cfg.racl_blocks(),
            compiled=cfg.trainer.compile_blocks,
        )
        if initial is not None:
            load_lora(self.adapter, initial, f"model.lora.init_from={init_from}")
        # Checkpoints hold only the LoRA weights; the frozen backbone comes from the config.
        self.strict_loading = False
        self.mix_counts: Counter[str] = Counter()
        self._negative_text: torch.Tensor | None = None
        self.nonfinite_skips = 0
        # A micro-batch of the coming optimizer step had a non-finite loss (on some rank): the update is skipped.
        self._skip_update = False
        self._last_losses: dict[str, torch.Tensor] = {}
        # (optimizer step, (storyboards, losses) of its finite micro-batches so far).
        self._step_losses: tuple[int, list[tuple[int, dict[str, torch.Tensor]]]] = (-1, [])

    def setup(self, stage: str) -> None:
        # The strategy has started the processes and built the context-parallel groups by now.
        self.adapter.context_parallel = getattr(self.trainer.strategy, "context_parallel", ContextParallel())

    @property
    def phase(self) -> int:
        """The current curriculum phase (0-based). The phase is the epoch (the datamodule serves one phase per
        epoch; without a curriculum every epoch is a data pass of the one phase), so it is derived, never stored:
        a resumed run cannot disagree with its data."""
        return min(self.current_epoch, len(self.cfg.phases()) - 1)

    @property
    def racl_weight(self) -> float:
        """λ of the current curriculum phase."""
        return self.cfg.racl_weight(self.phase)

    # --- steps ---------------------------------------------------------------------------------------------

    def training_step(self, batch: StoryboardBatch, batch_idx: int) -> torch.Tensor:
        rng, generator = self._step_randomness(f"train-{self.global_step}-{batch_idx}")
        plan = sample_plan(self.cfg.storyboard, batch.num_shots, batch.num_refs, batch.batch_size, rng)
        # LoRA dropout draws from torch's global generators, which a resume does not restore and a validation
        # pass moves (its loader draws a worker seed): seeded per step, the masks depend on the step alone.
        torch.manual_seed(rng.getrandbits(63))
        losses = self.model_step(batch, plan, generator, racl_weight=self.racl_weight)
        self._last_losses = {k: v.detach() for k, v in losses.items()}
        finite = bool(torch.isfinite(losses["loss"]))
        if not self._on_every_rank(finite):
            self._skip_nonfinite("loss" if not finite else "loss on another rank")
            self._skip_update = True
            # Every rank still runs a backward, of a zero loss: one without it would leave the others waiting in the
            # gradient all-reduce (and Lightning refuses a skipped training_step under DDP). Its gradients are
            # dropped before the optimiser step.
            return sum((p.sum() for p in self.adapter.trainable_parameters()), torch.zeros((), device=self.device)) * 0
        self.mix_counts.update(plan.counts())
        means = self._step_means(losses, batch.batch_size)
        means["phase"] = torch.tensor(float(self.phase))
        self.log_dict({f"train/{k}": v for k, v in means.items()}, prog_bar=True, batch_size=batch.batch_size)
        self.log_dict({f"train/count_{k}": float(v) for k, v in self.mix_counts.items()}, batch_size=batch.batch_size)
        return losses["loss"] * self._step_weight(batch)

    def _step_weight(self, batch: StoryboardBatch) -> float:
        """The batch's weight among the micro-batches of its optimizer step. Lightning (accumulation) and the
        data-parallel all-reduce average them with equal weights; a bucket's last batch holds fewer storyboards, so
        each is scaled by its storyboards over the step's mean per micro-batch: the step's gradient is then the
        gradient of the mean loss over all the step's storyboards, as one big batch would give."""
        if batch.step_samples is None:
            return 1.0
        sharding = self._trainer.distributed_sampler_kwargs if self._trainer is not None else None
        micro_batches = (sharding["num_replicas"] if sharding else 1) * self.cfg.trainer.accumulate_grad_batches
        return batch.batch_size * micro_batches / batch.step_samples

    def _step_means(self, losses: dict[str, torch.Tensor], storyboards: int) -> dict[str, torch.Tensor]:
        """Each loss averaged over the storyboards of the optimizer step so far (`step_means`): Lightning logs a
        step's last value, which is then the step's mean, not its last batch's."""
        step, seen = self._step_losses
        if step != self.global_step:
            step, seen = self.global_step, []
        self._step_losses = (step, [*seen, (storyboards, {k: v.detach() for k, v in losses.items()})])
        return dict(self.step_means[1])

    @property
    def step_means(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(optimizer step, each loss's mean over that step's finite micro-batches so far, each micro-batch weighted
        by its storyboards as in the gradient)."""
        step, seen = self._step_losses
        keys = dict.fromkeys(key for _, losses in seen for key in losses)
        return step, {
            k: sum(n * losses[k] for n, losses in seen if k in losses) / sum(n for n, losses in seen if k in losses)
            for k in keys
        }

    def validation_step(self, batch: StoryboardBatch, batch_idx: int) -> None:
        # Noise fixed by the batch's storyboards, not by its place in a rank's share: val/loss is comparable across
        # steps, runs and device counts.
        _, generator = self._step_randomness(f"val-{'|'.join(batch.ids)}", per_rank=False)
        mode = "r2s" if batch.num_refs else "t2s"
        plan = BatchPlan(mode, 0, False, (False,) * batch.batch_size)
        with_diagnostic = self.cfg.racl.diagnostic and batch.num_refs > 0
        losses = self.model_step(batch, plan, generator, racl_weight=0.0, diagnostic=with_diagnostic)
        # Every rank validates its own share of the batches; Lightning reduces (Σ value·batch_size) / Σ batch_size over
        # the ranks. A repeat (padding, so that every rank runs as many forwards: they hold collectives) weighs
        # nothing, so val/* is the mean over every validation storyboard once, whatever the device count. A float:
        # Lightning floors the ranks' mean of an integer Σ batch_size (Lightning-AI/pytorch-lightning#21859).
        storyboards = 0.0 if batch.repeat else float(batch.batch_size)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=storyboards, sync_dist=True)

    def model_step(
        self,
        batch: StoryboardBatch,
        plan: BatchPlan,
        generator: torch.Generator,
        racl_weight: float = 0.0,
        diagnostic: bool = False,
    ) -> dict[str, torch.Tensor]:
        """L = L_FM + λ·L_RACL for one batch under `plan`.

        Returns {"loss", "loss_fm"}, plus "loss_racl" when λ > 0 and "racl_in_mask" / "racl_confusion" with
        `diagnostic`. Role attention is captured only when one of them needs it.
        """
        latents = batch.latents  # from the latent cache (data.cache_dir), else encoded here
        if latents is None:
            latents = self.adapter.encode_storyboard(batch.shots, batch.refs, batch.shot_texts, batch.ref_texts)
        if racl_weight > 0 or diagnostic:
            # Reference k shows role k only: (B, K, H, W) -> (B, K, R=K, H, W).
            # A copy: the batch's own latents stay without masks for a later step on the same batch without RACL.
            eye = torch.eye(batch.num_refs, device=batch.ref_masks.device)
            ref_masks = eye[None, :, :, None, None] * batch.ref_masks[:, :, None]
            latents = dataclasses.replace(latents, ref_masks=ref_masks, shot_masks=batch.shot_masks)
        composed = compose(plan, latents, self.negative_text(), self.cfg.storyboard)
        capture = self._role_capture(composed) if composed.frame_masks is not None else None
        loss_fm = self._flow_matching_loss(composed, generator, capture)
        losses = {"loss": loss_fm, "loss_fm": loss_fm.detach()}
        if capture is None:
            return losses
        maps = torch.cat(capture.block_mean())
        labels = {name: stack_plans(capture.plans, name) for name in ("target_masks", "other_masks")}
        present = stack_plans(capture.plans, "present_pairs")
        if racl_weight > 0:
            mass = torch.cat(capture.block_mean_mass()) if capture.with_mass else None
            absent = stack_plans(capture.plans, "absent_pairs")
            loss_racl = racl_loss(maps, labels["target_masks"], present, mass, absent)
            losses.update(loss=loss_fm + racl_weight * loss_racl, loss_racl=loss_racl.detach())
        if diagnostic:
            in_mask, confusion = attention_shares(maps.detach(), *labels.values(), present)
            losses.update(racl_in_mask=in_mask, racl_confusion=confusion)
        return losses

    def _flow_matching_loss(
        self, composed: ComposedBatch, generator: torch.Generator, capture: RoleCapture | None
    ) -> torch.Tensor:
        layout, targets = composed.layout, composed.targets
        t = sample_timesteps(targets.shape[0], self.cfg.diffusion.shift, generator, targets.device)
        noise = torch.randn(targets.shape, generator=generator, device=targets.device, dtype=targets.dtype)
        sequence = layout.assemble(composed.conditions, add_noise(targets, noise, t))
        text = layout.assemble(composed.condition_text, composed.target_text, dim=1)
        per_token = self.cfg.diffusion.timestep_mode == "per_token"
        timesteps = dit_timesteps(t, layout.target_frames(), per_token)
        prediction = self.adapter.predict_velocity(sequence, timesteps, text, layout, capture)
        # Condition frames stand in the target only to keep shapes aligned; the frame mask excludes them.
        target = layout.assemble(composed.conditions, velocity_target(targets, noise))
        return frame_masked_mse(prediction, target, layout.target_frames().to(targets.device))

    def _role_capture(self, composed: ComposedBatch) -> RoleCapture:
        """Token-grid role masks of every frame -> one role plan per sample."""
        _, p_h, p_w = self.adapter.patch_size
        grid = (composed.targets.shape[-2] // p_h, composed.targets.shape[-1] // p_w)
        masks = token_grid_masks(composed.frame_masks, grid, self.cfg.racl.mask_threshold)
        targets = composed.layout.target_frames().to(masks.device)
        absent_negative = self.cfg.racl.absent_negative
        plans = [build_role_plan(m.flatten(-2), targets, absent_negative) for m in masks]
        return RoleCapture(plans, frozenset(self.cfg.racl_blocks()), with_mass=absent_negative)

    def negative_text(self) -> torch.Tensor:
        """(L, D) embedding of the negative prompt, encoded once per device."""
        if self._negative_text is None or self._negative_text.device != self.device:
            self._negative_text = self.adapter.encode_text([[self.cfg.storyboard.negative_prompt]])[0, 0]
        return self._negative_text

    def _step_randomness(self, step: str, per_rank: bool = True) -> tuple[random.Random, torch.Generator]:
        """Randomness derived from (seed, step, data-parallel rank unless not `per_rank`) only, so a resumed run
        redraws the same values and the ranks of a context-parallel group draw the same."""
        sharding = self._trainer.distributed_sampler_kwargs if self._trainer is not None and per_rank else None
        key = f"{self.cfg.seed}-{step}-{sharding['rank'] if sharding else 0}"
        rng = random.Random(key)
        generator = torch.Generator(device=self.device).manual_seed(rng.getrandbits(63))
        return rng, generator

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._skip_update:
            self._skip_update = False
            drop_gradients(optimizer)
            return
        # Under 16-mixed, overflowing gradients are the GradScaler's to skip (it lowers its scale, then grows it
        # back until the next overflow): they recur by design and are no sign of divergence.
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        if not finite_gradients(optimizer):
            self._skip_nonfinite("gradients")
            drop_gradients(optimizer)

    def _on_every_rank(self, decision: bool) -> bool:
        """`decision` taken by every rank together: a rank that skipped its backward alone would leave the others
        waiting in the gradient all-reduce (the ranks of a context-parallel group share one loss; data-parallel
        ranks do not)."""
        if self._trainer is None:
            return decision
        return self.trainer.strategy.reduce_boolean_decision(decision, all=True)

    def _skip_nonfinite(self, what: str) -> None:
        limit = self.cfg.trainer.max_nonfinite_steps
        if self.nonfinite_skips >= limit:
            raise TrainingDivergedError(
                f"non-finite {what} at step {self.global_step} ({describe(self._last_losses)}); "
                f"{self.nonfinite_skips} of trainer.max_nonfinite_steps={limit} skips used; "
                "the checkpoints written so far are intact"
            )
        self.nonfinite_skips += 1
        self.log("train/nonfinite_skips", float(self.nonfinite_skips))

    # --- optimiser -----------------------------------------------------------------------------------------

    def configure_optimizers(self):
        opt = self.cfg.optim
        optimizer = torch.optim.AdamW(
            self.adapter.trainable_parameters(),
            lr=opt.lr,
            betas=tuple(opt.betas),
            eps=opt.eps,
            weight_decay=opt.weight_decay,
        )
        total = self.cfg.trainer.max_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, opt.warmup_steps, total, opt.schedule, opt.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints: LoRA weights and training state only -------------------------------------------------

    def lora_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keys = self.lora_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        checkpoint["mix_counts"] = dict(self.mix_counts)
        checkpoint["nonfinite_skips"] = self.nonfinite_skips

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # DeepSpeed checkpoints carry no "state_dict": the engine restores the (trainable) weights itself.
        missing = sorted(self.lora_keys() - set(checkpoint.get("state_dict", self.lora_keys())))
        if missing:
            raise WeightsError(f"checkpoint has no LoRA weight {missing[0]!r} ({len(missing)} missing)")
        self.mix_counts = Counter(checkpoint.get("mix_counts", {}))
        self.nonfinite_skips = checkpoint.get("nonfinite_skips", 0)
