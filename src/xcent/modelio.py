"""Model I/O: every reader and writer of trained weights lives here.

* Checkpoints (``epoch_K.pt`` and class-sharded ``epoch_K/`` directories): atomic
  writes, ``weights_only`` loads, compatibility checks for resume.
* Safetensors exports (``xcent export``).
* :func:`load_model`: the one entry point that reads weights of any of these formats
  (checkpoint file, sharded directory, export), used by ``xcent eval``,
  ``xcent predict``, ``xcent export`` and :class:`xcent.Classifier`.

A checkpoint is a plain dict of tensors and plain values (so ``torch.load(...,
weights_only=True)`` reads it): ``weight`` (C, D), ``nu`` and ``nu_set`` (the
algorithm's dual state), ``epoch``, ``best`` (best metrics so far), ``algorithm``,
``num_classes``, ``feature_dim``, ``num_samples``, ``config`` (the resolved run
config), ``rng_state`` and ``format``; with ``--momentum`` also ``momentum_buffer``
(C, D), the SGD momentum of every row (brought up to date before the save).

A class-sharded run (:mod:`xcent.distributed`) writes a directory ``epoch_K/`` instead:
``manifest.pt`` (the same dict without ``weight``, plus ``shards``: the row range of
each file, and ``shard_checksums``) and ``shard_RRRRR.pt`` (``{"weight": rows}``,
plus ``"momentum_buffer": rows`` with ``--momentum``, checksummed like the weight).
:func:`load` assembles it into the same dict, :func:`load_rows` reads just a row
range of the weight (or, ``key="momentum_buffer"``, of the buffer) from either form,
so a run can resume with any number of processes and ``xcent eval`` reads both.

Integrity. Every dict written by :func:`save_atomic` carries ``checksums``: for each
tensor, the crc32 of each 16 MiB piece of its bytes (:func:`tensor_checksum`); an
export carries the same in its safetensors metadata. Every reader verifies them
(:func:`validate`, the one check of structure and content, called by every loader),
mmap loads included: the whole tensor is read once (crc32 runs at ~0.3-1 GB/s per
core and the pieces are spread over cores), except that :func:`load_rows` reads only
the pieces holding its rows. Hand-written on ``zlib.crc32`` because torch's zip
reader never checks the CRCs its zip container stores (a flipped bit in a tensor
loads silently, mmap or not) and safetensors stores none; files written before
checksums existed are checked against those zip CRCs instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import UsageError
from .fileio import atomic_path, why_missing
from .limits import MAX_EPOCHS
from .yamlio import load_json

FORMAT = "xcent-checkpoint-v1"
EXPORT_FORMAT = "xcent-export-v1"
_EPOCH_FILE = re.compile(r"^epoch_(\d+)(\.pt)?$")
_SHARD_FILE = re.compile(r"^shard_\d{5}\.pt$")
# what interrupted saves leave behind: atomic_path's `.epoch_K.tmpPID.pt` and the
# temporary directory `.epoch_K.tmp/` of a class-sharded save
_STALE_TEMP = re.compile(r"^\.epoch_\d+\.tmp(\d+\.pt)?$")
MANIFEST = "manifest.pt"

#: bytes of a tensor per stored crc32: a row range is verified by reading only the
#: pieces that hold it (a class shard resuming from a single-file checkpoint)
CHECKSUM_BYTES = 1 << 24

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- integrity


def _tensor_bytes(t: Tensor) -> np.ndarray:
    """The bytes of ``t`` (a CPU tensor, possibly memory-mapped) as a flat uint8 view,
    no copy for a contiguous tensor."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _pieces(data: np.ndarray, lo: int = 0, hi: int | None = None) -> list[tuple[int, int]]:
    hi = data.shape[0] if hi is None else hi
    first, last = lo // CHECKSUM_BYTES, max(lo, hi - 1) // CHECKSUM_BYTES
    return [(j * CHECKSUM_BYTES, min((j + 1) * CHECKSUM_BYTES, data.shape[0])) for j in range(first, last + 1)]


def _crcs(data: np.ndarray, pieces: list[tuple[int, int]]) -> list[int]:
    if len(pieces) == 1:
        a, b = pieces[0]
        return [zlib.crc32(data[a:b])]
    # zlib releases the GIL on large buffers: the pieces are summed on several cores
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(pieces))) as pool:
        return list(pool.map(lambda ab: zlib.crc32(data[ab[0]:ab[1]]), pieces))


def tensor_checksum(t: Tensor) -> list[int]:
    """crc32 of each :data:`CHECKSUM_BYTES` piece of the tensor's bytes, in order
    (an empty tensor has one piece, crc32 of nothing)."""
    data = _tensor_bytes(t)
    return _crcs(data, _pieces(data))


