"""Deterministic train/val/test split of the rows ``xcent extract`` has cached.

Only rows whose ``is_cached`` flag is set take part (a partial extraction splits what
it has). The split is a function of the cached rows, their labels and ``seed`` alone,
so rerunning it reproduces the same files.

Plain split: one random permutation of the cached rows; the first ``n_val`` go to val,
the next ``n_test`` to test, the rest to train.

Stratified split (``--stratify``): every class with at least 3 cached rows first puts
one random row aside for train, which guarantees it appears there. The remaining rows
are laid out grouped by class (classes in random order, rows in random order within a
class) and the held-out rows are taken at evenly spaced positions of that layout
(systematic sampling), so each class gives val/test a share within one row of its
proportional one while the totals are exactly ``n_val`` and ``n_test``.

Rows of each split are written in ascending global-row order (sequential reads of the
memory-mapped source; the trainer shuffles anyway), with ``rows.npy`` recording which
global row each one came from (``xcent train`` checks with them that the splits are
disjoint).

All or nothing: `make_split` writes the whole output (``train/``, ``val/``, ``test/``,
``classes.txt``, ``split.json``) into a temporary directory beside ``--out`` and swaps
it into place at the end (`xcent.fileio.atomic_dir`), so an interrupted rerun never
leaves one split from the new run beside another from the old one, and a split
directory always holds exactly one format.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from ..data import check_int64_labels
from ..errors import UsageError
from ..fileio import atomic_dir, atomic_path, exclusive_lock, open_memmap_reserved, write_text_atomic
from ..limits import check_fits, check_seed

SPLITS = ("train", "val", "test")


def resolve_count(value: float, num_rows: int, flag: str) -> int:
    """A fraction in [0, 1) of ``num_rows`` (rounded), or a row count (an integer >= 1)."""
    if value < 0 or math.isnan(value):
        raise UsageError(f"{flag} must be a fraction in [0, 1) or a row count, got {value}")
    if value < 1:
        return int(round(value * num_rows))
    if value != int(value):
        raise UsageError(f"{flag} must be a fraction in [0, 1) or a whole row count, got {value}")
    return int(value)


def _held_positions(pool_size: int, num_held: int, rng: np.random.Generator) -> np.ndarray:
    """``num_held`` distinct, evenly spaced positions in ``range(pool_size)``, random phase."""
    if num_held == 0:
        return np.zeros(0, dtype=np.int64)
    return np.floor((np.arange(num_held) + rng.random()) * (pool_size / num_held)).astype(np.int64)


def split_rows(
    rows: np.ndarray,
    labels: np.ndarray,
    num_val: int,
    num_test: int,
    seed: int,
    stratify: bool = False,
) -> dict[str, np.ndarray]:
    """Assign the global ``rows`` (with their ``labels``) to train/val/test.

    Returns ascending global-row arrays per split. Raises `UsageError` if the held-out
    sizes leave no training row (or, stratified, eat into the rows kept for train).
    """
    num_rows = len(rows)
    num_train = num_rows - num_val - num_test
    if num_train <= 0:
        raise UsageError(
            f"--val-fraction and --test-fraction leave no training row "
            f"({num_val} val + {num_test} test of {num_rows} cached rows)"
        )
    rng = np.random.default_rng(seed)
    if not stratify:
        order = rng.permutation(num_rows)
        parts = {
            "val": order[:num_val],
            "test": order[num_val : num_val + num_test],
            "train": order[num_val + num_test :],
        }
        return {name: np.sort(rows[idx]) for name, idx in parts.items()}

    num_classes = int(labels.max()) + 1 if num_rows else 0
    class_order = rng.permutation(num_classes)
    order = rng.permutation(num_rows)
    # group by class (classes in random order), keeping the random order inside each class
    order = order[np.argsort(class_order[labels[order]], kind="stable")]
    grouped = labels[order]
    first_of_class = np.ones(num_rows, dtype=bool)
    first_of_class[1:] = grouped[1:] != grouped[:-1]
    class_sizes = np.bincount(labels, minlength=num_classes)
    reserved = first_of_class & (class_sizes[grouped] >= 3)
    pool = order[~reserved]
    num_held = num_val + num_test
    if num_held > len(pool):
        raise UsageError(
            f"--stratify: {num_held} held-out rows requested but only {len(pool)} rows remain "
            f"after keeping one row of each class in train; lower --val-fraction/--test-fraction"
        )
    held_at = _held_positions(len(pool), num_held, rng)
    held = pool[held_at]
    val_at = _held_positions(num_held, num_val, rng)
    is_val = np.zeros(num_held, dtype=bool)
    is_val[val_at] = True
    train = np.concatenate([order[reserved], np.delete(pool, held_at)])
    return {"train": np.sort(rows[train]), "val": np.sort(rows[held[is_val]]), "test": np.sort(rows[held[~is_val]])}


def class_coverage(labels_of: dict[str, np.ndarray], num_classes: int) -> dict[str, int]:
    """Counts for the report: classes overall, with rows, in train, and held-out classes
    (in val/test) that train never sees."""
    present = {name: np.unique(labels) for name, labels in labels_of.items()}
    in_train = present["train"]
    all_present = np.unique(np.concatenate(list(present.values()))) if present else np.zeros(0)
    return {
        "num_classes": int(num_classes),
        "classes_with_rows": int(len(all_present)),
        "classes_in_train": int(len(in_train)),
        "val_classes_not_in_train": int(len(np.setdiff1d(present["val"], in_train))),
        "test_classes_not_in_train": int(len(np.setdiff1d(present["test"], in_train))),
    }


def load_extracted(in_dir: str):
    """``(features, labels, is_cached, classes)`` from an extraction directory.

    Reads the ``.npy`` files memory-mapped, or falls back to the reference implementation's
    ``.pt`` tensors. ``is_cached`` defaults to all rows when absent (an output of the
    reference implementation has none);
    ``classes`` is ``None`` without a ``classes.txt``.
    """
    if not os.path.isdir(in_dir):
        raise UsageError(f"--in: directory not found: {in_dir}")
    arrays = {}
    for name in ("features", "labels", "is_cached"):
        npy, pt = os.path.join(in_dir, f"{name}.npy"), os.path.join(in_dir, f"{name}.pt")
        try:
            if os.path.exists(npy):
                arrays[name] = np.load(npy, mmap_mode="r")
            elif os.path.exists(pt):
                import torch

                arrays[name] = torch.load(pt, map_location="cpu", weights_only=True).numpy()
            elif name == "is_cached":
                arrays[name] = None
            else:
                raise UsageError(f"--in: {npy} not found (nor {name}.pt)")
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
            raise UsageError(f"--in: cannot read {name} in {in_dir}: {exc}") from exc
    features, labels, is_cached = arrays["features"], arrays["labels"], arrays["is_cached"]
    if features.ndim != 2 or labels.ndim != 1 or len(labels) != len(features):
        raise UsageError(f"--in: {in_dir}: features {features.shape} and labels {labels.shape} do not match")
    if is_cached is None:
        is_cached = np.ones(len(labels), dtype=bool)
    elif is_cached.shape != labels.shape:
        raise UsageError(f"--in: {in_dir}: is_cached {is_cached.shape} does not match labels {labels.shape}")
    classes = None
    classes_path = os.path.join(in_dir, "classes.txt")
    if os.path.exists(classes_path):
        with open(classes_path, encoding="utf-8") as handle:
            classes = handle.read().split("\n")
        if classes and classes[-1] == "":
            classes.pop()  # the final newline
    return features, labels, is_cached, classes


def _replace_npy(path: str, source, rows: np.ndarray, dtype, chunk_rows: int) -> None:
    """Write ``source[rows]`` to ``path`` as ``.npy`` in chunks, atomically."""
    shape = (len(rows),) + tuple(source.shape[1:])
    with atomic_path(path) as tmp:
        out = open_memmap_reserved(tmp, dtype, shape)  # a full disk: ENOSPC, not a Bus error
        for start in range(0, len(rows), chunk_rows):
            out[start : start + chunk_rows] = source[rows[start : start + chunk_rows]]
        out.flush()
        del out


def write_split(
    out_dir: str, name: str, features, labels, rows: np.ndarray, fmt: str = "npy", chunk_rows: int = 65536
) -> None:
    """``out_dir/name/{features,labels,rows}`` for the global ``rows`` (labels as int64)."""
    split_dir = os.path.join(out_dir, name)
    os.makedirs(split_dir, exist_ok=True)
    if fmt == "npy":
        _replace_npy(os.path.join(split_dir, "features.npy"), features, rows, features.dtype, chunk_rows)
        _replace_npy(os.path.join(split_dir, "labels.npy"), labels, rows, np.int64, chunk_rows)
    else:
        import torch

        for file_name, array in (
            ("features.pt", np.asarray(features[rows])),
            ("labels.pt", np.asarray(labels[rows], dtype=np.int64)),
        ):
            with atomic_path(os.path.join(split_dir, file_name)) as tmp:
                torch.save(torch.from_numpy(np.ascontiguousarray(array)), tmp)
    with atomic_path(os.path.join(split_dir, "rows.npy")) as tmp:
        np.save(tmp, rows.astype(np.int64))


#: what a split directory holds; anything else in ``--out`` is refused, since the whole
#: directory is replaced
SPLIT_ENTRIES = frozenset({*SPLITS, "classes.txt", "split.json"})


def integer_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """``labels`` as int64; float labels must be whole numbers (never truncated)."""
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.integer):
        check_int64_labels(labels, where)
        return labels.astype(np.int64, copy=False)
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.floating):
        raise UsageError(f"{where}: labels must be integers, found dtype {labels.dtype}")
    whole = np.isfinite(labels) & (labels == np.round(labels))
    if not whole.all():
        at = int(np.flatnonzero(~whole)[0])
        raise UsageError(f"{where}: label {labels[at]!r} (row {at}) is not a whole number; labels are class indices")
    check_int64_labels(labels, where)
    return labels.astype(np.int64)


def check_out_dir(out_dir: str, in_dir: str) -> None:
    """``--out`` must be new, or a directory holding only a previous split."""
    if os.path.abspath(in_dir) == os.path.abspath(out_dir):
        raise UsageError("--out must differ from --in")
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise UsageError(f"--out: {out_dir} is not a directory")
    foreign = sorted(set(os.listdir(out_dir)) - SPLIT_ENTRIES)
    if foreign:
        raise UsageError(
            f"--out: {out_dir} holds {foreign[0]!r}, which is not part of a split; the whole directory is "
            f"replaced, so use an empty or new directory"
        )


def make_split(
    in_dir: str,
    out_dir: str,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 42,
    stratify: bool = False,
    fmt: str = "npy",
) -> dict:
    """Split the cached rows of the extraction directory ``in_dir`` into ``out_dir``
    (replaced whole, atomically); returns the report also written as ``split.json``."""
    if fmt not in ("npy", "pt"):
        raise UsageError(f"--format must be npy or pt, got {fmt!r}")
    check_out_dir(out_dir, in_dir)
    features, labels, is_cached, classes = load_extracted(in_dir)
    rows = np.flatnonzero(np.asarray(is_cached))
    if len(rows) == 0:
        raise UsageError(f"--in: {in_dir} has no cached row")
    row_labels = integer_labels(labels[rows], f"--in: {in_dir}")
    if row_labels.min() < 0:
        raise UsageError(f"--in: {in_dir} has negative labels")
    num_classes = len(classes) if classes is not None else int(row_labels.max()) + 1
    if row_labels.max() >= num_classes:
        raise UsageError(f"--in: label {int(row_labels.max())} is beyond the {num_classes} lines of classes.txt")
    if classes is None:  # the classes are 0..max label: per-class arrays (stratify, the trainer) follow from it
        check_fits(8 * num_classes, f"--in: {in_dir}: label {num_classes - 1} asks for {num_classes} classes",
                   "their per-class counts (8 bytes a class)")
    seed = check_seed(seed)
    num_val = resolve_count(val_fraction, len(rows), "--val-fraction")
    num_test = resolve_count(test_fraction, len(rows), "--test-fraction")
    parts = split_rows(rows, row_labels, num_val, num_test, seed, stratify)

    # labels of every row, as integers, indexed like the source (uncached rows: -1)
    all_labels = np.full(len(labels), -1, dtype=np.int64)
    all_labels[rows] = row_labels
    coverage = class_coverage({name: all_labels[parts[name]] for name in SPLITS}, num_classes)
    report = {
        "in": os.path.abspath(in_dir),
        "seed": seed,
        "stratify": stratify,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "format": fmt,
        "num_samples": {name: int(len(parts[name])) for name in SPLITS},
        "num_cached": int(len(rows)),
        "not_cached": int(len(labels) - len(rows)),
        **coverage,
    }
    with exclusive_lock(out_dir, "split output"):  # one writer per output
        check_out_dir(out_dir, in_dir)  # again under the lock: what is replaced is what was checked
        with atomic_dir(out_dir) as tmp:
            for name in SPLITS:
                write_split(str(tmp), name, features, all_labels, parts[name], fmt)
            if classes is not None:
                write_text_atomic(tmp / "classes.txt", "".join(f"{c}\n" for c in classes))
            write_text_atomic(tmp / "split.json", json.dumps(report, indent=2) + "\n")
    return report
