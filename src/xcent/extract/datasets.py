"""The datasets ``xcent extract`` knows, chosen by name (``--data``): how a shard sample
maps to its global row and label, where the class names come from, and the default
backbone.

- ``glint360k``: the sample key is the global row, the ``cls`` member the identity
  (the label); the class names are the identity numbers ``0..max label``.
- ``treeoflife10m``: the key is a ``treeoflife_id``; its row in the catalog CSV
  (``--metadata-path``) is the global row, and the index of its species among the sorted
  distinct species is the label (as in the reference implementation,
  Optimization-AI/SCENT ``xc/extract_feat.py``: a later catalog row with the same id
  wins, the empty species string counts as a species).

A dataset is one `DatasetSpec` in `DATASETS`; its ``open(options)`` returns the row
mapper for one run. A mapper is called on every sample (in data-loader workers) and
returns ``(row, label)`` or the name of the reason the sample is skipped (one of
`xcent.extract.shards.SKIP_REASONS`).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError

#: labels are stored as int64: a ``cls`` beyond this cannot be one
MAX_LABEL = np.iinfo(np.int64).max


@dataclass(frozen=True)
class DatasetOptions:
    """What a dataset's row mapping may need from the command line."""

    data_size: int
    metadata_path: str | None = None


def sample_id(sample: dict) -> str:
    """The file-name part of a sample key (keys may carry the shard's directory)."""
    return sample["__key__"].rsplit("/", 1)[-1]


class GlintRows:
    """Glint360K: the key is the global row, ``cls`` the identity (the label)."""

    classes: list[str] | None = None  # known only after extraction: 0..max label

    def __init__(self, data_size: int):
        self.data_size = data_size

    def __call__(self, sample: dict) -> tuple[int, int] | str:
        try:
            row = int(sample_id(sample))
        except ValueError:
            return "bad_key"
        if not 0 <= row < self.data_size:
            return "key_out_of_range"
        if "cls" not in sample:
            return "missing_cls"
        try:
            label = int(sample["cls"].decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError):
            return "bad_cls"
        # Python ints are unbounded: a label that int64 cannot hold is a bad sample here,
        # not an overflow that stops the whole run when the batch becomes a tensor
        return (row, label) if 0 <= label <= MAX_LABEL else "bad_cls"

    @staticmethod
    def class_names(max_label: int) -> list[str]:
        return [str(i) for i in range(max_label + 1)]


class TreeOfLifeRows:
    """TreeOfLife-10M: the key is a treeoflife_id; its catalog row is the global row and
    the index of its species among the sorted distinct species is the label."""

    def __init__(self, id_to_row: dict[str, int], row_labels: np.ndarray, species: list[str], data_size: int):
        self.id_to_row = id_to_row
        self.row_labels = row_labels
        self.classes = species
        self.data_size = data_size

    def __call__(self, sample: dict) -> tuple[int, int] | str:
        row = self.id_to_row.get(sample_id(sample))
        if row is None:
            return "unknown_id"
        if row >= self.data_size:
            return "key_out_of_range"
        return row, int(self.row_labels[row])

    def class_names(self, max_label: int) -> list[str]:
        return self.classes


def read_catalog(path: str | None) -> tuple[dict[str, int], np.ndarray, list[str]]:
    """``(id_to_row, row_labels, species)`` from the TreeOfLife-10M catalog CSV (columns
    ``treeoflife_id`` and ``species``; others are ignored)."""
    if path is None:
        raise UsageError("--metadata-path (the catalog CSV) is required for --data treeoflife10m")
    ids: list[str] = []
    species_of_row: list[str] = []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise UsageError(f"--metadata-path: {path} is empty")
            missing = [c for c in ("treeoflife_id", "species") if c not in header]
            if missing:
                raise UsageError(f"--metadata-path: {path} has no column {missing[0]!r}")
            id_col, species_col = header.index("treeoflife_id"), header.index("species")
            for record in reader:
                if not record:
                    continue
                if len(record) <= max(id_col, species_col):
                    raise UsageError(f"--metadata-path: {path} line {reader.line_num} has too few columns")
                ids.append(record[id_col])
                species_of_row.append(record[species_col])
    except UsageError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"--metadata-path: cannot read {path}: {exc}") from exc
    species = sorted(set(species_of_row))
    label_of = {name: i for i, name in enumerate(species)}
    row_labels = np.fromiter((label_of[s] for s in species_of_row), dtype=np.int64, count=len(species_of_row))
    id_to_row = {key: row for row, key in enumerate(ids)}
    return id_to_row, row_labels, species


def _open_glint(options: DatasetOptions) -> GlintRows:
    return GlintRows(options.data_size)


def _open_treeoflife(options: DatasetOptions) -> TreeOfLifeRows:
    id_to_row, row_labels, species = read_catalog(options.metadata_path)
    return TreeOfLifeRows(id_to_row, row_labels, species, options.data_size)


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: ``open(options)`` reads what the mapping needs (raising `UsageError`
    before any work when it cannot) and returns the row mapper; the mapper's
    ``classes`` is the class-name list when known up front (else None) and
    ``class_names(max_label)`` gives it after extraction."""

    name: str
    default_arch: str
    open: Callable[[DatasetOptions], object]
    help: str


#: --data name -> its spec
DATASETS: dict[str, DatasetSpec] = {
    "glint360k": DatasetSpec(
        "glint360k", "iresnet50", _open_glint, "key = global row, cls = identity (faces, 112x112 aligned)"
    ),
    "treeoflife10m": DatasetSpec(
        "treeoflife10m", "bioclip", _open_treeoflife, "key = treeoflife_id, row and species label from --metadata-path"
    ),
}


def get_dataset(name: str | None) -> DatasetSpec:
    if name not in DATASETS:
        got = "" if name is None else f", got {name!r}"
        raise UsageError(f"--data must be one of {', '.join(DATASETS)}{got}")
    return DATASETS[name]
