"""The extraction itself (library): webdataset image shards -> the feature store.

`extract_features` reads the shards of one dataset (`xcent.extract.datasets`) through a
backbone (`xcent.extract.backbones`) into a `FeatureStore` directory, resuming what is
already cached. Its output directory holds ``features.npy``, ``labels.npy``,
``is_cached.npy`` (see `xcent.extract.store`), ``classes.txt`` and ``extract.json`` (the
settings, checked on resume, and the last run's summary); ``save_pt`` also writes the
reference implementation's ``features.pt``/``labels.pt``/``is_cached.pt`` at the end.

Bad samples (corrupt image, missing or out-of-range ``cls``, key outside
``[0, data_size)``, id missing from the catalog) are counted by reason and skipped; a
truncated or damaged shard counts one ``bad_shard`` and the summary says how many of its
samples were read before the break. Nothing about a bad sample stops the run. Missing
shards, an unreadable catalog, weights that do not fit or an output directory made with
other settings are reported (`UsageError`) before any file is written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from ..device import resolve_device
from ..errors import UsageError
from ..fileio import exclusive_lock, foreign_entry, write_text_atomic
from ..yamlio import load_json
from .backbones import ARCHS, build_backbone
from .batches import ShardBatches
from .datasets import DatasetOptions, get_dataset
from .shards import expand_urls, format_errors
from .store import NAMES, FeatureStore

#: warnings printed per run before the rest are only counted
MAX_WARNINGS = 20
#: settings that must match the ones an output directory was made with
SETTINGS_CHECKED_ON_RESUME = ("data", "arch", "feature_dim", "data_size", "dtype")


@dataclass
class ExtractConfig:
    """The settings of one extraction (the ``xcent extract`` flags)."""

    data: str
    data_url: str
    out_dir: str = "features"
    arch: str | None = None  # None: the dataset's default backbone
    pretrained_path: str | None = None
    metadata_path: str | None = None
    batch_size: int = 64
    num_samples: int | None = None  # for the progress bar only
    data_size: int = 18_000_000
    workers: int = 1
    device: str | None = None
    seed: int = 42
    feature_dim: int = 512
    dtype: str = "float32"
    save_pt: bool = False
    max_batches: int | None = None

    def validate(self) -> None:
        get_dataset(self.data)
        if not self.data_url:
            raise UsageError("--data-url is required")
        for flag, value in (
            ("--batch-size", self.batch_size),
            ("--data-size", self.data_size),
            ("--feature-dim", self.feature_dim),
        ):
            if value <= 0:
                raise UsageError(f"{flag} must be positive, got {value}")
        if self.workers < 0:
            raise UsageError(f"--workers must be >= 0, got {self.workers}")
        for flag, value in (("--num-samples", self.num_samples), ("--max-batches", self.max_batches)):
            if value is not None and value <= 0:
                raise UsageError(f"{flag} must be positive, got {value}")
        if self.dtype not in ("float32", "float16"):
            raise UsageError(f"--dtype must be float32 or float16, got {self.dtype!r}")


def check_settings(out_dir: str, settings: dict) -> None:
    """Refuse to resume ``out_dir`` with settings that change what its rows mean."""
    path = os.path.join(out_dir, "extract.json")
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as handle:
            previous = load_json(handle.read())
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


#: what an extraction writes in its --out-dir (the ``.pt`` files with ``save_pt``)
EXTRACT_ENTRIES = frozenset({"extract.json", "classes.txt", *(f"{n}.{ext}" for n in NAMES for ext in ("npy", "pt"))})


def check_out_dir(out_dir: str) -> None:
    """``--out-dir`` must be new, empty, or an extraction's output: its entries those of
    :data:`EXTRACT_ENTRIES` (and xcent's leftovers), with ``extract.json``, which is
    written before anything else. A folder of the user's (arrays it made itself
    included) is never written into."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise UsageError(f"--out-dir: {out_dir} is not a directory")
    foreign = foreign_entry(out_dir, lambda p: p.name in EXTRACT_ENTRIES and not p.is_symlink()
                            and (p.is_file() or not p.exists()))
    if foreign is not None:
        raise UsageError(f"--out-dir: {out_dir} holds {foreign!r}, which xcent extract does not write: it writes "
                         f"only into a new or empty directory or one of its own outputs; use another --out-dir")
    if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "extract.json")):
        entry = sorted(os.listdir(out_dir))[0]
        raise UsageError(f"--out-dir: {out_dir} holds {entry!r} but no extract.json, so it was not written by "
                         f"xcent extract and is not resumed; use another --out-dir or move it away")


def _write_classes(out_dir: str, names: list[str]) -> None:
    write_text_atomic(os.path.join(out_dir, "classes.txt"), "".join(f"{name}\n" for name in names))


