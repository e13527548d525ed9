"""An exponential moving average of the LoRA weights (`optim.ema_decay`), kept beside the trained weights.

Without DeepSpeed the average follows the module's float32 LoRA. Under DeepSpeed's bf16 mode the module holds
bf16-rounded copies; what training trains (and what the run's LoRA files hold, `callbacks.gathered_lora`) are the
fp32 master weights in the optimiser, split between the ranks of its partition group: ZeRO-1/2 give each rank a
slice of one flat fp32 partition, ZeRO-3 a slice of each weight. Each rank averages only its own fragment of each
master (`MasterFragment`): no collective per step, and 1/N of the average's memory per rank. The average is
assembled whole only where it leaves the ranks: in the checkpoint, and in the weights at the end of training.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn


@torch.no_grad()
def ema_update(average: torch.Tensor, value: torch.Tensor, decay: float) -> None:
    """average <- decay·average + (1 - decay)·value, in place (any shape)."""
    average.lerp_(value.to(average.dtype), 1.0 - decay)


@dataclass(frozen=True)
class ModuleWeight:
    """A trainable weight the module holds whole and in float32 (DDP, one device): the average follows it."""

    parameter: nn.Parameter

    def read(self) -> torch.Tensor:
        return self.parameter.detach()

    def own_part(self, whole: torch.Tensor) -> torch.Tensor:
        return whole

    def assemble(self, part: torch.Tensor) -> torch.Tensor:
        return part

    @torch.no_grad()
    def replace(self, whole: torch.Tensor) -> None:
        self.parameter.copy_(whole.to(self.parameter.device, self.parameter.dtype))


@dataclass(frozen=True)
class MasterFragment:
    """This rank's fragment of a trainable weight's fp32 master under DeepSpeed: elements [start, start + numel) of
    the flattened weight (numel 0 where its partition holds none), the rest held by the other ranks of `group`.
    Read through DeepSpeed's own accessors each time: a checkpoint load relinks its views."""

    parameter: nn.Parameter
    start: int
    numel: int
    group: dist.ProcessGroup | None

    @classmethod
    def of(cls, parameter: nn.Parameter) -> MasterFragment:
        if hasattr(parameter, "ds_id"):  # ZeRO-3: every weight split evenly over its group, the last part padded
            size, group = parameter.partition_numel(), parameter.ds_process_group
            start = size * dist.get_rank(group)
            return cls(parameter, start, max(0, min(size, parameter.ds_numel - start)), group)
        # ZeRO-1/2: the weight's overlap with this rank's slice of the flat fp32 partition (`tensor_fragment.py`).
        mapping = parameter._hp_mapping
        address = mapping.lp_fragment_address if mapping is not None else None
        return cls(parameter, address.start if address else 0, address.numel if address else 0, parameter._dp_group)

    @property
    def zero3(self) -> bool:
        return hasattr(self.parameter, "ds_id")

    @property
    def shape(self) -> torch.Size:
        return self.parameter.ds_shape if self.zero3 else self.parameter.shape

    def read(self) -> torch.Tensor:
        """The fragment of the master, flat (a view into the optimiser's partition)."""
        if self.zero3:
            from deepspeed.utils import safe_get_local_fp32_param  # only under DeepSpeed, where it is running already

            return safe_get_local_fp32_param(self.parameter).narrow(0, 0, self.numel)  # the padding left out
        mapping = self.parameter._hp_mapping
        return mapping.get_hp_fragment() if mapping is not None else self.parameter.new_empty(0, dtype=torch.float32)

    def own_part(self, whole: torch.Tensor) -> torch.Tensor:
        return whole.flatten().narrow(0, self.start, self.numel)

    def assemble(self, part: torch.Tensor) -> torch.Tensor:
        """The whole weight from every rank's `part` (as DeepSpeed's `get_full_hp_param` assembles a master: each
        rank's fragment in a zero buffer, summed). Collective: every rank of the group enters, weight by weight in
        the same order."""
        whole = torch.zeros(self.shape.numel(), dtype=torch.float32, device=self.parameter.device)
        whole.narrow(0, self.start, self.numel).copy_(part)
        dist.all_reduce(whole, group=self.group)
        return whole.view(self.shape)

    @torch.no_grad()
    def replace(self, whole: torch.Tensor) -> None:
        """`whole` (float32, on every rank) in place of the master's fragment and of the module's bf16 copy, so
        the export (which reads the masters) and whatever reads the module agree. Collective under ZeRO-3."""
        from deepspeed.runtime.zero import GatheredParameters
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_full_fp32_param, safe_set_local_fp32_param

        if not self.zero3:
            safe_set_full_fp32_param(self.parameter, whole)  # writes this rank's fragment only
            self.parameter.copy_(whole.to(self.parameter.device, self.parameter.dtype))
            return
        # The local API, which takes the partition padding included: the full one narrows `whole` past its end on
        # a padded last partition.
        local = safe_get_local_fp32_param(self.parameter).clone()
        local.narrow(0, 0, self.numel).copy_(self.own_part(whole))
        safe_set_local_fp32_param(self.parameter, local)
        # The module's copy is partitioned (`p.data` empty): gathered, written, and partitioned again from rank 0's.
        with GatheredParameters([self.parameter], modifier_rank=0):
            self.parameter.data.copy_(whole.to(self.parameter.device, self.parameter.dtype))


class LoraEma(L.Callback):
    """Keeps a float32 average of every trainable (LoRA) parameter, updated after each optimizer step: of the
    module's weights, or under DeepSpeed of this rank's fragments of the fp32 masters (module docstring). The
    average is part of the checkpoint, whole, so a resumed run continues it; when training ends the averaged
    weights replace the trained ones (under DeepSpeed the masters and the module's bf16 copies), so the callbacks
    after this one (the LoRA export) write the average."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        # name -> float32 average of what this rank averages (`_weights`): the whole weight, or a flat fragment.
        self.average: dict[str, torch.Tensor] = {}
        self._weights: dict[str, ModuleWeight | MasterFragment] = {}
        self._loaded: dict[str, torch.Tensor] = {}  # a checkpoint's whole average, until training starts
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        weight_of = MasterFragment.of if isinstance(trainer.strategy, DeepSpeedStrategy) else ModuleWeight
        self._weights = {name: weight_of(p) for name, p in pl_module.named_parameters() if p.requires_grad}
        self.average = {name: self._first_average(name, weight) for name, weight in self._weights.items()}
        self._loaded = {}
        self._last_step = trainer.global_step

    def _first_average(self, name: str, weight: ModuleWeight | MasterFragment) -> torch.Tensor:
        """The weight, or where a resumed run brings the whole average (a checkpoint of any version or world
        size), this rank's part of it: a float32 copy beside what it averages."""
        current = weight.read()
        first = weight.own_part(self._loaded[name]) if self._loaded else current
        return first.to(current.device, torch.float32, copy=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # global_step moves once per optimizer step (not per accumulated batch, not on a skipped step).
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        for name, weight in self._weights.items():
            ema_update(self.average[name], weight.read(), self.decay)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, weight in self._weights.items():  # every rank, in the same order: assembling is collective
            weight.replace(weight.assemble(self.average[name]))

    def state_dict(self) -> dict:
        # Lightning asks every rank, as a checkpoint is saved by all; under DeepSpeed rank 0 writes the callbacks'
        # states (ZeRO-3: each rank its copy, which it reads back), so each holds the whole average.
        return {"average": {name: self._weights[name].assemble(value).cpu() for name, value in self.average.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self._loaded = dict(state_dict["average"])
