"""Observers of training: the trainer calls them at every step, validation and at the end.

A callback is any object with some of these methods (:class:`Callback` gives no-op defaults)::

    on_step(trainer, record)                 after every applied meta-batch; ``record`` is its log
                                             line: step, loss, metrics, lr, tasks_per_s, memory
    on_validation(trainer, result, is_best)  after every validation (an EvalResult)
    on_fit_end(trainer)                      when the loop ends (steps done, or a stop requested)

The ``trainer`` gives the state they need: ``trainer.step``, ``trainer.learner``,
``trainer.optimizer`` (its ``param_groups`` hold the current learning rates), ``trainer.best``
(``{"step", "metric", "mean"}`` of the best validation), ``trainer.config``, ``trainer.run_dir``;
``trainer.request_stop(reason)`` ends training after the current step (checkpoints are written
as at a normal end).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from metamap.errors import ConfigError


class Callback:
    """Base class with no-op hooks; override the ones you need."""

    def on_step(self, trainer, record: dict) -> None:
        pass

    def on_validation(self, trainer, result, is_best: bool) -> None:
        pass

    def on_fit_end(self, trainer) -> None:
        pass


def higher_is_better(result) -> bool:
    """Whether a larger value of ``result``'s metric is better (accuracy) or worse (a loss, an MSE)."""
    direction = getattr(result, "higher_is_better", None)
    return bool(direction) if direction is not None else result.metric == "accuracy"


class EarlyStopping(Callback):
    """Stop when the validation metric has not improved by more than ``min_delta`` for
    ``patience`` validations in a row. ``mode``: ``"max"``, ``"min"``, or ``"auto"`` (the
    metric's own direction: accuracy up, MSE down)."""

    def __init__(self, patience: int = 3, min_delta: float = 0.0, mode: str = "auto"):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ConfigError(f"EarlyStopping: patience must be a whole number >= 1, not {patience!r}")
        if not isinstance(min_delta, (int, float)) or not math.isfinite(min_delta) or min_delta < 0:
            raise ConfigError(f"EarlyStopping: min_delta must be a number >= 0, not {min_delta!r}")
        if mode not in ("auto", "max", "min"):
            raise ConfigError(f"EarlyStopping: mode must be auto, max or min, not {mode!r}")
        self.patience, self.min_delta, self.mode = patience, float(min_delta), mode
        self.best: float | None = None
        self.waited = 0
        self.stopped_at: int | None = None

    def on_validation(self, trainer, result, is_best: bool) -> None:
        up = higher_is_better(result) if self.mode == "auto" else self.mode == "max"
        gain = (result.mean - self.best if up else self.best - result.mean) if self.best is not None else math.inf
        if gain > self.min_delta:
            self.best, self.waited = result.mean, 0
            return
        self.waited += 1
        if self.waited >= self.patience:
            self.stopped_at = trainer.step
            trainer.request_stop(f"early stopping: val {result.metric} has not improved by more than "
                                 f"{self.min_delta:g} for {self.patience} validations (best {self.best:.4f})")


class JsonLinesLogger(Callback):
    """Every step record and validation as one JSON object per line, appended to ``path``."""

    def __init__(self, path: str | Path, every: int = 1):
        self.path, self.every = Path(path), every
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_step(self, trainer, record: dict) -> None:
        if record["step"] % self.every == 0:
            self._write(record)

    def on_validation(self, trainer, result, is_best: bool) -> None:
        self._write({"step": trainer.step, f"val_{result.metric}": result.mean, "val_ci95": result.ci95,
                     "val_setting": result.setting, "best": is_best})


class TensorBoardLogger(Callback):
    """Scalars of every logged step and validation to ``log_dir`` (``RUN/tensorboard`` in the CLI)."""

    def __init__(self, log_dir: str | Path, every: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("TensorBoard logging needs the tensorboard package: pip install tensorboard") from None
        self.writer, self.every = SummaryWriter(str(log_dir)), every

    def on_step(self, trainer, record: dict) -> None:
        if record["step"] % (self.every or trainer.train_cfg["log_every"]):
            return
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"train/{k}", v, record["step"])
        self.writer.flush()

    def on_validation(self, trainer, result, is_best: bool) -> None:
        self.writer.add_scalar(f"val/{result.metric}", result.mean, trainer.step)
        self.writer.flush()

    def on_fit_end(self, trainer) -> None:
        self.writer.close()


class LearningRateMonitor(Callback):
    """The learning rate of every parameter group at every step: ``history`` is a list of
    ``(step, [lr of group 0, group 1, ...])``; with ``writer`` (a TensorBoard ``SummaryWriter``)
    they are also logged as ``lr/group{i}``."""

    def __init__(self, writer=None):
        self.history: list[tuple[int, list[float]]] = []
        self.writer = writer

    def on_step(self, trainer, record: dict) -> None:
        lrs = [float(g["lr"]) for g in trainer.optimizer.param_groups]
        self.history.append((trainer.step, lrs))
        if self.writer is not None:
            for i, lr in enumerate(lrs):
                self.writer.add_scalar(f"lr/group{i}", lr, trainer.step)
