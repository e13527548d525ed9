"""An exponential moving average of the LoRA weights (`optim.ema_decay`), kept beside the trained weights."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy


@torch.no_grad()
def ema_update(average: torch.Tensor, value: torch.Tensor, decay: float) -> None:
    """average <- decay·average + (1 - decay)·value, in place (any shape)."""
    average.lerp_(value.to(average.dtype), 1.0 - decay)


class LoraEma(L.Callback):
    """Keeps a float32 average of every trainable (LoRA) parameter, updated after each optimizer step. The
    average is part of the checkpoint, so a resumed run continues it. When training ends the averaged weights
    replace the trained ones (under DeepSpeed its fp32 master weights too), so the callbacks after this one (the
    LoRA export) write the average."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.average: dict[str, torch.Tensor] = {}
        self._last_step = -1

    def _parameters(self, pl_module: L.LightningModule) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        parameters = self._parameters(pl_module)
        if not self.average:  # a resumed run brings its average from the checkpoint
            self.average = {name: p.detach().float().clone() for name, p in parameters.items()}
        self.average = {name: value.to(parameters[name].device) for name, value in self.average.items()}
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # global_step moves once per optimizer step (not per accumulated batch, not on a skipped step).
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        for name, p in self._parameters(pl_module).items():
            ema_update(self.average[name], p.detach(), self.decay)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        deepspeed = isinstance(trainer.strategy, DeepSpeedStrategy)
        if deepspeed:  # only under DeepSpeed, where it is running already
            from deepspeed.utils import safe_set_full_fp32_param
        with torch.no_grad():
            for name, p in self._parameters(pl_module).items():
                p.copy_(self.average[name].to(p.dtype))
                if deepspeed:  # the export writes DeepSpeed's fp32 master weights, the module holds bf16 copies
                    safe_set_full_fp32_param(p, self.average[name])

    def state_dict(self) -> dict:
        return {"average": {name: value.cpu() for name, value in self.average.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.average = dict(state_dict["average"])
