"""Optional observers of training (the trainer calls ``on_step`` and ``on_validation``)."""
from __future__ import annotations

from pathlib import Path

from metamap.errors import ConfigError


class TensorBoardLogger:
    """Scalars of every logged step and validation to ``RUN/tensorboard`` (rank 0 only)."""

    def __init__(self, run_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.tensorboard = true needs the tensorboard package: "
                              "pip install tensorboard") from None
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def on_step(self, trainer, record: dict) -> None:
        if trainer.step % trainer.train_cfg["log_every"]:
            return
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self.writer.add_scalar(f"train/{k}", v, record["step"])
        self.writer.flush()

    def on_validation(self, trainer, result, is_best: bool) -> None:
        self.writer.add_scalar(f"val/{result.metric}", result.mean, trainer.step)
        self.writer.flush()
