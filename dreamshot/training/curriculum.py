"""The training curriculum (DESIGN §2 "Curriculum"): phases run in order inside one run.

Each phase is one Lightning epoch: the datamodule builds the phase's loader (its resolution, its number of
batches) when the epoch starts, and this callback sets the phase's RACL weight. Because the phase is the epoch
index, a checkpoint restores the phase with it, and resuming continues in the right phase.
"""

from __future__ import annotations

import lightning as L


class Curriculum(L.Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        phases = pl_module.cfg.phases()
        phase = phases[min(trainer.current_epoch, len(phases) - 1)]
        pl_module.racl_weight = phase.racl_weight
