"""Experiment tracking: each logged step's metrics to TensorBoard event files and/or Weights & Biases.

`metrics.jsonl` stays the run's own record; trackers are views of it for the usual dashboards.
TensorBoard writes into RUN/tensorboard (`tensorboard --logdir runs/`), offline; wandb follows its
own settings (`WANDB_MODE=offline` is respected) and is used only when it is installed.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from . import run
from .errors import PiLoraError

TENSORBOARD = "tensorboard"  # the folder inside the run


class Tracker:
    """Send metric records to the trackers in `report_to`; a resumed run replaces the steps it redoes."""

    def __init__(self, folder: Path, report_to: list[str], start: int, config: dict):
        self.folder, self.writers = Path(folder), []
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise PiLoraError("train.report_to tensorboard needs the tensorboard package "
                                  "(pip install tensorboard), or set train.report_to []") from e
            # purge_step drops events after the checkpoint, as metrics.jsonl drops those lines
            self.tensorboard = SummaryWriter(str(folder / TENSORBOARD), purge_step=start + 1 if start else None)
            self.writers.append(self._tensorboard)
            self._hook = threading.excepthook
            threading.excepthook = self._quiet_when_deleted
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError as e:
                raise PiLoraError("train.report_to wandb needs the wandb package (pip install wandb)") from e
            self.wandb = wandb.init(project="pi-lora", name=folder.name, dir=str(folder), config=config,
                                    resume="allow", id=_wandb_id(folder))
            self.writers.append(lambda record: self.wandb.log(_scalars(record), step=record["step"]))

    def _tensorboard(self, record: dict) -> None:
        for key, value in _scalars(record).items():
            group = "validation" if key.startswith("val_") else "train"
            self.tensorboard.add_scalar(f"{group}/{key}", value, record["step"])
        self.tensorboard.flush()

    def log(self, record: dict) -> None:
        try:
            for write in self.writers:
                write(record)
        except OSError as e:
            if self._gone(e):  # the folder went between run.check_present and the write: say so
                raise run.deleted(self.folder, Path(os.fsdecode(e.filename)).relative_to(self.folder)) from None
            raise

    def close(self) -> None:
        try:
            if hasattr(self, "tensorboard"):
                self.tensorboard.close()
        except OSError as e:
            if not self._gone(e):
                raise
        finally:
            if hasattr(self, "_hook"):
                threading.excepthook = self._hook
        if hasattr(self, "wandb"):
            self.wandb.finish()

    def _gone(self, error: BaseException) -> bool:
        """Whether `error` is a file of this run that is no longer there (the folder was deleted)."""
        name = getattr(error, "filename", None)
        return (isinstance(error, FileNotFoundError) and name is not None
                and Path(os.fsdecode(name)).is_relative_to(self.folder))

    def _quiet_when_deleted(self, args) -> None:
        """TensorBoard writes from a thread of its own, which prints a traceback when the run folder
        was deleted under it; the run then stops with one line (`log`), so that traceback is dropped.
        Any other thread's error is printed as before."""
        if not self._gone(args.exc_value):
            self._hook(args)


def _scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


def _wandb_id(folder: Path) -> str:
    """One wandb run per run folder, so --resume continues the same wandb run."""
    import hashlib

    return hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