def _verify(t: Tensor, stored, name: str, where: str, rows: tuple[int, int] | None = None) -> None:
    """Check ``t`` against its stored checksum; ``rows=(lo, hi)``: only the pieces that
    hold those rows of a 2-d tensor are read."""
    data = _tensor_bytes(t)
    if rows is None:
        pieces = _pieces(data)
    else:
        lo, hi = max(0, rows[0]), min(rows[1], t.shape[0])
        if lo >= hi:
            return
        row_bytes = data.shape[0] // t.shape[0]
        pieces = _pieces(data, lo * row_bytes, hi * row_bytes)
    expected = len(_pieces(data))
    if stored is None:
        raise UsageError(f"{where}: corrupt checkpoint (tensor '{name}' has no checksum)")
    if not isinstance(stored, list) or len(stored) != expected or not all(isinstance(c, int) for c in stored):
        raise UsageError(f"{where}: corrupt checkpoint (the checksum of tensor '{name}' does not fit its size)")
    if _crcs(data, pieces) != [stored[a // CHECKSUM_BYTES] for a, _ in pieces]:
        raise UsageError(f"{where}: corrupt checkpoint (tensor '{name}' fails its checksum)")


#: rows per block of the finiteness scan: the float32 copy and flags of a block are
#: the scan's only memory, whatever the weight's size
_FINITE_CHUNK_ROWS = 1 << 14


def check_finite(t: Tensor, name: str, where: str, row_offset: int = 0) -> None:
    """Refuse rows that hold a NaN or inf *as float32*, the dtype every consumer computes
    in (a float64 file's 1e300 is finite until the cast): one :class:`UsageError`
    naming ``where``, the tensor ``name`` and the first bad row (``row_offset`` added:
    the row in the whole weight). A non-finite weight used to evaluate to ``loss nan
    top1 1.0000`` and to predict ``probs: NaN``. Scanned in blocks of
    :data:`_FINITE_CHUNK_ROWS` rows, so a memory-mapped weight is never copied whole."""
    for start in range(0, t.shape[0] if t.ndim else 1, _FINITE_CHUNK_ROWS):
        block = (t[start:start + _FINITE_CHUNK_ROWS] if t.ndim else t.reshape(1)).to(torch.float32)
        bad = ~torch.isfinite(block.reshape(block.shape[0], -1)).all(dim=1)
        if bool(bad.any()):
            row = row_offset + start + int(bad.nonzero()[0, 0])
            raise UsageError(f"{where}: '{name}' holds a value that is not finite in float32 (NaN, inf or "
                             f"beyond +-3.4e38) in row {row}")


def _verify_zip(path: Path, where: str) -> None:
    """A checkpoint written before tensor checksums existed: check the CRC-32 that the
    zip container of ``torch.save`` stores for every record (torch's reader never
    checks them, mmap or not). Reads the whole file once. A legacy non-zip file has
    none: accepted with a warning."""
    if not zipfile.is_zipfile(path):
        log.warning("%s: no checksums (legacy torch.save format): integrity not verified", where)
        return
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise UsageError(f"{where}: corrupt checkpoint (its zip container cannot be read: {type(exc).__name__})")
    if bad is not None:
        raise UsageError(f"{where}: corrupt checkpoint (record '{bad}' fails its zip CRC)")


def with_checksums(obj: dict) -> dict:
    """``obj`` plus ``checksums``: name -> :func:`tensor_checksum` of each tensor value."""
    return {**obj, "checksums": {k: tensor_checksum(v) for k, v in obj.items() if isinstance(v, Tensor)}}


def save_atomic(obj, path) -> None:
    """``torch.save`` to a temp file in the same directory, then ``os.replace``: a
    crash leaves either the old file or the new one, never half of one. A dict gets
    the checksums of its tensors (:func:`with_checksums`), verified by every reader."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, dict):
        obj = with_checksums({k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in obj.items()})
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def clean_stale_temp(checkpoints_dir) -> list[Path]:
    """Remove what interrupted saves left in ``checkpoints_dir`` (``.epoch_K.tmpPID.pt``
    files, ``.epoch_K.tmp/`` directories of sharded saves); returns what was removed.
    Call it at the start of a run or resume of that run directory, which no other
    process writes to then."""
    directory = Path(checkpoints_dir)
    removed = []
    if not directory.is_dir():
        return removed
    for name in sorted(os.listdir(directory)):
        path = directory / name
        if not _STALE_TEMP.match(name):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.warning("removed %d temporary file(s) of interrupted checkpoint saves in %s", len(removed), directory)
    return removed


# --------------------------------------------------------------------------- validation

#: the (C, D) tensors of a checkpoint, read by row range (:func:`load_rows`); a sharded
#: checkpoint keeps them in its shard files
ROW_KEYS = ("weight", "momentum_buffer")

#: keys of a checkpoint that resume reads (a manifest has all but ``weight``)
RESUME_KEYS = ("weight", "nu", "nu_set", "epoch", "best", "algorithm", "num_classes", "feature_dim",
               "num_samples", "config", "rng_state")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(ckpt, path, flag: str = "--resume", *, resume: bool = True, manifest: bool = False,
             verify_weight: bool = True) -> dict:
    """The one check of a loaded checkpoint dict (file, or sharded ``manifest``) that
    every reader calls: its structure (a crafted file: missing keys, a short ``weight``
    or ``nu``, a negative epoch, wrong dtypes) and the checksums of its tensors. A
    problem is one :class:`UsageError` naming ``flag`` and ``path``. ``resume=False``
    requires only the keys that reading the weights needs (eval, predict, export);
    whatever else the file holds is checked all the same. ``verify_weight=False``
    leaves the checksums of the weight and the momentum buffer to :func:`load_rows`.
    Returns ``ckpt``.

    A checkpoint without checksums (written by an xcent before they existed) is
    accepted, not refused: refusing would strand every run trained so far. Its
    structure is checked as any other, and its content against the CRC-32s of its
    zip container (:func:`_verify_zip`)."""
    where = f"{flag} {path}"
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UsageError(f"{where}: not an xcent checkpoint")

    def bad(reason):
        return UsageError(f"{where}: invalid checkpoint ({reason})")

    required = [k for k in RESUME_KEYS if resume or k in ("weight", "num_classes", "feature_dim", "epoch")]
    if manifest:
        required = [k for k in required if k != "weight"] + ["shards"]
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise bad(f"missing {', '.join(repr(k) for k in missing)}")
    for key in ("num_classes", "feature_dim", "num_samples"):
        if key in ckpt and not (_is_int(ckpt[key]) and ckpt[key] > 0):
            raise bad(f"'{key}' is {ckpt[key]!r}, not a positive integer")
    if not (_is_int(ckpt["epoch"]) and 0 <= ckpt["epoch"] <= MAX_EPOCHS):
        raise bad(f"'epoch' is {ckpt['epoch']!r}, not a whole number in [0, {MAX_EPOCHS}]")
    for key, kind in (("best", dict), ("config", dict), ("algorithm", str)):
        if key in ckpt and not isinstance(ckpt[key], kind):
            raise bad(f"'{key}' is a {type(ckpt[key]).__name__}, not a {kind.__name__}")
    num_classes, feature_dim = ckpt["num_classes"], ckpt["feature_dim"]
    if "weight" in ckpt:
        w = ckpt["weight"]
        if not isinstance(w, Tensor) or w.ndim != 2 or not w.is_floating_point():
            raise bad("'weight' is not a 2-d float tensor")
        if tuple(w.shape) != (num_classes, feature_dim):
            raise bad(f"'weight' is {tuple(w.shape)}, num_classes x feature_dim is {(num_classes, feature_dim)}")
    if "momentum_buffer" in ckpt:
        b = ckpt["momentum_buffer"]
        if not isinstance(b, Tensor) or not b.is_floating_point() or tuple(b.shape) != (num_classes, feature_dim):
            raise bad(f"'momentum_buffer' is not a {(num_classes, feature_dim)} float tensor")
    for key, ok, kind in (("nu", lambda t: t.is_floating_point(), "float"), ("nu_set", lambda t: t.dtype == torch.bool,
                          "bool")):
        if key not in ckpt:
            continue
        t = ckpt[key]
        if not isinstance(t, Tensor) or t.ndim != 1 or not ok(t):
            raise bad(f"'{key}' is not a 1-d {kind} tensor")
        if "num_samples" in ckpt and t.shape[0] != ckpt["num_samples"]:
            raise bad(f"'{key}' has {t.shape[0]} entries, num_samples is {ckpt['num_samples']}")
    if "rng_state" in ckpt and not (isinstance(ckpt["rng_state"], Tensor) and ckpt["rng_state"].dtype == torch.uint8):
        raise bad("'rng_state' is not a uint8 tensor")
    if manifest:
        _check_shards(ckpt, num_classes, bad)
    checksums = ckpt.get("checksums")
    if checksums is None:
        _verify_zip(Path(path), where)
    elif not isinstance(checksums, dict):
        raise bad("'checksums' is not a dict")
    else:
        for key, value in ckpt.items():
            if isinstance(value, Tensor) and not (key in ROW_KEYS and not verify_weight):
                if key not in checksums:
                    raise UsageError(f"{where}: corrupt checkpoint (tensor '{key}' has no checksum)")
                _verify(value, checksums[key], key, where)
    # intact, but a diverged or hand-made state: refused by the content check below
    if verify_weight:
        for key in ROW_KEYS:
            if key in ckpt:
                check_finite(ckpt[key], key, where)
    if "nu" in ckpt and "nu_set" in ckpt and ckpt["nu"].shape == ckpt["nu_set"].shape:
        # NaN marks a dual never set; a set one must be finite
        nu = ckpt["nu"]
        check_finite(torch.where(ckpt["nu_set"], nu, torch.zeros_like(nu)), "nu", where)
    return ckpt


def _check_shards(manifest: dict, num_classes: int, bad) -> None:
    """``shards``: ``(file name, lo, hi)`` rows, in order, covering ``[0, num_classes)``."""
    shards = manifest["shards"]
    if not isinstance(shards, (list, tuple)) or not shards:
        raise bad("'shards' is not a list of (file, lo, hi)")
    edge = 0
    for entry in shards:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], str)
                and _SHARD_FILE.match(entry[0]) and _is_int(entry[1]) and _is_int(entry[2])):
            raise bad(f"shard entry {entry!r} is not (shard_RRRRR.pt, lo, hi)")
        if entry[1] != edge or entry[2] < entry[1]:
            raise bad(f"shard {entry[0]} covers rows {entry[1]}..{entry[2]}, expected to start at {edge}")
        edge = entry[2]
    if edge != num_classes:
        raise bad(f"the shards cover {edge} rows, num_classes is {num_classes}")
    sums = manifest.get("shard_checksums")
    if sums is not None and not (isinstance(sums, dict) and all(e[0] in sums for e in shards)):
        raise bad("'shard_checksums' does not list every shard")


def _torch_load(path: Path, flag: str, map_location="cpu", mmap: bool = False):
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:
        raise UsageError(f"{flag} {path}: corrupt or not an xcent checkpoint, cannot be read "
                         f"({type(exc).__name__})")


def _load_manifest(path: Path, flag: str, resume: bool = True) -> dict:
    if not (path / MANIFEST).is_file():
        raise UsageError(f"{flag} {path}: not an xcent checkpoint (no {MANIFEST})")
    manifest = _torch_load(path / MANIFEST, flag)
    return validate(manifest, path / MANIFEST, flag, resume=resume, manifest=True)


def _load_shard(directory: Path, name: str, s_lo: int, s_hi: int, manifest: dict, flag: str,
                rows: tuple[int, int], key: str = "weight") -> Tensor | None:
    """One shard's ``key`` rows (the weight or the momentum buffer; None when the shard
    has no buffer), memory-mapped, its structure checked and the pieces that hold
    ``rows`` (shard-local) verified against the shard's own checksums; the shard's
    weight checksum must be the manifest's record of it (a shard of another save in
    its place is refused)."""
    path = directory / name
    where = f"{flag} {path}"
    if not path.is_file():
        raise UsageError(f"{where}: missing shard of a sharded checkpoint")
    shard = _torch_load(path, flag, mmap=True)
    if not isinstance(shard, dict):
        raise UsageError(f"{where}: invalid checkpoint (a shard is not a dict)")
    if key != "weight" and key not in shard:
        return None
    w = shard.get(key)
    shape = (s_hi - s_lo, manifest["feature_dim"])
    if not isinstance(w, Tensor) or w.ndim != 2 or not w.is_floating_point() or tuple(w.shape) != shape:
        raise UsageError(f"{where}: invalid checkpoint (shard '{key}' is not a {shape} float tensor)")
    checksums = shard.get("checksums") or {}
    recorded = (manifest.get("shard_checksums") or {}).get(name)
    if recorded is not None and checksums.get("weight") != recorded:
        raise UsageError(f"{where}: corrupt checkpoint (the shard is not the one its manifest records)")
    if not checksums:
        _verify_zip(path, where)
    else:
        _verify(w, checksums.get(key), key, where, rows=rows)
    check_finite(w[rows[0]:rows[1]], key, where, row_offset=s_lo + rows[0])
    return w


def load_rows(path, lo: int, hi: int, flag: str = "--resume", key: str = "weight") -> Tensor | None:
    """Rows ``lo:hi`` of the weight (``key="momentum_buffer"``: of the momentum buffer;
    None when the checkpoint has none) of a checkpoint file or sharded directory, read
    memory-mapped so that only those rows (and the checksum pieces holding them) are
    brought into memory; verified, errors name ``flag``. A sharded checkpoint is read
    with any row range, so a run resumes with another number of processes."""
    assert key in ROW_KEYS, key
    path = Path(path)
    if path.is_dir():
        manifest = _load_manifest(path, flag, resume=False)
        parts, missing = [], []
        for name, s_lo, s_hi in manifest["shards"]:
            a, b = max(lo, s_lo), min(hi, s_hi)
            if a < b:
                shard = _load_shard(path, name, s_lo, s_hi, manifest, flag, rows=(a - s_lo, b - s_lo), key=key)
                if shard is None:
                    missing.append(name)
                else:
                    parts.append(shard[a - s_lo:b - s_lo].clone())
        if missing and parts:  # every rank saves a buffer or none does
            raise UsageError(f"{flag} {path / missing[0]}: invalid checkpoint (shard has no '{key}', others do)")
        if missing:
            return None
        return torch.cat(parts) if parts else torch.empty(0)
    ckpt = _load_file(path, flag, mmap=True, resume=False, verify_weight=False)
    rows = ckpt.get(key)
    if rows is None:
        return None
    if ckpt.get("checksums") is not None:
        _verify(rows, ckpt["checksums"].get(key), key, f"{flag} {path}", rows=(lo, hi))
    check_finite(rows[lo:hi], key, f"{flag} {path}", row_offset=lo)
    return rows[lo:hi].clone()


def _load_file(path: Path, flag: str, map_location="cpu", mmap: bool = False, resume: bool = True,
               verify_weight: bool = True) -> dict:
    if not path.is_file():
        raise UsageError(f"{flag} {path}: {why_missing(path) if not path.exists() else 'not a file'}")
    return validate(_torch_load(path, flag, map_location, mmap), path, flag, resume=resume,
                    verify_weight=verify_weight)


def load(path, map_location="cpu", mmap: bool = False, weight: bool = True, flag: str = "--resume",
         resume: bool = True) -> dict:
    """Load and verify a checkpoint file or sharded directory (assembled into one
    dict); anything wrong (unreadable, crafted, failing a checksum) is a one-line
    ``UsageError`` naming ``flag`` and the file (see :func:`validate`). ``resume``:
    require the training state too. ``weight=False`` leaves the rows on disk (the
    dict then has neither ``weight`` nor ``momentum_buffer``; the file's are neither
    kept nor verified here): resume reads only the metadata and duals, each rank
    then :func:`load_rows` (which verifies) its own classes."""
    path = Path(path)
    if path.is_dir():
        ckpt = dict(_load_manifest(path, flag, resume=resume))
        if weight:
            for key in ROW_KEYS:
                rows = load_rows(path, 0, ckpt["num_classes"], flag, key=key)
                if rows is not None:
                    ckpt[key] = rows
        return ckpt
    ckpt = _load_file(path, flag, map_location, mmap, resume=resume, verify_weight=weight)
    if not weight:
        ckpt = {k: v for k, v in ckpt.items() if k not in ROW_KEYS}
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


#: the checkpoint ``--keep-best`` keeps: ``best.pt`` (one process) or ``best/`` (sharded)
BEST_NAMES = ("best.pt", "best")


def resolve_checkpoint(path, flag: str = "--checkpoint") -> Path:
    """``best`` or ``latest`` as the last part of ``path`` (alone, after a run
    directory, or after its ``checkpoints/``) names that run's kept best checkpoint
    or its newest epoch checkpoint; an existing path is returned unchanged."""
    path = Path(path)
    if path.exists() or path.name not in ("best", "latest"):
        return path
    parent = path.parent
    directory = parent / "checkpoints" if (parent / "checkpoints").is_dir() else parent
    if path.name == "latest":
        found = latest(directory)
    else:
        found = next((directory / n for n in BEST_NAMES if (directory / n).exists()), None)
    if found is None:
        raise UsageError(f"{flag} {path}: no {path.name} checkpoint in {directory}")
    return found


def check_compatible(ckpt: dict, path, algorithm: str, num_classes: int, feature_dim: int,
                     num_samples: int) -> None:
    """Refuse to resume a checkpoint of another algorithm or other shapes."""
    wanted = {"algorithm": algorithm, "num_classes": num_classes, "feature_dim": feature_dim,
              "num_samples": num_samples}
    for key, value in wanted.items():
        if ckpt.get(key) != value:
            raise UsageError(f"--resume {path}: incompatible checkpoint ({key} is {ckpt.get(key)!r}, "
                             f"this run has {value!r})")


def save_sharded(ctx, directory, epoch: int, rows: torch.Tensor, lo: int, hi: int, meta: dict,
                 momentum_buffer: Tensor | None = None, name: str | None = None) -> Path:
    """Write a sharded checkpoint ``directory/epoch_K/`` (or ``directory/name/``) from
    every rank (collective).

    Each rank writes its rows (and ``momentum_buffer``, its rows of the SGD momentum,
    already brought up to date) into a temporary directory; after a barrier rank 0
    writes the manifest and renames the directory into place, so a crash leaves
    either no ``epoch_K/`` or a complete one."""
    import torch.distributed as dist

    directory = Path(directory)
    final = directory / (name or f"epoch_{epoch}")
    tmp = directory / f".{final.name}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    shard = {"weight": rows.detach().cpu()}
    if momentum_buffer is not None:
        shard["momentum_buffer"] = momentum_buffer.detach().cpu()
    save_atomic(shard, tmp / f"shard_{ctx.rank:05d}.pt")
    ranges = torch.tensor([lo, hi], dtype=torch.long, device=ctx.device)  # nccl needs device tensors
    gathered = [torch.empty_like(ranges) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, ranges)
    ctx.barrier()
    if ctx.is_main:
        shards = [(f"shard_{r:05d}.pt", int(g[0]), int(g[1])) for r, g in enumerate(gathered)]
        # the manifest records each shard's checksums (read back from the small pickle,
        # the rows stay on disk), so a shard of another save in its place is refused
        sums = {name: torch.load(tmp / name, weights_only=True, mmap=True)["checksums"]["weight"]
                for name, _, _ in shards}
        save_atomic({**meta, "shards": shards, "shard_checksums": sums, "world_size": ctx.world_size},
                    tmp / MANIFEST)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    ctx.barrier()
    return final


# --------------------------------------------------------------------------- any trained weights


def _is_safetensors(path: Path) -> bool:
    """Sniff the format rather than trust the suffix: a safetensors file starts with
    an 8-byte little-endian header length followed by a JSON object; a ``torch.save``
    file is a zip archive (``PK``) or a pickle."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return header_len + 8 <= path.stat().st_size


