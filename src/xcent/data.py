"""Feature splits on disk: memory-mapped loading, validation, batch gathering, synthetic data.

Layout (that of the reference implementation, Optimization-AI/SCENT ``xc/``):
``DATA_DIR/{train,val,test}/features.{pt,npy}`` holding an
(N, D) float tensor (float32, float16, or bfloat16 in ``.pt``) and
``labels.{pt,npy}`` holding an (N,) integer tensor; optional ``DATA_DIR/classes.txt``
(one class name per line). Features are memory-mapped (``np.load(mmap_mode="r")``,
``torch.load(mmap=True)``), so a split larger than RAM trains; labels (8 bytes a
row) are read into memory. Batches are gathered with one fancy-index per batch.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import UsageError
from .fileio import atomic_path, exclusive_lock, why_missing, write_text_atomic
from .limits import check_fits, check_seed

SPLITS = ("train", "val", "test")
_CHECK_CHUNK_ROWS = 1 << 16
_RELEASE_ROWS = 256


def _release_pages(features) -> None:
    """Unmap a numpy memmap's pages from this process (see :meth:`Split.release`)."""
    if isinstance(features, np.memmap):
        features._mmap.madvise(mmap.MADV_DONTNEED)


def _torch_dtype(np_dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=np_dtype)).dtype


