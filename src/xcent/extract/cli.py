"""``xcent extract`` and ``xcent split``: from webdataset image shards to the feature
layout ``xcent train`` reads.

``xcent extract`` keeps the seed's ``extract_feat.py`` flags. Its output directory holds
``features.npy`` (data_size x feature_dim), ``labels.npy`` (int64), ``is_cached.npy``
(bool), ``classes.txt`` and ``extract.json`` (the settings, checked on resume). The
``.npy`` files are memory-mapped and each batch is written in place, features and labels
before its ``is_cached`` flags: the kernel keeps a killed process's writes, so a kill at
any moment loses at most the batches in flight, and a rerun skips every cached row
before decoding it. ``--save-pt`` also writes the seed's ``features.pt``/``labels.pt``/
``is_cached.pt`` at the end.

Bad samples (corrupt image, missing ``cls``, key outside ``[0, data_size)``, id missing
from the catalog, a truncated shard) are counted by reason, warned about (the first few),
and skipped; the summary reports the counts. Missing shards, an unreadable catalog,
weights that do not fit or an output directory made with other settings are reported
before any work, without touching existing files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from argparse import ArgumentError
from collections import Counter
from typing import Literal, Optional

import numpy as np
import torch

from ..device import resolve_device
from ..errors import UsageError
from ..fileio import write_text_atomic
from . import split as splitlib
from .backbones import ARCHS, DEFAULT_ARCH, build_backbone
from .shards import expand_urls, format_errors, iter_shard

#: warnings printed per run before the rest are only counted
MAX_WARNINGS = 20
#: seconds between msync()s of the output files (a kill needs none; this bounds power-loss damage)
FLUSH_EVERY_S = 60.0
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _parse(parser, argv: list[str]):
    """Parse, turning jsonargparse's errors into a one-line `UsageError`."""
    try:
        return parser.parse_args(argv)
    except ArgumentError as exc:
        raise UsageError(" ".join(str(exc).split())) from exc


# ------------------------------------------------------------------- global rows
class GlintRows:
    """Glint360K: the key is the global row, ``cls`` the identity (the label)."""

    def __init__(self, data_size: int):
        self.data_size = data_size

    def __call__(self, sample: dict) -> tuple[int, int] | str:
        try:
            row = int(sample["__key__"].rsplit("/", 1)[-1])
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
        return (row, label) if label >= 0 else "bad_cls"


class TreeOfLifeRows:
    """TreeOfLife-10M: the key is a treeoflife_id; its catalog row is the global row and
    the index of its species among the sorted distinct species is the label."""

    def __init__(self, id_to_row: dict[str, int], row_labels: np.ndarray, data_size: int):
        self.id_to_row = id_to_row
        self.row_labels = row_labels
        self.data_size = data_size

    def __call__(self, sample: dict) -> tuple[int, int] | str:
        row = self.id_to_row.get(sample["__key__"].rsplit("/", 1)[-1])
        if row is None:
            return "unknown_id"
        if row >= self.data_size:
            return "key_out_of_range"
        return row, int(self.row_labels[row])


def read_catalog(path: str) -> tuple[dict[str, int], np.ndarray, list[str]]:
    """``(id_to_row, row_labels, species)`` from the TreeOfLife-10M catalog CSV.

    As in the seed: a later row with the same treeoflife_id wins, and labels index the
    sorted distinct ``species`` strings (the empty string included, if present).
    """
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


# --------------------------------------------------------------------- the reader
def _decode_image(data: bytes, preprocess) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decode now, so a truncated file fails here and not later
        return preprocess(image)