def extract_features(cfg: ExtractConfig) -> dict:
    """Run one extraction (resuming ``cfg.out_dir``); returns the run's summary, which is
    also stored as ``last_run`` in ``extract.json``."""
    cfg.validate()
    spec = get_dataset(cfg.data)
    arch = cfg.arch or spec.default_arch
    if arch not in ARCHS:
        raise UsageError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    device = str(resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)

    # Everything that can be wrong with the inputs is found before any file is written.
    shards = expand_urls(cfg.data_url)
    rows_of = spec.open(DatasetOptions(data_size=cfg.data_size, metadata_path=cfg.metadata_path))
    settings = {
        "data": cfg.data, "arch": arch, "feature_dim": cfg.feature_dim, "data_size": cfg.data_size,
        "dtype": cfg.dtype, "data_url": cfg.data_url, "pretrained_path": cfg.pretrained_path,
        "metadata_path": cfg.metadata_path,
    }  # fmt: skip
    check_out_dir(cfg.out_dir)
    check_settings(cfg.out_dir, settings)
    FeatureStore.check(cfg.out_dir, cfg.data_size, cfg.feature_dim, cfg.dtype)
    backbone = build_backbone(arch, cfg.pretrained_path, cfg.feature_dim, device)

    with exclusive_lock(cfg.out_dir, "extraction output"):  # one writer per store
        # checked again under the lock (what is written into is what was checked); the
        # settings go first, so the directory reads as an extraction output from its first file
        check_out_dir(cfg.out_dir)
        check_settings(cfg.out_dir, settings)
        os.makedirs(cfg.out_dir, exist_ok=True)
        write_text_atomic(os.path.join(cfg.out_dir, "extract.json"), json.dumps(settings, indent=2) + "\n")
        store = FeatureStore.open(cfg.out_dir, cfg.data_size, cfg.feature_dim, cfg.dtype)
        if rows_of.classes is not None:  # known up front: a partial extraction can be split too
            _write_classes(cfg.out_dir, rows_of.classes)

        summary = run_extraction(store, shards, rows_of, backbone, cfg, device)

        _write_classes(cfg.out_dir, rows_of.class_names(store.max_label()))
        if cfg.save_pt:
            store.save_pt()
        settings["last_run"] = summary
        write_text_atomic(os.path.join(cfg.out_dir, "extract.json"), json.dumps(settings, indent=2) + "\n")
        return summary


def run_extraction(store: FeatureStore, shards: list[str], rows_of, backbone, cfg: ExtractConfig, device: str) -> dict:
    """The loop: read, encode, store, count. Returns the run's summary."""
    from tqdm import tqdm

    # a snapshot is enough: rows cached during this run are not met again in it
    is_cached = np.array(store.is_cached)
    dataset = ShardBatches(shards, rows_of, backbone.preprocess, cfg.batch_size, is_cached)
    num_workers = min(cfg.workers, len(shards))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=device.startswith("cuda")
    )
    errors: Counter = Counter()
    breaks: list[dict] = []
    new_rows = skipped_cached = num_batches = shown = 0
    stopped_early = False
    start = time.monotonic()
    progress = tqdm(
        total=cfg.num_samples or cfg.data_size,
        unit="img",
        desc="extract",
        mininterval=1.0,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    try:
        for batch in loader:
            for message in batch["warnings"]:
                if shown < MAX_WARNINGS:
                    progress.write(f"warning: {message}", file=sys.stderr)
                elif shown == MAX_WARNINGS:
                    progress.write("warning: further bad samples are only counted (see the summary)", file=sys.stderr)
                shown += 1
            errors.update(batch["errors"])
            breaks.extend(batch["breaks"])
            skipped_cached += batch["cached"]
            progress.update(batch["seen"])
            if len(batch["rows"]):
                features = backbone.encode(batch["images"].to(device, non_blocking=True))
                store.write(batch["rows"].numpy(), features.float().cpu().numpy(), batch["labels"].numpy())
                new_rows += len(batch["rows"])
                num_batches += 1
                progress.set_postfix(cached=new_rows, bad=sum(errors.values()), refresh=False)
                if cfg.max_batches is not None and num_batches >= cfg.max_batches:
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
        "shard_breaks": sorted(breaks, key=lambda b: b["path"]),
        "total_cached": store.num_cached(),
        "seconds": round(time.monotonic() - start, 3),
        "stopped_early": stopped_early,
    }


def summary_line(summary: dict, cfg: ExtractConfig) -> str:
    """The one-paragraph report of a run, shard breaks included."""
    breaks = "".join(
        f"; shard {b['path']} broke off after {b['samples_read']} samples ({b['error']})"
        for b in summary["shard_breaks"]
    )
    return (
        f"xcent extract: {summary['new_rows']} rows cached, {summary['skipped_cached']} skipped as already cached, "
        f"{summary['num_errors']} bad samples or shards skipped ({format_errors(Counter(summary['errors']))}){breaks}; "
        f"{summary['total_cached']} of {cfg.data_size} rows cached in {cfg.out_dir} "
        f"[{summary['seconds']:.1f}s{', stopped at --max-batches' if summary['stopped_early'] else ''}]"
    )


__all__ = ["ExtractConfig", "extract_features", "run_extraction", "summary_line"]
