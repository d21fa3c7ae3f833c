"""Checkpoints: atomic writes, ``weights_only`` loads, compatibility checks for resume.

A checkpoint is a plain dict of tensors and plain values (so ``torch.load(...,
weights_only=True)`` reads it): ``weight`` (C, D), ``nu`` and ``nu_set`` (the
algorithm's dual state), ``epoch``, ``best`` (best metrics so far), ``algorithm``,
``num_classes``, ``feature_dim``, ``num_samples``, ``config`` (the resolved run
config), ``rng_state`` and ``format``.

A class-sharded run (:mod:`xcent.distributed`) writes a directory ``epoch_K/`` instead:
``manifest.pt`` (the same dict without ``weight``, plus ``shards``: the row range of
each file) and ``shard_RRRRR.pt`` (``{"weight": rows}``). :func:`load` assembles it
into the same dict, :func:`load_rows` reads just a row range from either form, so a
run can resume with any number of processes and ``xcent eval`` reads both.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .errors import UsageError
from .fileio import atomic_path

FORMAT = "xcent-checkpoint-v1"
_EPOCH_FILE = re.compile(r"^epoch_(\d+)(\.pt)?$")
MANIFEST = "manifest.pt"


def save_atomic(obj, path) -> None:
    """``torch.save`` to a temp file in the same directory, then ``os.replace``: a
    crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _torch_load(path: Path, what: str, map_location="cpu", mmap: bool = False):
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:
        raise UsageError(f"checkpoint {what}: cannot be read, not an xcent checkpoint or corrupt "
                         f"({type(exc).__name__})")


def _load_manifest(path: Path) -> dict:
    manifest = _torch_load(path / MANIFEST, str(path)) if (path / MANIFEST).is_file() else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "shards" not in manifest:
        raise UsageError(f"checkpoint {path}: not an xcent checkpoint (no valid {MANIFEST})")
    return manifest


def load_rows(path, lo: int, hi: int) -> torch.Tensor:
    """Rows ``lo:hi`` of the weight of a checkpoint file or sharded directory, read
    memory-mapped so that only those rows are brought into memory."""
    path = Path(path)
    if path.is_dir():
        manifest = _load_manifest(path)
        parts = []
        for name, s_lo, s_hi in manifest["shards"]:
            a, b = max(lo, s_lo), min(hi, s_hi)
            if a < b:
                shard = _torch_load(path / name, str(path / name), mmap=True)["weight"]
                parts.append(shard[a - s_lo:b - s_lo].clone())
        return torch.cat(parts) if parts else torch.empty(0)
    weight = _torch_load(path, str(path), mmap=True)["weight"]
    return weight[lo:hi].clone()


def load(path, map_location="cpu", mmap: bool = False, weight: bool = True) -> dict:
    """Load and sanity-check a checkpoint file or sharded directory (assembled into one
    dict); a one-line ``UsageError`` if it is not one. ``weight=False`` leaves a
    sharded checkpoint's rows on disk (the dict then has no ``weight``): resume reads
    only its metadata and duals, each rank then :func:`load_rows` its own classes."""
    path = Path(path)
    if path.is_dir():
        ckpt = dict(_load_manifest(path))
        if weight:
            ckpt["weight"] = load_rows(path, 0, ckpt["num_classes"])
        return ckpt
    if not path.is_file():
        raise UsageError(f"checkpoint {path}: no such file")
    ckpt = _torch_load(path, str(path), map_location, mmap)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "weight" not in ckpt:
        raise UsageError(f"checkpoint {path}: not an xcent checkpoint")
    return ckpt


def epoch_checkpoints(directory) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the ``epoch_K.pt`` files and complete ``epoch_K/`` sharded
    directories in ``directory``, by epoch."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for name in os.listdir(directory):
        m = _EPOCH_FILE.match(name)
        if m and (m.group(2) or (directory / name / MANIFEST).is_file()):
            found.append((int(m.group(1)), directory / name))
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


def save_sharded(ctx, directory, epoch: int, rows: torch.Tensor, lo: int, hi: int, meta: dict) -> Path:
    """Write a sharded checkpoint ``directory/epoch_K/`` from every rank (collective).

    Each rank writes its rows into a temporary directory; after a barrier rank 0
    writes the manifest and renames the directory into place, so a crash leaves
    either no ``epoch_K/`` or a complete one."""
    import shutil

    import torch.distributed as dist

    directory = Path(directory)
    final = directory / f"epoch_{epoch}"
    tmp = directory / f".epoch_{epoch}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    save_atomic({"weight": rows.detach().cpu()}, tmp / f"shard_{ctx.rank:05d}.pt")
    ranges = torch.tensor([lo, hi], dtype=torch.long, device=ctx.device)  # nccl needs device tensors
    gathered = [torch.empty_like(ranges) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, ranges)
    ctx.barrier()
    if ctx.is_main:
        shards = [(f"shard_{r:05d}.pt", int(g[0]), int(g[1])) for r, g in enumerate(gathered)]
        save_atomic({**meta, "shards": shards, "world_size": ctx.world_size}, tmp / MANIFEST)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    ctx.barrier()
    return final