@dataclass
class Split:
    """One split: memory-mapped features, in-memory int64 labels."""

    name: str
    directory: Path
    features: object  # np.memmap / np.ndarray or a (possibly mmap'd) torch.Tensor
    labels: Tensor
    feature_files: list[Path] = field(default_factory=list)
    #: unmap the feature pages after every read (``--low-memory``, ``.npy`` splits)
    release_pages: bool = False

    def release(self, force: bool = False) -> None:
        """Drop this process's mapping of the feature file's pages (they stay in the
        page cache). Random rows read through a memory map are mapped a whole
        page-cache folio at a time, so without this one epoch leaves the whole file
        counted in the process's RSS: clean pages the kernel may reclaim, but a
        number that schedulers and memory limits read."""
        if force or self.release_pages:
            _release_pages(self.features)

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def gather(self, index: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Features (B, D) in their stored dtype and labels (B,) of the rows ``index``.
        ``out``: a (B, D) CPU tensor of the stored dtype to write the features into
        (pinned memory for a non-blocking copy to a GPU, :mod:`xcent.batches`),
        returned as the features; by default they are a new tensor."""
        if isinstance(self.features, torch.Tensor):
            feats = torch.index_select(self.features, 0, index, out=out) if out is not None \
                else self.features.index_select(0, index)
        else:
            rows = index.numpy()
            if self.release_pages and len(rows) > _RELEASE_ROWS:
                # each random row maps a whole folio: release every few hundred rows
                feats = out if out is not None else torch.empty(len(rows), self.feature_dim,
                                                                dtype=_torch_dtype(self.features.dtype))
                for start in range(0, len(rows), _RELEASE_ROWS):
                    piece = rows[start:start + _RELEASE_ROWS]
                    feats[start:start + len(piece)] = torch.from_numpy(np.ascontiguousarray(self.features[piece]))
                    self.release()
            elif out is not None:
                np.take(self.features, rows, axis=0, out=out.numpy())  # numpy releases the GIL as it copies
                feats = out
                self.release()
            else:
                feats = torch.from_numpy(np.ascontiguousarray(self.features[rows]))
                self.release()
        return feats, self.labels.index_select(0, index)

    def chunks(self, rows: Tensor | None = None, chunk_rows: int = 8192) -> Iterator[tuple[Tensor, Tensor]]:
        """(features, labels) in chunks of consecutive rows (or of ``rows``, sorted)."""
        if rows is None:
            for start in range(0, self.num_samples, chunk_rows):
                stop = min(start + chunk_rows, self.num_samples)
                feats = self.features[start:stop]
                if not isinstance(feats, torch.Tensor):
                    feats = torch.from_numpy(np.array(feats))  # copy: a memmap slice is read-only
                    self.release()
                yield feats, self.labels[start:stop]
        else:
            for start in range(0, len(rows), chunk_rows):
                yield self.gather(rows[start:start + chunk_rows])


@dataclass
class Dataset:
    splits: dict[str, Split]
    num_classes: int
    feature_dim: int
    class_names: list[str] | None = None
    #: what set ``num_classes``, in the user's words (``--num-classes N`` or the labels
    #: file and its largest label), for messages about sizes
    classes_from: str | None = None

    @property
    def train(self) -> Split:
        return self.splits["train"]


def _find(directory: Path, stem: str) -> Path | None:
    # lexists: a broken link or a link loop is found, and reported as what it is
    found = [directory / f"{stem}{ext}" for ext in (".npy", ".pt") if os.path.lexists(directory / f"{stem}{ext}")]
    if len(found) > 1:
        # which one is current cannot be told (a split rewritten in the other format)
        raise UsageError(f"{directory}: both {stem}.npy and {stem}.pt exist; a split holds one format, "
                         f"remove the stale one")
    return found[0] if found else None


def count_shared_rows(a: np.ndarray, b: np.ndarray) -> int:
    """How many values of ``a`` also occur in ``b``: a sorted merge (``searchsorted`` of
    one sorted array in the other), O((n + m) log m), no hashing, cheap at 17M rows."""
    a, b = np.sort(np.asarray(a)), np.sort(np.asarray(b))
    if len(a) == 0 or len(b) == 0:
        return 0
    at = np.minimum(np.searchsorted(b, a), len(b) - 1)
    return int(np.count_nonzero(b[at] == a))


def check_disjoint_rows(splits: dict) -> None:
    """Refuse splits that share source rows, told by the ``rows.npy`` that ``xcent split``
    writes beside each split (the global row of each split row); splits without one are
    not checked. A shared row means a mixed split directory (e.g. an interrupted rewrite
    by an old version), and held-out metrics on it would be inflated."""
    rows = {}
    for name, split in splits.items():
        path = Path(split.directory) / "rows.npy"
        if path.is_file():
            try:
                rows[name] = np.load(path, mmap_mode="r", allow_pickle=False)
            except Exception as exc:  # corrupt file
                raise UsageError(f"{path}: cannot be read ({type(exc).__name__})")
            if rows[name].shape != (split.num_samples,):
                raise UsageError(f"{path}: {rows[name].shape[0] if rows[name].ndim else 0} rows for "
                                 f"{split.num_samples} samples of the {name} split")
    names = list(rows)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            shared = count_shared_rows(rows[first], rows[second])
            if shared:
                raise UsageError(f"{splits[second].directory}: {shared} of its {len(rows[second])} rows are also in "
                                 f"{first}/ (rows.npy); the splits overlap, rerun xcent split")


def _load_array(path: Path):
    try:
        if path.suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False)
        obj = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as exc:  # corrupt file, wrong format
        raise UsageError(f"{path}: cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    if not isinstance(obj, torch.Tensor):
        raise UsageError(f"{path}: expected a tensor saved with torch.save, found {type(obj).__name__}")
    return obj


def check_int64_labels(labels: np.ndarray, where: str) -> None:
    """Refuse numpy ``labels`` whose values int64 cannot hold (a uint64 label of
    2**64 - 1 would wrap to -1 in the cast, a float label of 1e30 to anything), naming
    the largest: every reader casts labels to int64."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return
    if np.issubdtype(labels.dtype, np.unsignedinteger) and labels.dtype.itemsize == 8:
        top = int(labels.max())
    elif np.issubdtype(labels.dtype, np.floating):
        top = float(np.abs(labels).max())  # NaN is reported by the caller's whole-number check
    else:
        return
    if top > np.iinfo(np.int64).max:
        raise UsageError(f"{where}: label {top} is beyond the int64 range of class indices")


def _labels_tensor(raw, path: Path) -> Tensor:
    dtype = raw.dtype
    is_int = (dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
              if isinstance(raw, torch.Tensor) else np.issubdtype(dtype, np.integer))
    if not is_int:
        raise UsageError(f"{path}: labels must be integers, found dtype {dtype}")
    if raw.ndim != 1:
        raise UsageError(f"{path}: labels must be a 1-d array, found shape {tuple(raw.shape)}")
    if isinstance(raw, torch.Tensor):
        return raw.to(torch.int64).clone()
    check_int64_labels(raw, str(path))
    return torch.from_numpy(np.asarray(raw, dtype=np.int64).copy())


_FLOAT_DTYPES_NP = (np.float16, np.float32, np.float64)
_FLOAT_DTYPES_T = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_feature_array(features, where: str) -> None:
    """An (N, D) array of a float dtype, or a one-line UsageError prefixed by ``where``
    (the file, or the flag and the file)."""
    if features.ndim != 2:
        raise UsageError(f"{where}: features must be (N, D), found shape {tuple(features.shape)}")
    if features.shape[1] == 0:
        raise UsageError(f"{where}: features have no columns (shape {tuple(features.shape)}); "
                         f"a feature dimension of at least 1 is needed")
    ok_dtype = (features.dtype in _FLOAT_DTYPES_T if isinstance(features, torch.Tensor)
                else features.dtype.type in _FLOAT_DTYPES_NP)
    if not ok_dtype:
        raise UsageError(f"{where}: features must be float16/bfloat16/float32/float64, found {features.dtype}")


#: what :func:`first_nonfinite_row` finds, for messages
NONFINITE = "non-finite (NaN, Inf, or beyond float32's range of +-3.4e38)"


def first_nonfinite_row(features, chunk_rows: int = _CHECK_CHUNK_ROWS) -> int | None:
    """The first row holding a value that is not finite *in float32*, the dtype all
    arithmetic is done in (NaN, Inf, or a float64 value beyond float32's range, which
    the cast turns into Inf), scanning in chunks (memory-mapped pages are released
    after each, so the scan does not leave the whole file mapped), or None."""
    for start in range(0, features.shape[0], chunk_rows):
        chunk = features[start:start + chunk_rows]
        if isinstance(chunk, torch.Tensor):
            bad = (~torch.isfinite(chunk.float())).any(dim=1).numpy()
        else:
            with np.errstate(over="ignore"):  # the overflow to inf is what is looked for
                bad = ~np.isfinite(np.asarray(chunk, dtype=np.float32)).all(axis=1)
        _release_pages(features)
        if bad.any():
            return start + int(np.flatnonzero(bad)[0])
    return None


def load_split(data_dir: Path, name: str, check_features: bool = True) -> Split:
    """Load and validate one split (shapes, dtypes, finite features)."""
    directory = Path(data_dir) / name
    if not directory.is_dir():
        raise UsageError(f"--data-dir {data_dir}: split directory {directory} is missing")
    fpath, lpath = _find(directory, "features"), _find(directory, "labels")
    if fpath is None:
        raise UsageError(f"{directory}: no features.npy or features.pt")
    if lpath is None:
        raise UsageError(f"{directory}: no labels.npy or labels.pt")
    for path in (fpath, lpath):
        if not path.exists():
            raise UsageError(f"{path}: {why_missing(path)}")
    features = _load_array(fpath)
    labels = _labels_tensor(_load_array(lpath), lpath)
    check_feature_array(features, str(fpath))
    if features.shape[0] != labels.shape[0]:
        raise UsageError(f"{fpath}: {features.shape[0]} feature rows but {lpath.name} has {labels.shape[0]} labels")
    if labels.shape[0] == 0:
        raise UsageError(f"{directory}: the {name} split is empty")
    split = Split(name, directory, features, labels, [fpath, lpath])
    if check_features and (row := first_nonfinite_row(features)) is not None:
        raise UsageError(f"{fpath}: {NONFINITE} feature value in row {row}")
    return split


def load_dataset(data_dir, splits=SPLITS, num_classes: int | None = None, feature_dim: int | None = None,
                 data_size: int | None = None, required=("train", "val"), check_features: bool = True,
                 low_memory: bool = False) -> Dataset:
    """Load the splits of ``data_dir`` that exist (those in ``required`` must), validate
    them against each other and against the given sizes (None = infer)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        why = why_missing(data_dir) if not data_dir.exists() else "not a directory"
        raise UsageError(f"--data-dir {data_dir}: {why}")
    loaded: dict[str, Split] = {}
    for name in splits:
        if name not in required and not (data_dir / name).is_dir():
            continue
        loaded[name] = load_split(data_dir, name, check_features)
        loaded[name].release_pages = low_memory
    check_disjoint_rows(loaded)
    dims = {s.feature_dim for s in loaded.values()}
    if len(dims) > 1:
        detail = ", ".join(f"{s.name}: {s.feature_dim}" for s in loaded.values())
        raise UsageError(f"--data-dir {data_dir}: feature dimension differs between splits ({detail})")
    dim = dims.pop()
    if feature_dim is not None and feature_dim != dim:
        raise UsageError(f"--feature-dim {feature_dim} does not match the data ({dim})")
    low = min(int(s.labels.min()) for s in loaded.values())
    if low < 0:
        bad = next(s for s in loaded.values() if int(s.labels.min()) < 0)
        raise UsageError(f"{bad.feature_files[1]}: negative label {int(bad.labels.min())}")
    needed = max(int(s.labels.max()) for s in loaded.values()) + 1
    top = max(loaded.values(), key=lambda s: int(s.labels.max()))
    if num_classes is None:
        num_classes = needed
        classes_from = f"{top.feature_files[1]}: label {needed - 1} asks for {needed} classes"
    elif num_classes < needed:
        raise UsageError(f"{top.feature_files[1]}: label {needed - 1} is out of range for --num-classes {num_classes}")
    else:
        classes_from = f"--num-classes {num_classes}"
    # every reader of the labels keeps per-class arrays (counts, at least 8 bytes a class)
    check_fits(8 * num_classes, classes_from, "their per-class counts (8 bytes a class)")
    if data_size is not None and data_size != loaded["train"].num_samples:
        raise UsageError(f"--data-size {data_size} does not match the train split ({loaded['train'].num_samples} rows)")
    classes_file = data_dir / "classes.txt"
    names = read_class_names(classes_file) if os.path.lexists(classes_file) else None
    return Dataset(loaded, int(num_classes), dim, names, classes_from)


def read_class_names(path) -> list[str]:
    """The lines of a ``classes.txt`` (line i names label i): a regular UTF-8 text
    file, or a one-line UsageError naming it."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: {why_missing(path)}")
    if not path.is_file():
        raise UsageError(f"{path}: not a regular file (expected one class name per line)")
    try:
        return path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start}); expected one class name per line") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot be read ({exc.strerror})") from None