class ShardBatches(torch.utils.data.IterableDataset):
    """Batches of preprocessed images with their global rows and labels, plus the
    account of what was skipped since the previous batch.

    Each data-loader worker reads every ``num_workers``-th shard. Rows already cached
    are skipped before their image is decoded.
    """

    def __init__(self, shards: list[str], rows_of, preprocess, batch_size: int, is_cached: np.ndarray):
        super().__init__()
        self.shards = shards
        self.rows_of = rows_of
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.is_cached = is_cached

    def _batch(self, images, rows, labels, seen, cached, errors, warnings) -> dict:
        return {
            "images": torch.stack(images) if images else torch.zeros(0),
            "rows": torch.tensor(rows, dtype=torch.int64),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "seen": seen,
            "cached": cached,
            "errors": dict(errors),
            "warnings": list(warnings),
        }

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        shards = self.shards if info is None else self.shards[info.id :: info.num_workers]
        images, rows, labels = [], [], []
        seen, cached, errors, warnings = 0, 0, Counter(), []
        for path in shards:
            for sample in iter_shard(path, errors, warnings.append):
                seen += 1
                resolved = self.rows_of(sample)
                if isinstance(resolved, str):
                    errors[resolved] += 1
                    warnings.append(f"{path}: sample {sample['__key__']}: {resolved}")
                    continue
                row, label = resolved
                if self.is_cached[row]:
                    cached += 1
                    continue
                data = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
                if data is None:
                    errors["missing_jpg"] += 1
                    warnings.append(f"{path}: sample {sample['__key__']}: missing_jpg")
                    continue
                try:
                    image = _decode_image(data, self.preprocess)
                except Exception as exc:  # noqa: BLE001 - any undecodable image is skipped, never fatal
                    errors["corrupt_image"] += 1
                    warnings.append(f"{path}: sample {sample['__key__']}: corrupt_image ({exc})")
                    continue
                images.append(image)
                rows.append(row)
                labels.append(label)
                if len(images) == self.batch_size:
                    yield self._batch(images, rows, labels, seen, cached, errors, warnings)
                    images, rows, labels = [], [], []
                    seen, cached, errors, warnings = 0, 0, Counter(), []
        # always one last batch: it carries the final counts even when it has no image
        yield self._batch(images, rows, labels, seen, cached, errors, warnings)


# ---------------------------------------------------------------------- the store
class FeatureStore:
    """The memory-mapped ``features``/``labels``/``is_cached`` arrays of an output directory."""

    def __init__(self, out_dir: str, features: np.memmap, labels: np.memmap, is_cached: np.memmap):
        self.out_dir = out_dir
        self.features = features
        self.labels = labels
        self.is_cached = is_cached
        self._last_flush = time.monotonic()

    @staticmethod
    def expected(data_size: int, feature_dim: int, dtype: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {
            "features": ((data_size, feature_dim), np.dtype(dtype)),
            "labels": ((data_size,), np.dtype(np.int64)),
            "is_cached": ((data_size,), np.dtype(bool)),
        }

    @classmethod
    def check(cls, out_dir: str, data_size: int, feature_dim: int, dtype: str) -> None:
        """Refuse (before any write) existing files whose shape or dtype differ."""
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise UsageError(f"--out-dir: {out_dir} is not a directory")
        for name, (shape, want) in cls.expected(data_size, feature_dim, dtype).items():
            path = os.path.join(out_dir, f"{name}.npy")
            if not os.path.exists(path):
                continue
            try:
                array = np.load(path, mmap_mode="r")
            except Exception as exc:  # noqa: BLE001
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
        for name, (shape, want) in cls.expected(data_size, feature_dim, dtype).items():
            path = os.path.join(out_dir, f"{name}.npy")
            if not os.path.exists(path):
                # created under a temporary name: a kill here never leaves a half-made header
                fresh = np.lib.format.open_memmap(path + ".tmp", mode="w+", dtype=want, shape=shape)
                fresh.flush()
                del fresh
                os.replace(path + ".tmp", path)
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
        """The seed's ``.pt`` tensors (labels as int64), each written atomically."""
        for name in ("features", "labels", "is_cached"):
            path = os.path.join(self.out_dir, f"{name}.pt")
            torch.save(torch.from_numpy(np.array(getattr(self, name))), path + ".tmp")
            os.replace(path + ".tmp", path)


# ------------------------------------------------------------------ xcent extract
def extract_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="xcent extract",
        description="Extract backbone features from webdataset image shards into "
        "DIR/{features,labels,is_cached}.npy (resumable).",
        exit_on_error=False,
    )
    parser.add_argument(
        "--data", type=Optional[str], default=None, help="dataset: glint360k or treeoflife10m (required)"
    )
    parser.add_argument(
        "--data-url",
        type=Optional[str],
        default=None,
        help="shards, e.g. 'dir/glint360k-0{000..416}.tar.gz'; '::' joins patterns (required)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument(
        "--num-samples",
        type=Optional[int],
        default=None,
        help="samples in the shards, for the progress bar (default: --data-size)",
    )
    parser.add_argument(
        "--data-size",
        type=int,
        default=18000000,
        help="rows of the output arrays; keys/catalog rows must lie in [0, data-size)",
    )
    parser.add_argument("--out-dir", type=str, default="features", help="output directory (resumed if it exists)")
    parser.add_argument(
        "--pretrained-path",
        type=Optional[str],
        default=None,
        help="backbone weights: a state_dict file (iresnet), an open_clip checkpoint or hf-hub:NAME (bioclip)",
    )
    parser.add_argument(
        "--metadata-path", type=Optional[str], default=None, help="TreeOfLife-10M catalog CSV (treeoflife_id, species)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="data-loader processes reading shards (0: read in the main process)"
    )
    parser.add_argument(
        "--device", type=Optional[str], default=None, help="torch device (default: cuda if available, else cpu)"
    )
    parser.add_argument("--seed", type=int, default=42, help="torch seed")
    parser.add_argument("--feature-dim", type=int, default=512, help="feature size the backbone must produce")
    parser.add_argument(
        "--arch",
        type=Optional[str],
        default=None,
        help=f"backbone: {', '.join(ARCHS)} (default: iresnet50 for glint360k, bioclip for treeoflife10m)",
    )
    parser.add_argument("--dtype", type=Literal["float32", "float16"], default="float32", help="dtype of features.npy")
    parser.add_argument(
        "--save-pt", action="store_true", help="also write the seed's features.pt/labels.pt/is_cached.pt at the end"
    )
    parser.add_argument(
        "--max-batches",
        type=Optional[int],
        default=None,
        help="stop after this many batches (a trial run; rerun to resume)",
    )
    return parser


