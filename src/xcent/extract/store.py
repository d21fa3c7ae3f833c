"""The output of ``xcent extract``: memory-mapped ``features.npy`` (data_size x
feature_dim), ``labels.npy`` (int64) and ``is_cached.npy`` (bool) in one directory.

Each batch is written in place, features and labels before its ``is_cached`` flags: the
kernel keeps a killed process's writes to a shared mapping, so a kill at any moment
loses at most the batches in flight, and a rerun skips every cached row. Files are
created and (``--save-pt``) exported through `xcent.fileio.atomic_path`, so a kill
never leaves a half-written header.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from ..errors import UsageError
from ..fileio import atomic_path, open_memmap_reserved, reserve

#: seconds between msync()s of the output files (a kill needs none; this bounds power-loss damage)
FLUSH_EVERY_S = 60.0
NAMES = ("features", "labels", "is_cached")


def expected_arrays(data_size: int, feature_dim: int, dtype: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array of an output directory made with these settings."""
    return {
        "features": ((data_size, feature_dim), np.dtype(dtype)),
        "labels": ((data_size,), np.dtype(np.int64)),
        "is_cached": ((data_size,), np.dtype(bool)),
    }


class FeatureStore:
    """The memory-mapped ``features``/``labels``/``is_cached`` arrays of an output directory."""

    def __init__(self, out_dir: str, features: np.memmap, labels: np.memmap, is_cached: np.memmap):
        self.out_dir = out_dir
        self.features = features
        self.labels = labels
        self.is_cached = is_cached
        self._last_flush = time.monotonic()

    @staticmethod
    def check(out_dir: str, data_size: int, feature_dim: int, dtype: str) -> None:
        """Refuse (before any write) existing files whose shape or dtype differ."""
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise UsageError(f"--out-dir: {out_dir} is not a directory")
        for name, (shape, want) in expected_arrays(data_size, feature_dim, dtype).items():
            path = os.path.join(out_dir, f"{name}.npy")
            if not os.path.exists(path):
                continue
            try:
                array = np.load(path, mmap_mode="r")
            except Exception as exc:  # noqa: BLE001 - any unreadable file
                raise UsageError(f"--out-dir: cannot read {path} ({exc}); move it away to start over") from exc
            if array.shape != shape or array.dtype != want:
                raise UsageError(
                    f"--out-dir: {path} holds {array.dtype}{list(array.shape)}, but these flags need "
                    f"{want}{list(shape)}; use another --out-dir or the flags it was made with"
                )
        if os.path.exists(os.path.join(out_dir, "is_cached.npy")) and not os.path.exists(
            os.path.join(out_dir, "features.npy")
        ):
            raise UsageError(
                f"--out-dir: {out_dir} has is_cached.npy but no features.npy; remove is_cached.npy to start over"
            )

    @classmethod
    def open(cls, out_dir: str, data_size: int, feature_dim: int, dtype: str) -> FeatureStore:
        """Open the arrays for update, creating missing ones (``is_cached`` last, so its
        presence means the others exist). Call `check` first."""
        os.makedirs(out_dir, exist_ok=True)
        arrays = {}
        for name, (shape, want) in expected_arrays(data_size, feature_dim, dtype).items():
            path = os.path.join(out_dir, f"{name}.npy")
            if not os.path.exists(path):
                with atomic_path(path) as tmp:
                    # space reserved before mapping: a full disk is ENOSPC here, not a Bus error later
                    fresh = open_memmap_reserved(tmp, want, shape)
                    fresh.flush()
                    del fresh
            else:
                reserve(path)  # a store made before reservation existed may be sparse
            arrays[name] = np.load(path, mmap_mode="r+")
        return cls(out_dir, arrays["features"], arrays["labels"], arrays["is_cached"])

    def write(self, rows: np.ndarray, features: np.ndarray, labels: np.ndarray) -> None:
        """Store one batch; the ``is_cached`` flags go last so a kill mid-batch leaves
        those rows uncached (and redone on resume)."""
        self.features[rows] = features
        self.labels[rows] = labels
        self.is_cached[rows] = True
        if time.monotonic() - self._last_flush > FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        for array in (self.features, self.labels, self.is_cached):
            array.flush()
        self._last_flush = time.monotonic()

    def num_cached(self, chunk: int = 1 << 24) -> int:
        return int(sum(np.count_nonzero(self.is_cached[i : i + chunk]) for i in range(0, len(self.is_cached), chunk)))

    def max_label(self) -> int:
        """The largest cached label, -1 if nothing is cached."""
        cached = np.asarray(self.is_cached)
        return int(self.labels[cached].max()) if cached.any() else -1

    def save_pt(self) -> None:
        """The reference implementation's ``.pt`` tensors (labels as int64), each atomically."""
        for name in NAMES:
            with atomic_path(os.path.join(self.out_dir, f"{name}.pt")) as tmp:
                torch.save(torch.from_numpy(np.array(getattr(self, name))), tmp)