# ------------------------------------------------------------------------- writing


def write_split(directory, features, labels, fmt: str = "npy") -> None:
    """Write one split in the data layout of `xcent train` (``npy`` or ``pt``), each file atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stem, value in (("features", features), ("labels", labels)):
        if fmt not in ("npy", "pt"):
            raise UsageError(f"--format {fmt}: expected npy or pt")
        with atomic_path(directory / f"{stem}.{fmt}") as tmp:
            if fmt == "npy":
                np.save(tmp, value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value))
            else:
                torch.save(torch.as_tensor(value), tmp)


def synthesize(out_dir, num_classes: int = 1000, feature_dim: int = 64, num_samples: int = 50_000,
               val_fraction: float = 0.05, test_fraction: float = 0.05, seed: int = 0, noise: float = 0.5,
               tail_exponent: float = 0.8, normalize: bool = True, dtype: str = "float32",
               fmt: str = "npy", rows_per_class: float | None = None, feature_norm: float = 1.0) -> dict:
    """A seeded synthetic dataset in the data layout of `xcent train`.

    Class centroids are random unit vectors in ``feature_dim`` dimensions. Class sizes
    are long-tailed like face or species data: class of popularity rank r gets a
    share proportional to ``(r + 1)^-tail_exponent`` and every class gets at least
    one row, so many classes have a handful of rows and a few have many. A row is
    ``centroid + noise * N(0, I/D)``, then (``normalize``) scaled to unit norm, the
    way face and CLIP embeddings are, and multiplied by ``feature_norm`` (real
    embeddings range from unit norm, e.g. CLIP or sentence encoders, to norms of
    20-30, e.g. unnormalised face embeddings). ``rows_per_class`` (overrides
    ``num_samples``): ``num_samples = round(rows_per_class * num_classes)`` over all
    splits, so the train split has about ``rows_per_class * (1 - val - test)`` rows
    per class. Rows are shuffled, then cut into train/val/test by the fractions.
    Returns a summary dict.
    """
    seed = check_seed(seed)
    asked = f"--num-samples {num_samples}, --num-classes {num_classes}, --feature-dim {feature_dim}"
    if rows_per_class is not None:
        if not (rows_per_class >= 1 and math.isfinite(rows_per_class)):
            raise UsageError(f"--rows-per-class {rows_per_class}: must be a number of at least 1")
        num_samples = round(rows_per_class * num_classes)
        asked = f"--rows-per-class {rows_per_class} x --num-classes {num_classes}, --feature-dim {feature_dim}"
    if not (feature_norm > 0 and math.isfinite(feature_norm)):
        raise UsageError(f"--feature-norm {feature_norm}: must be a positive number")
    if not (noise >= 0 and math.isfinite(noise)):
        raise UsageError(f"--noise {noise}: must be a number >= 0")
    np_dtype = {"float32": np.float32, "float16": np.float16}.get(dtype)
    if np_dtype is None:
        raise UsageError(f"--dtype {dtype}: expected float32 or float16")
    if not math.isfinite(tail_exponent):
        raise UsageError(f"--tail-exponent {tail_exponent}: must be a finite number")
    if num_classes < 2 or feature_dim < 1 or num_samples < num_classes:
        raise UsageError("synth needs --num-classes >= 2, --feature-dim >= 1 and --num-samples >= --num-classes")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UsageError("--val-fraction and --test-fraction must be in [0, 1) and sum below 1")
    # the rows and the centroids are made in memory (float32), then written
    check_fits(4 * (num_samples + num_classes) * feature_dim + 16 * num_samples + 8 * num_classes, asked,
               "the dataset, made in memory before it is written,")
    with np.errstate(over="ignore"):
        share = (np.arange(num_classes) + 1.0) ** -float(tail_exponent)
    if not np.isfinite(share).all():
        raise UsageError(f"--tail-exponent {tail_exponent}: the class shares rank^-exponent overflow")
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((num_classes, feature_dim)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    extra = rng.multinomial(num_samples - num_classes, share / share.sum())
    counts = extra + 1
    # class ids are a random permutation of popularity ranks, so id says nothing of size
    labels = np.repeat(rng.permutation(num_classes), counts)
    rng.shuffle(labels)
    features = np.empty((num_samples, feature_dim), dtype=np.float32)
    for start in range(0, num_samples, 1 << 16):
        stop = min(start + (1 << 16), num_samples)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is looked for below
            noise_block = rng.standard_normal((stop - start, feature_dim)).astype(np.float32) * (
                noise / math.sqrt(feature_dim)
            )
            block = centroids[labels[start:stop]] + noise_block
            if normalize:
                block /= np.linalg.norm(block, axis=1, keepdims=True)
            block = block * feature_norm if feature_norm != 1.0 else block
            finite = np.isfinite(block.astype(np_dtype)).all()
        if not finite:  # what is written must be what the reader accepts
            raise UsageError(f"--noise {noise}, --feature-norm {feature_norm}, --dtype {dtype}: the features "
                             f"overflow {dtype} (a value beyond its range, or NaN); lower --feature-norm or --noise")
        features[start:stop] = block
    num_val, num_test = int(round(val_fraction * num_samples)), int(round(test_fraction * num_samples))
    num_train = num_samples - num_val - num_test
    bounds = {"train": (0, num_train), "val": (num_train, num_train + num_val),
              "test": (num_train + num_val, num_samples)}
    out_dir = Path(out_dir)
    for name, (a, b) in bounds.items():
        if b > a:
            write_split(out_dir / name, features[a:b].astype(np_dtype), labels[a:b].astype(np.int64), fmt)
    write_text_atomic(out_dir / "classes.txt", "".join(f"class_{c}\n" for c in range(num_classes)))
    return {"num_classes": num_classes, "feature_dim": feature_dim, "num_samples": num_samples,
            "train": num_train, "val": num_val, "test": num_test,
            "largest_class": int(counts.max()), "classes_with_one_row": int((counts == 1).sum())}


def check_new_dataset_dir(path, flag: str) -> None:
    """A dataset is written only into a new or empty directory: anything else at
    ``path`` (a file, a folder holding anything) is a UsageError naming ``flag``,
    raised before anything is written."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise UsageError(f"{flag} {path}: is a broken symbolic link")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: is a file, not a directory")
    if path.is_dir():
        entries = sorted(os.listdir(path))
        if "train" in entries:
            raise UsageError(f"{flag} {path}: already holds a dataset (train/ exists); choose another directory")
        if entries:
            raise UsageError(f"{flag} {path}: holds {entries[0]!r}; a dataset is written only into a new or "
                             f"empty directory, so nothing there is overwritten: choose another directory")