def _check_extract_args(args) -> None:
    if args.data not in DEFAULT_ARCH:
        got = "" if args.data is None else f", got {args.data!r}"
        raise UsageError(f"--data must be glint360k or treeoflife10m{got}")
    if not args.data_url:
        raise UsageError("--data-url is required")
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--data-size", args.data_size),
        ("--feature-dim", args.feature_dim),
    ):
        if value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.num_samples is not None and args.num_samples <= 0:
        raise UsageError(f"--num-samples must be positive, got {args.num_samples}")
    if args.max_batches is not None and args.max_batches <= 0:
        raise UsageError(f"--max-batches must be positive, got {args.max_batches}")


SETTINGS_CHECKED_ON_RESUME = ("data", "arch", "feature_dim", "data_size", "dtype")


def _check_settings(out_dir: str, settings: dict) -> None:
    path = os.path.join(out_dir, "extract.json")
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as handle:
            previous = json.load(handle)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--out-dir: cannot read {path}: {exc}") from exc
    for key in SETTINGS_CHECKED_ON_RESUME:
        if key in previous and previous[key] != settings[key]:
            raise UsageError(
                f"--out-dir {out_dir} was extracted with {key}={previous[key]!r}, not {settings[key]!r}; "
                f"use another --out-dir or the same settings to resume"
            )
    if previous.get("pretrained_path") != settings["pretrained_path"]:
        # allowed (a moved file is the same weights), but cached rows are not recomputed
        print(
            f"warning: --pretrained-path differs from {previous.get('pretrained_path')!r} recorded in {path}; "
            "rows already cached keep their features",
            file=sys.stderr,
        )