def read_label_names(path, num_classes: int | None = None, flag: str = "--label-names") -> list[str]:
    """Class names from a ``classes.txt`` (line i = name of label i); a ``UsageError``
    naming ``flag`` if the file is missing or its line count is not ``num_classes``."""
    from .data import read_class_names

    path = Path(path)
    if not path.exists():
        raise UsageError(f"{flag} {path}: {why_missing(path)}")
    try:
        names = read_class_names(path)
    except UsageError as exc:
        raise UsageError(f"{flag} {exc}") from None
    if num_classes is not None and len(names) != num_classes:
        raise UsageError(f"{flag} {path}: {len(names)} names for {num_classes} classes")
    return names


def _names_from_data_dir(data_dir, num_classes: int) -> list[str] | None:
    """``DATA_DIR/classes.txt`` when it exists and has one line per class. A file
    that does not match is ignored, not an error: the user did not ask for it."""
    if not data_dir:
        return None
    from .data import read_class_names

    try:
        names = read_class_names(Path(data_dir) / "classes.txt")
    except UsageError:  # missing, a directory, not UTF-8: not asked for, so not an error
        return None
    return names if len(names) == num_classes else None


def _load_safetensors(path: Path, device, flag: str) -> tuple[Tensor, dict]:
    from safetensors import safe_open

    where = f"{flag} {path}"
    try:
        # tensors are read on the CPU, where their bytes are verified, then moved
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            keys = set(f.keys())
            ours = header.get("format") == EXPORT_FORMAT and "weight" in keys
            tensors = {k: f.get_tensor(k) for k in ("weight", "label_names") if ours and k in keys}
    except Exception as exc:  # safetensors raises its own error types and plain ones on garbage
        raise UsageError(f"{where}: corrupt or not safetensors, cannot be read ({type(exc).__name__})")
    if not ours:
        raise UsageError(f"{where}: a safetensors file but not an xcent export "
                         f"(no format={EXPORT_FORMAT} metadata or no 'weight' tensor)")
    if header.get("checksums") is None:
        log.warning("%s: no checksums (written by an older xcent): integrity not verified", where)
    else:
        try:
            sums = load_json(header["checksums"])
        except ValueError:
            sums = None
        if not isinstance(sums, dict):
            raise UsageError(f"{where}: corrupt export (its 'checksums' metadata is not a JSON object)")
        for key, t in tensors.items():
            if key not in sums:
                raise UsageError(f"{where}: corrupt export (tensor '{key}' has no checksum)")
            _verify(t, sums[key], key, where)
    weight, blob = tensors["weight"], tensors.get("label_names")
    if isinstance(weight, Tensor) and weight.is_floating_point():
        check_finite(weight, "weight", where)
    # names travel as one UTF-8 byte tensor joined by newlines rather than in the
    # header: the header is capped (100 MB) and every reader parses it whole
    try:
        names = None if blob is None else blob.numpy().tobytes().decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise UsageError(f"{where}: invalid export (label names are not UTF-8)")

    def opt_int(key):
        return int(header[key]) if header.get(key, "") != "" else None

    try:
        meta = {"num_classes": int(header["num_classes"]), "feature_dim": int(header["feature_dim"]),
                "algorithm": header.get("algorithm") or None, "epoch": opt_int("epoch"),
                "num_samples": opt_int("num_samples"), "label_names": names, "data_dir": None,
                "source": "safetensors"}
    except (KeyError, ValueError) as exc:
        raise UsageError(f"{where}: broken xcent export metadata ({type(exc).__name__}: {exc})")
    return weight.to(device), meta


