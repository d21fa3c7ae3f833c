"""Checkpoints: atomic writes, ``weights_only`` loads, compatibility checks for resume.

A checkpoint is a plain dict of tensors and plain values (so ``torch.load(...,
weights_only=True)`` reads it): ``weight`` (C, D), ``nu`` and ``nu_set`` (the
algorithm's dual state), ``epoch``, ``best`` (best metrics so far), ``algorithm``,
``num_classes``, ``feature_dim``, ``num_samples``, ``config`` (the resolved run
config), ``rng_state`` and ``format``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .errors import UsageError

FORMAT = "xcent-checkpoint-v1"
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


def save_atomic(obj, path) -> None:
    """``torch.save`` to a temp file in the same directory, then ``os.replace``: a
    crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path, map_location="cpu", mmap: bool = False) -> dict:
    """Load and sanity-check a checkpoint; a one-line ``UsageError`` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:
        raise UsageError(f"checkpoint {path}: cannot be read, not an xcent checkpoint or corrupt "
                         f"({type(exc).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "weight" not in ckpt:
        raise UsageError(f"checkpoint {path}: not an xcent checkpoint")
    return ckpt


def epoch_checkpoints(directory) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of ``epoch_K.pt`` files in ``directory``, by epoch."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), directory / name) for name in os.listdir(directory)
             if (m := _EPOCH_FILE.match(name))]
    return sorted(found)


def latest(directory) -> Path | None:
    found = epoch_checkpoints(directory)
    return found[-1][1] if found else None


def check_compatible(ckpt: dict, path, algorithm: str, num_classes: int, feature_dim: int,
                     num_samples: int) -> None:
    """Refuse to resume a checkpoint of another algorithm or other shapes."""
    wanted = {"algorithm": algorithm, "num_classes": num_classes, "feature_dim": feature_dim,
              "num_samples": num_samples}
    for key, value in wanted.items():
        if ckpt.get(key) != value:
            raise UsageError(f"--resume {path}: incompatible checkpoint ({key} is {ckpt.get(key)!r}, "
                             f"this run has {value!r})")