def extract_main(argv: list[str]) -> int:
    """``xcent extract``: see the module docstring and ``xcent extract --help``."""
    args = _parse(extract_parser(), argv)
    _check_extract_args(args)
    arch = args.arch or DEFAULT_ARCH[args.data]
    if arch not in ARCHS:
        raise UsageError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    device = str(resolve_device(args.device))
    torch.manual_seed(args.seed)

    # Everything that can be wrong with the inputs is found before any file is written.
    shards = expand_urls(args.data_url)
    species = None
    if args.data == "treeoflife10m":
        id_to_row, row_labels, species = read_catalog(args.metadata_path)
        rows_of = TreeOfLifeRows(id_to_row, row_labels, args.data_size)
    else:
        rows_of = GlintRows(args.data_size)
    settings = {
        "data": args.data,
        "arch": arch,
        "feature_dim": args.feature_dim,
        "data_size": args.data_size,
        "dtype": args.dtype,
        "data_url": args.data_url,
        "pretrained_path": args.pretrained_path,
        "metadata_path": args.metadata_path,
    }
    _check_settings(args.out_dir, settings)
    FeatureStore.check(args.out_dir, args.data_size, args.feature_dim, args.dtype)
    backbone = build_backbone(arch, args.pretrained_path, args.feature_dim, device)

    store = FeatureStore.open(args.out_dir, args.data_size, args.feature_dim, args.dtype)
    write_text_atomic(os.path.join(args.out_dir, "extract.json"), json.dumps(settings, indent=2) + "\n")
    if species is not None:
        write_text_atomic(os.path.join(args.out_dir, "classes.txt"), "".join(f"{s}\n" for s in species))

    summary = run_extraction(store, shards, rows_of, backbone, args, device)

    if args.data == "glint360k":
        # the identity number is the class name; ids up to the largest seen
        num_classes = store.max_label() + 1
        write_text_atomic(os.path.join(args.out_dir, "classes.txt"), "".join(f"{i}\n" for i in range(num_classes)))
    if args.save_pt:
        store.save_pt()
    settings["last_run"] = summary
    write_text_atomic(os.path.join(args.out_dir, "extract.json"), json.dumps(settings, indent=2) + "\n")
    print(
        f"xcent extract: {summary['new_rows']} rows cached, {summary['skipped_cached']} skipped as already cached, "
        f"{summary['num_errors']} bad samples or shards skipped ({format_errors(Counter(summary['errors']))}); "
        f"{summary['total_cached']} of {args.data_size} rows cached in {args.out_dir} "
        f"[{summary['seconds']:.1f}s{', stopped at --max-batches' if summary['stopped_early'] else ''}]"
    )
    return 0


def run_extraction(store: FeatureStore, shards: list[str], rows_of, backbone, args, device: str) -> dict:
    """The loop: read, encode, store, count. Returns the run's summary."""
    from tqdm import tqdm

    # a snapshot is enough: rows cached during this run are not met again in it
    is_cached = np.array(store.is_cached)
    dataset = ShardBatches(shards, rows_of, backbone.preprocess, args.batch_size, is_cached)
    num_workers = min(args.workers, len(shards))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=device.startswith("cuda")
    )
    total = args.num_samples or args.data_size
    errors: Counter = Counter()
    new_rows = skipped_cached = num_batches = shown = 0
    stopped_early = False
    start = time.monotonic()
    progress = tqdm(total=total, unit="img", desc="extract", mininterval=1.0, dynamic_ncols=True, file=sys.stderr)
    try:
        for batch in loader:
            for message in batch["warnings"]:
                if shown < MAX_WARNINGS:
                    progress.write(f"warning: {message}", file=sys.stderr)
                elif shown == MAX_WARNINGS:
                    progress.write("warning: further bad samples are only counted (see the summary)", file=sys.stderr)
                shown += 1
            errors.update(batch["errors"])
            skipped_cached += batch["cached"]
            progress.update(batch["seen"])
            if len(batch["rows"]):
                features = backbone.encode(batch["images"].to(device, non_blocking=True))
                store.write(batch["rows"].numpy(), features.float().cpu().numpy(), batch["labels"].numpy())
                new_rows += len(batch["rows"])
                num_batches += 1
                progress.set_postfix(cached=new_rows, bad=sum(errors.values()), refresh=False)
                if args.max_batches is not None and num_batches >= args.max_batches:
                    stopped_early = True
                    break
    finally:
        progress.close()
        store.flush()
    return {
        "new_rows": new_rows,
        "skipped_cached": skipped_cached,
        "num_errors": int(sum(errors.values())),
        "errors": dict(errors),
        "total_cached": store.num_cached(),
        "seconds": round(time.monotonic() - start, 3),
        "stopped_early": stopped_early,
    }


