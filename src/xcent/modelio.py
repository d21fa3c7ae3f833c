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
import struct
from pathlib import Path

import torch
from torch import Tensor

from .errors import UsageError
from .fileio import atomic_path

FORMAT = "xcent-checkpoint-v1"
EXPORT_FORMAT = "xcent-export-v1"
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
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        names = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag} {path}: cannot be read ({type(exc).__name__})")
    if num_classes is not None and len(names) != num_classes:
        raise UsageError(f"{flag} {path}: {len(names)} names for {num_classes} classes")
    return names


def _names_from_data_dir(data_dir, num_classes: int) -> list[str] | None:
    """``DATA_DIR/classes.txt`` when it exists and has one line per class. A file
    that does not match is ignored, not an error: the user did not ask for it."""
    if not data_dir:
        return None
    path = Path(data_dir) / "classes.txt"
    if not path.is_file():
        return None
    try:
        names = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    return names if len(names) == num_classes else None


def _load_safetensors(path: Path, device) -> tuple[Tensor, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = f.metadata() or {}
            keys = set(f.keys())
            ours = header.get("format") == EXPORT_FORMAT and "weight" in keys
            weight = f.get_tensor("weight") if ours else None
            blob = f.get_tensor("label_names") if ours and "label_names" in keys else None
    except Exception as exc:  # safetensors raises its own error types and plain ones on garbage
        raise UsageError(f"checkpoint {path}: cannot be read as safetensors ({type(exc).__name__})")
    if not ours:
        raise UsageError(f"checkpoint {path}: a safetensors file but not an xcent export "
                         f"(no format={EXPORT_FORMAT} metadata or no 'weight' tensor)")
    # names travel as one UTF-8 byte tensor joined by newlines rather than in the
    # header: the header is capped (100 MB) and every reader parses it whole
    names = None if blob is None else blob.cpu().numpy().tobytes().decode("utf-8").split("\n")

    def opt_int(key):
        return int(header[key]) if header.get(key, "") != "" else None

    try:
        meta = {"num_classes": int(header["num_classes"]), "feature_dim": int(header["feature_dim"]),
                "algorithm": header.get("algorithm") or None, "epoch": opt_int("epoch"),
                "num_samples": opt_int("num_samples"), "label_names": names, "data_dir": None,
                "source": "safetensors"}
    except (KeyError, ValueError) as exc:
        raise UsageError(f"checkpoint {path}: broken xcent export metadata ({type(exc).__name__}: {exc})")
    return weight, meta


def _load_checkpoint(path: Path, device) -> tuple[Tensor, dict]:
    # mmap: the dual state nu (one float per training row) is never paged in
    ckpt = load(path, map_location="cpu", mmap=True)
    config = ckpt.get("config") or {}
    weight = ckpt["weight"]
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise UsageError(f"checkpoint {path}: 'weight' is not a (num_classes, feature_dim) tensor")
    meta = {
        "num_classes": int(ckpt.get("num_classes", weight.shape[0])),
        "feature_dim": int(ckpt.get("feature_dim", weight.shape[-1])),
        "algorithm": ckpt.get("algorithm"), "epoch": ckpt.get("epoch"), "num_samples": ckpt.get("num_samples"),
        "label_names": None, "data_dir": config.get("data_dir"), "source": "checkpoint",
    }
    return weight.to(device), meta


def load_model(path, device="cpu", flag: str = "--checkpoint") -> tuple[Tensor, dict]:
    """Read trained weights: ``(weight (C, D), meta)``.

    ``path`` is an xcent checkpoint (a ``.pt`` file or a class-sharded ``epoch_K/``
    directory) or an ``xcent export`` safetensors file (told apart by content, not by
    name). ``meta`` has ``num_classes``, ``feature_dim``,
    ``algorithm``, ``epoch``, ``num_samples``, ``label_names`` (a list when the file
    carries them, else None), ``data_dir`` (the training data dir, when known) and
    ``source``. Anything else is a one-line ``UsageError`` naming ``flag``. This is the single
    entry point for every reader of weights; extend it for new formats.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        # a directory is a class-sharded checkpoint (epoch_K/ with a manifest), which
        # xcent.checkpoint.load assembles into the same dict as a single file
        reader = _load_safetensors if path.is_file() and _is_safetensors(path) else _load_checkpoint
        weight, meta = reader(path, device)
    except UsageError as exc:
        # the readers say "checkpoint PATH: ..."; name the flag the user typed instead
        text = str(exc)
        raise UsageError(f"{flag} {text[len('checkpoint '):]}" if text.startswith("checkpoint ") else text) from None
    if not isinstance(weight, Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        raise UsageError(f"{flag} {path}: 'weight' is not a 2-d float tensor")
    if tuple(weight.shape) != (meta["num_classes"], meta["feature_dim"]):
        raise UsageError(f"{flag} {path}: weight shape {tuple(weight.shape)} does not match num_classes "
                         f"{meta['num_classes']} x feature_dim {meta['feature_dim']}")
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
              "num_samples": "" if meta.get("num_samples") is None else str(int(meta["num_samples"]))}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=header)
