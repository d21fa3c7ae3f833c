"""Applying a trained classifier: top-k prediction over all C classes, export, a Python API.

* :func:`load_model` is the one function that reads trained weights, from an xcent
  checkpoint (``epoch_K.pt``, or a class-sharded ``epoch_K/`` directory) or a
  safetensors export; :class:`Classifier`, ``xcent predict``, ``xcent export`` and
  ``xcent eval`` all go through it, so a new format only needs a branch there.
* :func:`topk_softmax` is the memory-bounded kernel. For a block of n rows it walks
  the C classes in chunks of ``class_chunk`` and keeps, per row,

      a running top-k of the scores  s_ic = w_c . x_i   (merge: top-k of old k + chunk's k)
      a running log-normaliser       lse_i = log sum_c exp(s_ic)   (logaddexp per chunk)

  so the largest temporary is one (n, class_chunk) score block, never (n, C). At the
  end the softmax probabilities of the k winners are ``p_ic = exp(s_ic - lse_i)``
  (probabilities over all C classes, not renormalised over the k).
* ``xcent predict`` streams a feature file through it and writes JSONL or CSV
  atomically; ``xcent export`` writes the weight and its metadata as safetensors.
"""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .errors import UsageError
from .fileio import atomic_path

__all__ = ["Classifier", "TopK", "load_model", "topk_softmax", "read_label_names", "load_features",
           "export_safetensors", "predict_main", "export_main"]

EXPORT_FORMAT = "xcent-export-v1"
DEFAULT_CHUNK_ROWS = 1024
DEFAULT_CLASS_CHUNK = 16384


# --------------------------------------------------------------------------- loading


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
    from . import checkpoint as ckpt_io

    # mmap: the dual state nu (one float per training row) is never paged in
    ckpt = ckpt_io.load(path, map_location="cpu", mmap=True)
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


# --------------------------------------------------------------------------- the kernel


class TopK(NamedTuple):
    """``ids`` (n, k) int64 class ids, best first; ``probs`` (n, k) their softmax
    probabilities over all C classes."""

    ids: Tensor
    probs: Tensor


