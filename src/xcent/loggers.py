"""Metric loggers: where the trainer's numbers go.

The interface is torchtune's ``MetricLoggerInterface`` in miniature: ``log(name,
value, step)``, ``log_dict(payload, step)``, ``close()``. The trainer writes two
streams through it (field by field in ``docs/logging.md``):

* the epoch records: ``OUT/eval_NAME.jsonl``, one line per epoch from epoch 0 (the
  file that resume, ``xcent compare`` and ``xcent plot`` read, always written);
* the step records (every ``--log-every-steps`` steps): ``OUT/steps_NAME.jsonl``.

``--logger tensorboard`` adds both streams to ``OUT/tensorboard/`` (tags
``epoch/FIELD`` and ``step/FIELD``, both against the global training step). JSONL is
hand-written (one ``json.dumps`` per line; the format is the reference
implementation's ``eval_NAME.jsonl``); TensorBoard is the ``tensorboard`` package's
event files through ``torch.utils.tensorboard.SummaryWriter``, imported only when
asked for (the ``[tensorboard]`` extra).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from .errors import UsageError
from .fileio import append_line_durable
from .yamlio import load_json

__all__ = ["MetricLogger", "JsonlLogger", "TensorBoardLogger", "MultiLogger", "check_available", "read_jsonl"]


class MetricLogger(Protocol):
    """Scalars by name and step."""

    def log(self, name: str, value, step: int) -> None: ...

    def log_dict(self, payload: Mapping, step: int) -> None: ...

    def close(self) -> None: ...


def read_jsonl(path) -> list[dict]:
    """The records of a JSONL file ([] if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [load_json(line) for line in path.read_text().splitlines() if line.strip()]


class JsonlLogger:
    """Appends one JSON object per :meth:`log_dict`: ``{step_key: step, **payload}``.

    With ``fsync`` every line reaches the disk before the call returns (the epoch
    records, which a resumed run trusts); without, lines are flushed only (the step
    records: a crash may lose the last few, resume rewrites them anyway)."""

    def __init__(self, path, step_key: str = "step", fsync: bool = False):
        self.path, self.step_key, self.fsync = Path(path), step_key, fsync
        self._file = None

    def log(self, name: str, value, step: int) -> None:
        self.log_dict({name: value}, step)

    def log_dict(self, payload: Mapping, step: int) -> None:
        if self.fsync:  # all or nothing: a crash or a full disk never leaves a torn line
            append_line_durable(self.path, json.dumps({self.step_key: step, **payload}))
            return
        if self._file is None:
            self._file = open(self.path, "a")  # noqa: SIM115  (kept open between records, closed in close())
        self._file.write(json.dumps({self.step_key: step, **payload}) + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def check_available(name: str) -> None:
    """UsageError (one line naming the extra) when logger ``name`` cannot run here."""
    if name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--logger tensorboard: the tensorboard package is not installed "
                         "(pip install 'xcent[tensorboard]')")


class TensorBoardLogger:
    """Scalars to TensorBoard event files in ``log_dir``, as ``prefix + name``
    (non-numeric, non-finite and None values are skipped) at step ``step x
    step_scale``. ``purge_step``: events of an earlier, interrupted run at or after
    this step are dropped (resume)."""

    def __init__(self, log_dir, prefix: str = "", purge_step: int | None = None, step_scale: int = 1,
                 writer=None):
        if writer is None:
            check_available("tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self.writer, self.prefix, self.step_scale = writer, prefix, step_scale

    def with_prefix(self, prefix: str, step_scale: int = 1) -> TensorBoardLogger:
        """A logger writing to the same event file under another tag prefix (closing
        either closes the file)."""
        return TensorBoardLogger(None, prefix, step_scale=step_scale, writer=self.writer)

    def log(self, name: str, value, step: int) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            self.writer.add_scalar(self.prefix + name, value, global_step=step * self.step_scale)

    def log_dict(self, payload: Mapping, step: int) -> None:
        for name, value in payload.items():
            self.log(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MultiLogger:
    """Several loggers as one."""

    def __init__(self, loggers):
        self.loggers = list(loggers)

    def log(self, name: str, value, step: int) -> None:
        for lg in self.loggers:
            lg.log(name, value, step)

    def log_dict(self, payload: Mapping, step: int) -> None:
        for lg in self.loggers:
            lg.log_dict(payload, step)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()
