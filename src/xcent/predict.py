"""Applying a trained classifier: top-k prediction over all C classes and a Python API.

* Weights are read by :func:`xcent.modelio.load_model` (checkpoints, sharded
  directories, safetensors exports).
* The work is :func:`xcent.classifier.scan_classes`, the one class-chunk kernel
  (shared with evaluation): for a block of n rows it walks the C classes in chunks
  and keeps, per row, a running top-k of the scores ``s_ic = w_c . x_i`` and an
  online log-normaliser ``lse_i = log sum_c exp(s_ic)``, so the largest temporary
  is one score block, never (n, C). The softmax probabilities of the k winners are
  ``p_ic = exp(s_ic - lse_i)`` (over all C classes, not renormalised over the k).
* ``xcent predict`` streams a feature file through it and writes JSONL or CSV
  atomically; ``xcent export`` writes the weight and its metadata as safetensors.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .classifier import scan_classes
from .errors import ArgumentError, UsageError
from .fileio import atomic_path, why_missing
from .modelio import _names_from_data_dir, check_finite, load_model, read_label_names

__all__ = ["Classifier", "TopK", "load_features", "write_predictions"]

DEFAULT_CHUNK_ROWS = 1024
DEFAULT_CLASS_CHUNK = 16384


# --------------------------------------------------------------------------- the kernel


class TopK(NamedTuple):
    """``ids`` (n, k) int64 class ids, best first; ``probs`` (n, k) their softmax
    probabilities over all C classes."""

    ids: Tensor
    probs: Tensor


def _as_tensor(features) -> Tensor:
    if isinstance(features, Tensor):
        return features
    return torch.from_numpy(np.asarray(features))


def _check_scores(lse: Tensor, start: int) -> None:
    """Refuse a block whose log-normaliser is not finite: some score of that row is NaN
    or overflows float32 (finite features and weights whose products exceed 3.4e38),
    and ``torch.topk`` would rank the NaN first with probability NaN."""
    bad = ~torch.isfinite(lse)
    if bool(bad.any()):
        row = start + int(bad.nonzero()[0, 0])
        raise UsageError(f"features: the scores of row {row} are not finite in float32 (they overflow: "
                         f"scale the features down)")


# --------------------------------------------------------------------------- the API


class Classifier:
    """A trained linear classifier ``p(c | x) = softmax_c(w_c . x)`` over all C classes.

    >>> clf = xcent.Classifier.load("runs/scent/checkpoints/epoch_50.pt")
    >>> ids, probs = clf.predict(features, k=5)        # (N, 5) each
    >>> clf.names(ids[0])                                # class names, when known

    Work is done in blocks of ``chunk_rows`` rows x ``class_chunk`` classes, so
    :meth:`predict` never holds an (N, C) matrix. Features are cast to the weight's
    dtype. Nothing NaN is ever reported as a winner: a weight that is not finite is
    refused here, feature rows with NaN/Inf are refused (a ``UsageError`` naming the
    row), and so is a row whose scores overflow float32 (finite but huge features).
    """

    def __init__(self, weight: Tensor, label_names: list[str] | None = None, meta: dict | None = None,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, class_chunk: int = DEFAULT_CLASS_CHUNK):
        if weight.ndim != 2:
            raise ValueError(f"weight must be (num_classes, feature_dim), got shape {tuple(weight.shape)}")
        if label_names is not None and len(label_names) != weight.shape[0]:
            raise ValueError(f"{len(label_names)} label names for {weight.shape[0]} classes")
        if chunk_rows < 1 or class_chunk < 1:
            raise ValueError("chunk_rows and class_chunk must be positive")
        try:
            check_finite(weight, "weight", "Classifier")
        except UsageError as exc:
            raise ArgumentError(str(exc)) from None
        self.weight = weight
        self.label_names = label_names
        self.meta = dict(meta or {})
        self.chunk_rows = int(chunk_rows)
        self.class_chunk = int(class_chunk)

    @classmethod
    def load(cls, path, device="cpu", label_names=None, **kwargs) -> Classifier:
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

    def to(self, device) -> Classifier:
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
            scan = scan_classes(self._chunk(x, start), self.weight, k=k, class_chunk=self.class_chunk)
            _check_scores(scan.lse, start)
            yield start, TopK(scan.top_ids.cpu(), torch.exp(scan.top_scores - scan.lse[:, None]).cpu())

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
        The kernel copies the scores class chunk by class chunk into the (n, C) block,
        and the normaliser is subtracted in place, so no second (n, C) temporary exists."""
        x, _ = self._rows(features)
        for start in range(0, x.shape[0], self.chunk_rows):
            block = self._chunk(x, start)
            out = torch.empty((block.shape[0], self.num_classes), dtype=block.dtype, device=block.device)
            scan = scan_classes(block, self.weight, scores_out=out, class_chunk=self.class_chunk)
            _check_scores(scan.lse, start)
            out -= scan.lse[:, None]
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
    from .data import NONFINITE, _load_array, check_feature_array, first_nonfinite_row

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: {why_missing(path) if not path.exists() else 'not a file'}")
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
        raise UsageError(f"{flag} {path}: {NONFINITE} value in row {row}")
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