def _load_checkpoint(path: Path, device, flag: str) -> tuple[Tensor, dict]:
    # mmap: only the pieces read to verify them are paged in
    ckpt = load(path, map_location="cpu", mmap=True, flag=flag, resume=False)
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    meta = {
        "num_classes": ckpt["num_classes"], "feature_dim": ckpt["feature_dim"],
        "algorithm": ckpt.get("algorithm"), "epoch": ckpt["epoch"], "num_samples": ckpt.get("num_samples"),
        "label_names": None, "data_dir": config.get("data_dir"), "source": "checkpoint",
    }
    return ckpt["weight"].to(device), meta


def load_model(path, device="cpu", flag: str = "--checkpoint") -> tuple[Tensor, dict]:
    """Read trained weights: ``(weight (C, D), meta)``.

    ``path`` is an xcent checkpoint (a ``.pt`` file or a class-sharded ``epoch_K/``
    directory; ``RUN_DIR/best`` or ``RUN_DIR/latest``, see :func:`resolve_checkpoint`)
    or an ``xcent export`` safetensors file (told apart by content, not by
    name). ``meta`` has ``num_classes``, ``feature_dim``,
    ``algorithm``, ``epoch``, ``num_samples``, ``label_names`` (a list when the file
    carries them, else None), ``data_dir`` (the training data dir, when known) and
    ``source``. Every file is verified (structure, checksums and a weight finite in
    float32, see :func:`validate` and :func:`check_finite`);
    anything wrong is a one-line ``UsageError`` naming ``flag`` and the file. This is
    the single entry point for every reader of weights; extend it for new formats.
    """
    path = resolve_checkpoint(path, flag)
    if not path.exists():
        raise UsageError(f"{flag} {path}: {why_missing(path)}")
    # a directory is a class-sharded checkpoint (epoch_K/ with a manifest), which
    # load() assembles into the same dict as a single file
    reader = _load_safetensors if path.is_file() and _is_safetensors(path) else _load_checkpoint
    weight, meta = reader(path, device, flag)
    if not isinstance(weight, Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        raise UsageError(f"{flag} {path}: 'weight' is not a 2-d float tensor")
    if tuple(weight.shape) != (meta["num_classes"], meta["feature_dim"]):
        raise UsageError(f"{flag} {path}: weight shape {tuple(weight.shape)} does not match num_classes "
                         f"{meta['num_classes']} x feature_dim {meta['feature_dim']}")
    if meta["num_classes"] < 1 or meta["feature_dim"] < 1:
        raise UsageError(f"{flag} {path}: weight shape {tuple(weight.shape)}: no classes or no features")
    if meta["epoch"] is not None and not 0 <= meta["epoch"] <= MAX_EPOCHS:
        raise UsageError(f"{flag} {path}: epoch {meta['epoch']} is not a whole number in [0, {MAX_EPOCHS}]")
    if meta["label_names"] is not None and len(meta["label_names"]) != meta["num_classes"]:
        raise UsageError(f"{flag} {path}: {len(meta['label_names'])} label names for "
                         f"{meta['num_classes']} classes")
    return weight, meta


def export_safetensors(weight: Tensor, meta: dict, out: Path) -> None:
    """Write ``weight`` and ``meta`` as safetensors atomically (see ``xcent export``)."""
    from safetensors.torch import save_file

    tensors = {"weight": weight.detach().to("cpu").contiguous()}
    names = meta.get("label_names")
    if names is not None:
        if any("\n" in n for n in names):
            raise UsageError("label names must not contain newlines")
        blob = "\n".join(names).encode("utf-8")
        tensors["label_names"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob \
            else torch.zeros(0, dtype=torch.uint8)
    header = {"format": EXPORT_FORMAT, "num_classes": str(int(weight.shape[0])),
              "feature_dim": str(int(weight.shape[1])), "algorithm": str(meta.get("algorithm") or ""),
              "epoch": "" if meta.get("epoch") is None else str(int(meta["epoch"])),
              "num_samples": "" if meta.get("num_samples") is None else str(int(meta["num_samples"])),
              "checksums": json.dumps({k: tensor_checksum(t) for k, t in tensors.items()})}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=header)


# --------------------------------------------------------------------------- reference checkpoints

#: where a converted checkpoint says it came from
REFERENCE = "Optimization-AI/SCENT xc/train.py"


def import_reference(path, algorithm: str, num_samples: int | None = None,
                     flag: str = "--checkpoint") -> tuple[dict, dict]:
    """Convert a checkpoint of the reference implementation (Optimization-AI/SCENT,
    ``xc/train.py``) into an xcent checkpoint dict, ready for :func:`save_atomic`.

    The reference saves ``{"model_state": LinearClassifier.state_dict(),
    "optimizer_state": SGD.state_dict(), "epoch": E, "criterion_nu": nu}``: the model's
    one parameter is ``fc.weight`` (an ``nn.Linear(D, C, bias=False)``, so (C, D), the
    layout of xcent's ``weight``), ``epoch`` counts finished epochs (as xcent's does, so a
    resume starts at E + 1), and ``criterion_nu`` (N, 1) or (N,) float32 holds one dual
    per training row for the dual algorithms (absent for bsgd). The reference marks a dual
    that was never set with ``nu == 0``; exactly those become unset here (xcent keeps an
    explicit mask, ``nu_set``). ``num_samples`` is needed only for bsgd, whose checkpoint
    records no per-row state.

    Not carried over: the optimizer state (plain SGD keeps none; a momentum buffer of the
    reference's momentum variant is dropped and reported, xcent's step has no momentum),
    the scheduler state (xcent's learning rate is a function of the epoch) and the best
    metrics (kept by the reference in its JSONL, not in the checkpoint). Returns
    ``(checkpoint, report)``; the report lists what was found and what was dropped.
    """
    from .losses import BSGD, REGISTRY

    where = f"{flag} {path}"
    if algorithm not in REGISTRY:
        raise UsageError(f"--algorithm must be one of {', '.join(REGISTRY)}, got {algorithm!r}")
    has_dual = not issubclass(REGISTRY[algorithm].cls, BSGD)
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{where}: {why_missing(path) if not path.exists() else 'not a file'}")
    try:
        # weights_only: a checkpoint from elsewhere is never unpickled as code
        ref = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"{where}: cannot be read as a torch checkpoint ({type(exc).__name__})")
    if isinstance(ref, dict) and ref.get("format") == FORMAT:
        raise UsageError(f"{where}: already an xcent checkpoint; use it as it is")
    if not isinstance(ref, dict) or not isinstance(ref.get("model_state"), dict):
        raise UsageError(f"{where}: not a checkpoint of the reference implementation (no 'model_state' dict)")
    state = {k.removeprefix("module."): v for k, v in ref["model_state"].items()}
    weight = state.pop("fc.weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        raise UsageError(f"{where}: 'model_state' has no 2-d float 'fc.weight' (the reference's LinearClassifier)")
    if state:
        raise UsageError(f"{where}: 'model_state' holds {sorted(state)[0]!r} besides 'fc.weight'; "
                         f"not the reference's bias-free linear classifier")
    num_classes, feature_dim = (int(n) for n in weight.shape)
    if num_classes < 1 or feature_dim < 1:
        raise UsageError(f"{where}: 'fc.weight' is {tuple(weight.shape)}: a classifier needs at least one class "
                         f"and one feature")
    epoch = ref.get("epoch", 0)  # the reference's own loader starts at 0 without one
    if not (_is_int(epoch) and 0 <= epoch <= MAX_EPOCHS):
        raise UsageError(f"{where}: 'epoch' is {epoch!r}, not a whole number in [0, {MAX_EPOCHS}]")
    weight = weight.detach().to(torch.float32).contiguous()
    check_finite(weight, "fc.weight", where)  # after the cast: a float64 1e300 becomes inf

    ref_nu = ref.get("criterion_nu")
    if has_dual and ref_nu is None:
        raise UsageError(f"{where}: no 'criterion_nu' (a bsgd checkpoint?), but --algorithm {algorithm} needs duals")
    if not has_dual and ref_nu is not None:
        raise UsageError(f"{where}: holds 'criterion_nu' (a dual algorithm's checkpoint), but --algorithm is "
                         f"{algorithm}; name the algorithm it was trained with")
    if ref_nu is not None:
        if not isinstance(ref_nu, Tensor) or not ref_nu.is_floating_point() or ref_nu.ndim not in (1, 2) \
                or (ref_nu.ndim == 2 and ref_nu.shape[1] != 1):
            raise UsageError(f"{where}: 'criterion_nu' is not an (N,) or (N, 1) float tensor")
        ref_nu = ref_nu.reshape(-1).to(torch.float32)
        if num_samples is not None and num_samples != len(ref_nu):
            raise UsageError(f"{where}: 'criterion_nu' has {len(ref_nu)} rows, the data {num_samples}")
        if not torch.isfinite(ref_nu).all():
            raise UsageError(f"{where}: 'criterion_nu' holds non-finite values")
        num_samples = len(ref_nu)
        nu_set = ref_nu != 0  # the reference's marker of a dual never set
        nu = torch.where(nu_set, ref_nu, torch.full_like(ref_nu, float("nan")))
    else:
        if num_samples is None:
            raise UsageError(f"{where}: a bsgd checkpoint does not record the number of training rows; "
                             f"pass --data-dir (the data it was trained on)")
        nu = torch.full((num_samples,), float("nan"))
        nu_set = torch.zeros(num_samples, dtype=torch.bool)
    if num_samples <= 0:
        raise UsageError(f"{where}: 'criterion_nu' is empty")

    report = {"epoch": epoch, "num_classes": num_classes, "feature_dim": feature_dim, "num_samples": num_samples,
              "num_unset": int((~nu_set).sum()) if has_dual else None, "dropped": []}
    opt = _optimizer_state(ref.get("optimizer_state"), where)
    if opt is not None:
        group = opt["param_groups"][0] if opt["param_groups"] else {}
        for key in ("lr", "initial_lr", "momentum"):  # reported only, so only plain numbers
            value = group.get(key)
            report[key] = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        if any(s.get("momentum_buffer") is not None for s in opt["state"].values()):
            report["dropped"].append("the optimizer's momentum buffer (xcent's step has no momentum)")
    for key in ref:
        if "sched" in key:
            report["dropped"].append(f"'{key}' (xcent's learning rate is a function of the epoch)")
    ckpt = {
        "format": FORMAT, "weight": weight, "nu": nu, "nu_set": nu_set,
        "epoch": epoch, "best": {}, "algorithm": algorithm, "num_classes": num_classes, "feature_dim": feature_dim,
        "num_samples": num_samples, "config": {},
        # resume restores this generator state; the reference's is not in its checkpoint
        "rng_state": torch.Generator().manual_seed(0).get_state(), "world_size": 1,
        "imported_from": {"format": REFERENCE, "path": str(path)},
    }
    # what is written is what every reader accepts: the one check they all run
    validate(with_checksums(ckpt), path, flag)
    return ckpt, report


def _optimizer_state(opt, where: str) -> dict | None:
    """The reference's ``optimizer_state`` (``torch.optim.Optimizer.state_dict()``:
    ``param_groups`` a list of dicts, ``state`` a dict of dicts), or None when absent;
    anything else is a UsageError naming it."""
    if opt is None:
        return None
    if not isinstance(opt, dict):
        raise UsageError(f"{where}: 'optimizer_state' is a {type(opt).__name__}, not an optimizer's state_dict")
    groups, state = opt.get("param_groups", []), opt.get("state", {})
    if not (isinstance(groups, list | tuple) and all(isinstance(g, dict) for g in groups)):
        raise UsageError(f"{where}: 'optimizer_state' has 'param_groups' {type(groups).__name__} "
                         f"{str(groups)[:40]}, not a list of dicts (an optimizer's state_dict)")
    if not (isinstance(state, dict) and all(isinstance(v, dict) for v in state.values())):
        raise UsageError(f"{where}: 'optimizer_state' has 'state' {type(state).__name__} {str(state)[:40]}, "
                         f"not a dict of dicts (an optimizer's state_dict)")
    return {"param_groups": list(groups), "state": state}
