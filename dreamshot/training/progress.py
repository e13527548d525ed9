"""Training progress for people and for log files: the optimizer step, the curriculum phase, the loss, the speed
and the time left.

In a terminal one line is redrawn in place, at most `WIDTH` columns, the step and the time left first so a
narrow window cuts the losses, not them. When stdout is not a terminal (SLURM, `| tee`), a plain line is
printed every n optimizer steps instead, so a log shows progress while a phase runs. Both show `loss_racl` only
in a phase that trains RACL (a RACL-free phase would otherwise keep showing the last phase-1 value), and each
validation adds one line with its metrics.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import lightning as L
from lightning.pytorch.callbacks import ProgressBar

WIDTH = 79  # an 80-column terminal wraps a line that fills its last column
BAR = 12


def format_duration(seconds: float) -> str:
    """H:MM:SS (hours unbounded)."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def losses(metrics: dict[str, float], racl: bool) -> dict[str, float]:
    """The training losses worth showing: the total, and with RACL its two terms (without, L_FM is the total)."""
    shown = {"loss": metrics.get("train/loss")}
    if racl:
        shown.update(fm=metrics.get("train/loss_fm"), racl=metrics.get("train/loss_racl"))
    return {name: value for name, value in shown.items() if value is not None}


def progress_line(
    step: int, max_steps: int, phase: str, values: dict[str, float], rate: float | None, terminal: bool
) -> str:
    """One progress line. `rate`: optimizer steps per second (None before the first step is timed)."""
    speed = "-- it/s" if not rate else f"{rate:.3g} it/s"
    eta = "ETA --" if not rate else f"ETA {format_duration((max_steps - step) / rate)}"
    if terminal:
        filled = round(BAR * step / max_steps) if max_steps else 0
        bar = "█" * filled + "·" * (BAR - filled)
        text = " ".join([phase, bar, f"{step}/{max_steps}", speed, eta, *(f"{k} {v:.4g}" for k, v in values.items())])
        return text[:WIDTH]
    parts = [f"step {step}/{max_steps}", phase, *(f"{k} {v:.4f}" for k, v in values.items()), speed, eta]
    return " | ".join(parts)


class StepProgress(ProgressBar):
    """Lightning's progress bar replaced by `progress_line`: redrawn in a terminal, printed every
    `every_n_steps` optimizer steps otherwise (`terminal=None`: whether `stream` is a terminal)."""

    def __init__(
        self, phases: int, every_n_steps: int, stream: TextIO | None = None, terminal: bool | None = None
    ) -> None:
        super().__init__()
        self.phases, self.every_n_steps = phases, every_n_steps
        self.stream = stream
        self.terminal = terminal
        self.enabled = True
        self._start: tuple[float, int] | None = None
        self._last_step = -1

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    @property
    def _out(self) -> TextIO:
        return self.stream or sys.stdout

    def _is_terminal(self) -> bool:
        return self._out.isatty() if self.terminal is None else self.terminal

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # With gradient accumulation global_step stays put for several batches: one line per optimizer step.
        if not self.enabled or step == self._last_step:
            return
        self._last_step = step
        terminal = self._is_terminal()
        if not terminal and step % self.every_n_steps and step != trainer.max_steps:
            return
        line = progress_line(
            step,
            trainer.max_steps,
            self._phase(trainer),
            losses(self.get_metrics(trainer, pl_module), racl=pl_module.racl_weight > 0),
            self._rate(step),
            terminal,
        )
        self._write(line, terminal)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        text = " | ".join([f"step {trainer.global_step}/{trainer.max_steps}", "validation"])
        text += "".join(f" | {k} {v:.4f}" for k, v in sorted(values.items()))
        if self._is_terminal():
            self._out.write("\r\033[K")  # the redrawn line gives way to a line that stays
        self._write(text, terminal=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and self._is_terminal():
            self._out.write("\n")
            self._out.flush()

    def _phase(self, trainer: L.Trainer) -> str:
        # One Lightning epoch per curriculum phase (or per data pass without one).
        epoch = trainer.current_epoch + 1
        return f"phase {epoch}/{self.phases}" if self.phases else f"pass {epoch}"

    def _rate(self, step: int) -> float | None:
        if self._start is None or step <= self._start[1]:
            return None
        elapsed = time.monotonic() - self._start[0]
        return (step - self._start[1]) / elapsed if elapsed > 0 else None

    def _write(self, line: str, terminal: bool) -> None:
        self._out.write(f"\r{line}\033[K" if terminal else f"{line}\n")
        self._out.flush()