@torch.no_grad()
def topk_softmax(x: Tensor, weight: Tensor, k: int, class_chunk: int = DEFAULT_CLASS_CHUNK
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k scores over all C classes and the log-normaliser, class chunk by chunk.

    ``x`` (n, D) in the weight's dtype and device, ``weight`` (C, D). Returns
    ``(scores (n, k), ids (n, k), lse (n,))`` with ``scores_ij = w_{ids_ij} . x_i``
    in decreasing order and ``lse_i = logsumexp_c w_c . x_i``. Ties are broken by
    ``torch.topk`` (arbitrary). Peak extra memory: one (n, class_chunk) block.
    """
    n, num_classes = x.shape[0], weight.shape[0]
    k = min(k, num_classes)
    best = torch.full((n, 0), float("-inf"), dtype=x.dtype, device=x.device)
    best_ids = torch.zeros((n, 0), dtype=torch.long, device=x.device)
    lse = torch.full((n,), float("-inf"), dtype=x.dtype, device=x.device)
    # One score buffer reused by every chunk: a fresh (n, class_chunk) allocation per
    # chunk costs page faults comparable to the matmul itself on a CPU.
    buf = torch.empty(n * min(class_chunk, num_classes), dtype=x.dtype, device=x.device)
    for start in range(0, num_classes, class_chunk):
        stop = min(start + class_chunk, num_classes)
        scores = buf[: n * (stop - start)].view(n, stop - start)
        torch.mm(x, weight[start:stop].T, out=scores)
        # the chunk's own top-k is all that can enter the global top-k; merging 2k
        # candidates keeps the running state (n, k) however large C is
        vals, idx = torch.topk(scores, min(k, stop - start), dim=1)
        cand = torch.cat([best, vals], dim=1)
        cand_ids = torch.cat([best_ids, idx + start], dim=1)
        best, pos = torch.topk(cand, min(k, cand.shape[1]), dim=1)
        best_ids = cand_ids.gather(1, pos)
        # logsumexp of the chunk in place, shifted by its max (= its top-1, in hand):
        # log sum_c exp(s_c) = m + log sum_c exp(s_c - m); torch.logsumexp would
        # allocate two more (n, chunk) temporaries and cost more than the matmul
        top = vals[:, :1]
        chunk_lse = scores.sub_(top).exp_().sum(dim=1).log_().add_(top[:, 0])
        lse = torch.logaddexp(lse, chunk_lse)
    return best, best_ids, lse


def _as_tensor(features) -> Tensor:
    if isinstance(features, Tensor):
        return features
    return torch.from_numpy(np.asarray(features))


# --------------------------------------------------------------------------- the API


class Classifier:
    """A trained linear classifier ``p(c | x) = softmax_c(w_c . x)`` over all C classes.

    >>> clf = xcent.Classifier.load("runs/scent/checkpoints/epoch_50.pt")
    >>> ids, probs = clf.predict(features, k=5)        # (N, 5) each
    >>> clf.names(ids[0])                                # class names, when known

    Work is done in blocks of ``chunk_rows`` rows x ``class_chunk`` classes, so
    :meth:`predict` never holds an (N, C) matrix. Features are cast to the weight's
    dtype; rows with NaN/Inf are refused (they would give NaN probabilities).
    """

    def __init__(self, weight: Tensor, label_names: list[str] | None = None, meta: dict | None = None,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, class_chunk: int = DEFAULT_CLASS_CHUNK):
        if weight.ndim != 2:
            raise ValueError(f"weight must be (num_classes, feature_dim), got shape {tuple(weight.shape)}")
        if label_names is not None and len(label_names) != weight.shape[0]:
            raise ValueError(f"{len(label_names)} label names for {weight.shape[0]} classes")
        if chunk_rows < 1 or class_chunk < 1:
            raise ValueError("chunk_rows and class_chunk must be positive")
        self.weight = weight
        self.label_names = label_names
        self.meta = dict(meta or {})
        self.chunk_rows = int(chunk_rows)
        self.class_chunk = int(class_chunk)

    @classmethod
    def load(cls, path, device="cpu", label_names=None, **kwargs) -> "Classifier":
        """From a checkpoint or a safetensors export (see :func:`load_model`).

        ``label_names``: a list, or a path to a ``classes.txt``; by default the names
        stored in an export, else ``classes.txt`` of the training data dir if it is
        still there and has one line per class."""
        weight, meta = load_model(path, device="cpu")
        # float32 math on the device; a float32 CPU weight (the usual case) is used as is
        weight = weight.to(device=device, dtype=torch.float32)
        if isinstance(label_names, (str, os.PathLike)):
            label_names = read_label_names(label_names, meta["num_classes"])
        if label_names is None:
            label_names = meta["label_names"] or _names_from_data_dir(meta["data_dir"], meta["num_classes"])
        return cls(weight, label_names, meta, **kwargs)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.weight.shape[1])

    def to(self, device) -> "Classifier":
        self.weight = self.weight.to(device)
        return self

    def _rows(self, features):
        """``(source, single)``: a (N, D) tensor or numpy array (memmaps stay
        memmaps: blocks are read from them one at a time)."""
        x = features if isinstance(features, (Tensor, np.ndarray)) else _as_tensor(features)
        shape = tuple(x.shape)
        single = x.ndim == 1
        if single:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise UsageError(f"features: expected shape (N, {self.feature_dim}) or ({self.feature_dim},), got {shape}")
        is_float = x.is_floating_point() if isinstance(x, Tensor) else np.issubdtype(x.dtype, np.floating)
        if not is_float:
            raise UsageError(f"features: expected a float array, got dtype {x.dtype}")
        return x, single

    def _chunk(self, x, start: int) -> Tensor:
        block = x[start:start + self.chunk_rows]
        if not isinstance(block, Tensor):
            block = torch.from_numpy(np.array(block))  # copy: a memmap slice is read-only
        block = block.to(device=self.weight.device, dtype=self.weight.dtype)
        bad = ~torch.isfinite(block).all(dim=1)
        if bad.any():
            row = start + int(bad.nonzero()[0, 0])
            raise UsageError(f"features: non-finite (NaN/Inf) value in row {row}")
        return block

    def iter_topk(self, features, k: int = 5) -> Iterator[tuple[int, TopK]]:
        """``(start, TopK)`` for each block of ``chunk_rows`` rows, on the CPU: the
        streaming form of :meth:`predict` (what ``xcent predict`` writes from)."""
        x, _ = self._rows(features)
        if not 1 <= k <= self.num_classes:
            raise UsageError(f"k={k}: must be between 1 and num_classes ({self.num_classes})")
        for start in range(0, x.shape[0], self.chunk_rows):
            scores, ids, lse = topk_softmax(self._chunk(x, start), self.weight, k, self.class_chunk)
            yield start, TopK(ids.cpu(), torch.exp(scores - lse[:, None]).cpu())

    @torch.no_grad()
    def predict(self, features, k: int = 5) -> TopK:
        """Top-k classes of each row and their probabilities over all C classes.

        ``features`` (N, D) (or one (D,) vector) as a tensor or numpy array. Returns
        ``TopK(ids, probs)``, each (N, k) (or (k,)), ``probs_ij = exp(s_ij - lse_i)``
        with ``s_ic = w_c . x_i`` and ``lse_i = log sum_c exp(s_ic)``, best first."""
        x, single = self._rows(features)
        parts = [topk for _, topk in self.iter_topk(x, k)]
        if parts:
            ids, probs = torch.cat([p.ids for p in parts]), torch.cat([p.probs for p in parts])
        else:
            ids = torch.zeros((0, k), dtype=torch.long)
            probs = torch.zeros((0, k), dtype=self.weight.dtype)
        return TopK(ids[0], probs[0]) if single else TopK(ids, probs)

    @torch.no_grad()
    def iter_log_proba(self, features) -> Iterator[tuple[int, Tensor]]:
        """``(start, log p)`` for blocks of ``chunk_rows`` rows, each (n, C) on the
        weight's device: for callers that consume log-probabilities as they come.
        Scores are written class chunk by class chunk into the (n, C) block, and the
        normaliser is subtracted in place, so no second (n, C) temporary exists."""
        x, _ = self._rows(features)
        for start in range(0, x.shape[0], self.chunk_rows):
            block = self._chunk(x, start)
            out = torch.empty((block.shape[0], self.num_classes), dtype=block.dtype, device=block.device)
            lse = torch.full((block.shape[0],), float("-inf"), dtype=block.dtype, device=block.device)
            for c0 in range(0, self.num_classes, self.class_chunk):
                c1 = min(c0 + self.class_chunk, self.num_classes)
                scores = block @ self.weight[c0:c1].T
                lse = torch.logaddexp(lse, torch.logsumexp(scores, dim=1))
                out[:, c0:c1] = scores
            out -= lse[:, None]
            yield start, out

    @torch.no_grad()
    def log_proba(self, features) -> Tensor:
        """``log p(c | x_i) = w_c . x_i - logsumexp_c' w_c' . x_i``, (N, C) (or (C,)).

        The result is N x C by nature; it is filled ``chunk_rows`` rows at a time, so
        the only other memory is one block. For large N x C use
        :meth:`iter_log_proba` or :meth:`predict`."""
        x, single = self._rows(features)
        out = torch.empty((x.shape[0], self.num_classes), dtype=self.weight.dtype)
        for start, block in self.iter_log_proba(x):
            out[start:start + block.shape[0]] = block.cpu()
        return out[0] if single else out

    def names(self, ids) -> list:
        """Class names of ``ids`` (any shape, nested lists out); ids as strings when
        the names are unknown."""
        ids = _as_tensor(ids).tolist()
        lookup = self.label_names

        def name(i):
            return lookup[i] if lookup is not None else str(i)

        def walk(v):
            return [walk(u) for u in v] if isinstance(v, list) else name(v)

        return walk(ids)


# --------------------------------------------------------------------------- files


def load_features(path, feature_dim: int, flag: str = "--features", check_finite: bool = True):
    """Memory-map an (N, D) float ``.npy`` or ``.pt`` feature file and validate it:
    shape, dtype, ``D == feature_dim`` and (``check_finite``) no NaN/Inf, scanned
    before any work so that a bad row fails fast and no output is touched."""
    from .data import _load_array, check_feature_array, first_nonfinite_row

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    if path.suffix not in (".npy", ".pt"):
        raise UsageError(f"{flag} {path}: expected a .npy or .pt file")
    try:
        feats = _load_array(path)
    except UsageError as exc:
        raise UsageError(f"{flag} {exc}")
    check_feature_array(feats, f"{flag} {path}")
    if feats.shape[1] != feature_dim:
        raise UsageError(f"{flag} {path}: feature dimension {feats.shape[1]} does not match the "
                         f"checkpoint's feature_dim {feature_dim}")
    if check_finite and (row := first_nonfinite_row(feats)) is not None:
        raise UsageError(f"{flag} {path}: non-finite (NaN/Inf) value in row {row}")
    return feats


def _write_atomic(out: Path, write) -> None:
    """``write(file)`` into a temp file next to ``out``, then ``os.replace``: an
    interrupted or failed run leaves the previous ``out`` untouched."""
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        write(f)


def _fmt_prob(p: float) -> float:
    # 7 significant digits is float32's precision; more would only be noise in the file
    return float(f"{p:.7g}")


def write_predictions(clf: Classifier, feats, out: Path, k: int, fmt: str, progress: bool = True) -> int:
    """Stream ``feats`` through ``clf`` into ``out`` (JSONL or CSV) atomically; rows written."""
    from tqdm import tqdm

    num_rows = int(feats.shape[0])
    names = clf.label_names

    def write(f):
        bar = tqdm(total=num_rows, unit="row", desc="predict", file=sys.stderr,
                   disable=None if progress else True)  # None: only on a terminal, not in logs
        writer = None
        if fmt == "csv":
            writer = csv.writer(f)
            header = ["row"]
            for j in range(1, k + 1):
                header += [f"id_{j}"] + ([f"name_{j}"] if names is not None else []) + [f"prob_{j}"]
            writer.writerow(header)
        try:
            for start, (ids, probs) in clf.iter_topk(feats, k):
                ids_l, probs_l = ids.tolist(), probs.tolist()
                if fmt == "jsonl":
                    buf = io.StringIO()
                    for r, (ri, rp) in enumerate(zip(ids_l, probs_l)):
                        rec = {"row": start + r, "ids": ri}
                        if names is not None:
                            rec["names"] = [names[i] for i in ri]
                        rec["probs"] = [_fmt_prob(p) for p in rp]
                        buf.write(json.dumps(rec, ensure_ascii=False))
                        buf.write("\n")
                    f.write(buf.getvalue())
                else:
                    for r, (ri, rp) in enumerate(zip(ids_l, probs_l)):
                        line = [start + r]
                        for i, p in zip(ri, rp):
                            line += [i] + ([names[i]] if names is not None else []) + [_fmt_prob(p)]
                        writer.writerow(line)
                bar.update(len(ids_l))
        finally:
            bar.close()

    _write_atomic(out, write)
    return num_rows


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


# --------------------------------------------------------------------------- commands


def _check_out(out: str, suffixes: tuple[str, ...], flag: str = "--out") -> Path:
    path = Path(out)
    if path.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {out}: expected a file ending in {' or '.join(suffixes)}")
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {out}: directory {path.parent} does not exist")
    if path.is_dir():
        raise UsageError(f"{flag} {out}: is a directory")
    return path


def predict_main(argv: list[str]) -> int:
    from jsonargparse import ArgumentParser

    from .evaluate import resolve_device

    p = ArgumentParser(prog="xcent predict",
                       description="Top-k classes and softmax probabilities (over all C classes) of each row "
                                   "of a feature file.")
    p.add_argument("--checkpoint", type=str, required=True, help="an xcent checkpoint or safetensors export")
    p.add_argument("--features", type=str, required=True, help="(N, D) float .npy or .pt")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--out", type=str, default="predictions.jsonl", help="*.jsonl or *.csv")
    p.add_argument("--label-names", type=str, default=None,
                   help="classes.txt (line i = name of class i); default: the export's or DATA_DIR/classes.txt")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows per block")
    p.add_argument("--class-chunk", type=int, default=DEFAULT_CLASS_CHUNK, help="classes per block")
    p.add_argument("--progress", type=bool, default=True, help="progress bar on stderr")
    a = p.parse_args(argv)

    # every check happens before the output file is opened
    out = _check_out(a.out, (".jsonl", ".csv"))
    fmt = "csv" if out.suffix.lower() == ".csv" else "jsonl"
    if a.chunk_rows < 1:
        raise UsageError(f"--chunk-rows {a.chunk_rows}: must be positive")
    if a.class_chunk < 1:
        raise UsageError(f"--class-chunk {a.class_chunk}: must be positive")
    device = resolve_device(a.device)
    # read first so that a bad names file is reported before the (large) weight is loaded
    names = read_label_names(a.label_names) if a.label_names is not None else None
    clf = Classifier.load(a.checkpoint, device=device, chunk_rows=a.chunk_rows, class_chunk=a.class_chunk)
    if names is not None:
        if len(names) != clf.num_classes:
            raise UsageError(f"--label-names {a.label_names}: {len(names)} names for {clf.num_classes} classes")
        clf.label_names = names
    if not 1 <= a.top_k <= clf.num_classes:
        raise UsageError(f"--top-k {a.top_k}: must be between 1 and the number of classes ({clf.num_classes})")
    feats = load_features(a.features, clf.feature_dim)
    t0 = time.perf_counter()
    n = write_predictions(clf, feats, out, a.top_k, fmt, progress=a.progress)
    seconds = time.perf_counter() - t0
    print(f"wrote {out}: {n} rows, top-{a.top_k} of {clf.num_classes} classes"
          f"{' with names' if clf.label_names is not None else ''} ({seconds:.1f} s, "
          f"{n / max(seconds, 1e-9):.0f} rows/s)")
    return 0


def export_main(argv: list[str]) -> int:
    from jsonargparse import ArgumentParser

    p = ArgumentParser(prog="xcent export",
                       description="Write a checkpoint's weight and metadata (num_classes, feature_dim, "
                                   "algorithm, epoch, label names) as safetensors.")
    p.add_argument("--checkpoint", type=str, required=True)
    p.add_argument("--out", type=str, required=True, help="*.safetensors")
    p.add_argument("--label-names", type=str, default=None,
                   help="classes.txt to embed; default: the checkpoint's own or DATA_DIR/classes.txt")
    a = p.parse_args(argv)
    out = _check_out(a.out, (".safetensors",))
    if Path(a.checkpoint).resolve() == out.resolve():
        raise UsageError(f"--out {a.out}: is the --checkpoint itself")
    weight, meta = load_model(a.checkpoint)
    if a.label_names is not None:
        meta["label_names"] = read_label_names(a.label_names, meta["num_classes"])
    elif meta["label_names"] is None:
        meta["label_names"] = _names_from_data_dir(meta["data_dir"], meta["num_classes"])
    export_safetensors(weight, meta, out)
    size = out.stat().st_size
    print(f"wrote {out}: {meta['num_classes']} x {meta['feature_dim']} {weight.dtype} weight, "
          f"{meta['algorithm'] or 'unknown algorithm'}, epoch {meta['epoch']}, "
          f"{'with' if meta['label_names'] is not None else 'no'} label names ({size / 2**20:.1f} MiB)")
    return 0
