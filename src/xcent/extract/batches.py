"""`ShardBatches`: the ``torch.utils.data.IterableDataset`` that turns shards into
batches of preprocessed images with their global rows and labels.

Every batch also carries the account of what happened since the previous batch of the
same worker (samples seen, rows skipped as cached, bad samples by reason, shard breaks,
warnings): the main process adds these up, so the totals are the same whatever the
batch size or the number of workers. Each data-loader worker reads every
``num_workers``-th shard; rows already cached are skipped before their image is decoded.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import asdict

import numpy as np
import torch

from .shards import ShardBreak, iter_shard

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def decode_image(data: bytes, preprocess) -> torch.Tensor:
    """PIL-decode ``data`` fully (a truncated file fails here, not later) and preprocess it."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return preprocess(image)


class _Pending:
    """What one worker has gathered since its last batch."""

    def __init__(self):
        self.images, self.rows, self.labels = [], [], []
        self.seen = self.cached = 0
        self.errors: Counter = Counter()
        self.breaks: list[dict] = []
        self.warnings: list[str] = []

    def skip(self, reason: str, message: str) -> None:
        self.errors[reason] += 1
        self.warnings.append(message)

    def batch(self) -> dict:
        return {
            "images": torch.stack(self.images) if self.images else torch.zeros(0),
            "rows": torch.tensor(self.rows, dtype=torch.int64),
            "labels": torch.tensor(self.labels, dtype=torch.int64),
            "seen": self.seen,
            "cached": self.cached,
            "errors": dict(self.errors),
            "breaks": self.breaks,
            "warnings": self.warnings,
        }


class ShardBatches(torch.utils.data.IterableDataset):
    """Batches of ``batch_size`` images (the last one of each worker may be smaller,
    even empty: it carries the final counts)."""

    def __init__(self, shards: list[str], rows_of, preprocess, batch_size: int, is_cached: np.ndarray):
        super().__init__()
        self.shards = shards
        self.rows_of = rows_of
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.is_cached = is_cached

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        shards = self.shards if info is None else self.shards[info.id :: info.num_workers]
        pending = _Pending()
        for path in shards:
            for sample in iter_shard(path):
                if isinstance(sample, ShardBreak):
                    pending.errors["bad_shard"] += 1
                    pending.breaks.append(asdict(sample))
                    pending.warnings.append(
                        f"{path}: shard breaks off after {sample.samples_read} samples ({sample.error}); "
                        "rest of the shard skipped"
                    )
                    continue
                pending.seen += 1
                where = f"{path}: sample {sample['__key__']}"
                resolved = self.rows_of(sample)
                if isinstance(resolved, str):
                    pending.skip(resolved, f"{where}: {resolved}")
                    continue
                row, label = resolved
                if self.is_cached[row]:
                    pending.cached += 1
                    continue
                data = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
                if data is None:
                    pending.skip("missing_jpg", f"{where}: missing_jpg")
                    continue
                try:
                    image = decode_image(data, self.preprocess)
                except Exception as exc:  # noqa: BLE001 - any undecodable image is skipped, never fatal
                    pending.skip("corrupt_image", f"{where}: corrupt_image ({exc})")
                    continue
                pending.images.append(image)
                pending.rows.append(row)
                pending.labels.append(label)
                if len(pending.images) == self.batch_size:
                    yield pending.batch()
                    pending = _Pending()
        yield pending.batch()