# -------------------------------------------------------------------- xcent split
def split_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="xcent split",
        description="Split the cached rows of an `xcent extract` directory into "
        "OUT/{train,val,test}/{features,labels}.",
        exit_on_error=False,
    )
    # '--in' is a Python keyword: its value lives under the dest 'in_dir'
    parser.add_argument(
        "--in", dest="in_dir", type=Optional[str], default=None, help="directory written by xcent extract (required)"
    )
    parser.add_argument(
        "--out", dest="out_dir", type=Optional[str], default=None, help="data directory for xcent train (required)"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.05, help="fraction of cached rows (< 1) or row count (>= 1) for val"
    )
    parser.add_argument(
        "--test-fraction", type=float, default=0.05, help="fraction of cached rows (< 1) or row count (>= 1) for test"
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the split")
    parser.add_argument(
        "--stratify",
        action="store_true",
        help="keep every class with at least 3 rows in train; per-class shares of val/test",
    )
    parser.add_argument("--format", type=Literal["npy", "pt"], default="npy", help="file format of the splits")
    return parser


def split_main(argv: list[str]) -> int:
    """``xcent split``: see `xcent.extract.split` and ``xcent split --help``."""
    args = _parse(split_parser(), argv)
    if not args.in_dir:
        raise UsageError("--in is required (a directory written by xcent extract)")
    if not args.out_dir:
        raise UsageError("--out is required")
    if os.path.abspath(args.in_dir) == os.path.abspath(args.out_dir):
        raise UsageError("--out must differ from --in")
    features, labels, is_cached, classes = splitlib.load_extracted(args.in_dir)
    rows = np.flatnonzero(np.asarray(is_cached))
    if len(rows) == 0:
        raise UsageError(f"--in: {args.in_dir} has no cached row")
    row_labels = np.asarray(labels[rows], dtype=np.int64)
    if row_labels.min() < 0:
        raise UsageError(f"--in: {args.in_dir} has negative labels")
    num_classes = len(classes) if classes is not None else int(row_labels.max()) + 1
    if row_labels.max() >= num_classes:
        raise UsageError(f"--in: label {int(row_labels.max())} is beyond the {num_classes} lines of classes.txt")
    num_val = splitlib.resolve_count(args.val_fraction, len(rows), "--val-fraction")
    num_test = splitlib.resolve_count(args.test_fraction, len(rows), "--test-fraction")
    parts = splitlib.split_rows(rows, row_labels, num_val, num_test, args.seed, args.stratify)

    os.makedirs(args.out_dir, exist_ok=True)
    for name in splitlib.SPLITS:
        splitlib.write_split(args.out_dir, name, features, labels, parts[name], args.format)
    if classes is not None:
        write_text_atomic(os.path.join(args.out_dir, "classes.txt"), "".join(f"{c}\n" for c in classes))
    coverage = splitlib.class_coverage({name: np.asarray(labels[parts[name]]) for name in splitlib.SPLITS}, num_classes)
    report = {
        "in": os.path.abspath(args.in_dir),
        "seed": args.seed,
        "stratify": args.stratify,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "num_samples": {name: int(len(parts[name])) for name in splitlib.SPLITS},
        "not_cached": int(len(labels) - len(rows)),
        **coverage,
    }
    write_text_atomic(os.path.join(args.out_dir, "split.json"), json.dumps(report, indent=2) + "\n")
    sizes = report["num_samples"]
    print(
        f"xcent split: {sizes['train']} train / {sizes['val']} val / {sizes['test']} test rows "
        f"(of {len(rows)} cached; {report['not_cached']} rows not cached were left out) -> {args.out_dir}"
    )
    print(
        f"classes: {num_classes} in total, {coverage['classes_with_rows']} with rows, "
        f"{coverage['classes_in_train']} in train; "
        f"absent from train: {coverage['val_classes_not_in_train']} of the val classes, "
        f"{coverage['test_classes_not_in_train']} of the test classes"
    )
    return 0