def synthesize_atomic(path, *args, flag: str = "--out", **params) -> dict:
    """:func:`synthesize` into ``.NAME.partial`` beside ``path``, then renamed to
    ``path`` (absent or an empty directory, :func:`check_new_dataset_dir`; ``flag``
    names it in errors): an interrupted or failed write (a full disk) leaves no half
    dataset, and the same command redoes it from scratch. One writer at a time
    (:func:`xcent.fileio.exclusive_lock`): two commands writing the same dataset would
    remove each other's partial directory."""
    import shutil

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    with exclusive_lock(path, "dataset"):
        check_new_dataset_dir(path, flag)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            info = synthesize(tmp, *args, **params)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return info


def cached_synthetic(data_dir, cache_name: str, params: dict, announce: str = "xcent") -> Path:
    """A built-in synthetic dataset: ``data_dir`` if given, else
    ``$XDG_CACHE_HOME/xcent/<cache_name>`` (``~/.cache``), written with
    :func:`synthesize_atomic` (``params``) on first use, so an interrupted write is
    redone next time, never reused."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = Path(data_dir) if data_dir else cache / "xcent" / cache_name
    if not (path / "val").is_dir():
        check_new_dataset_dir(path, "--data-dir")  # not the dataset: a folder of the user's is not written into
        print(f"{announce}: writing the synthetic dataset to {path}", flush=True)
        synthesize_atomic(path, flag="--data-dir", **params)
    return path
