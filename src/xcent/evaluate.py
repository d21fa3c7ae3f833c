"""Exact evaluation: full-softmax cross-entropy and top-1/top-5 accuracy over all C
classes, in chunks of bounded memory, and the ``xcent eval`` command.

``xcent eval`` also reports how the model does on rare classes, the hard part of
extreme classification: per-class sums (:func:`per_class_stats`) are aggregated
overall, macro-averaged over classes, and per train-frequency bucket
(:func:`class_buckets`: head / torso / tail thirds of the classes seen in training,
plus the classes never seen)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from .classifier import full_softmax_stats
from .data import Split
from .errors import UsageError


@torch.no_grad()
def evaluate(split: Split, weight: Tensor, rows: Tensor | None = None, chunk_rows: int = 4096,
             class_chunk: int = 32768, precision: str = "fp32") -> dict:
    """``{"loss", "top1", "top5", "num_rows"}`` of ``weight`` on ``split`` (or on its
    ``rows``): mean full-softmax CE and top-k accuracy. Reads the split chunk by chunk;
    peak extra memory is one (chunk_rows, class_chunk) block. Never changes any
    training state. ``precision``: of the score GEMMs
    (:func:`xcent.classifier.matmul_nt`)."""
    return summarize(full_softmax_stats(feats, labels, weight, class_chunk, precision=precision)
                     for feats, labels in split.chunks(rows, chunk_rows))


def summarize(chunk_stats: Iterable[tuple[Tensor, Tensor, Tensor]]) -> dict:
    """``{"loss", "top1", "top5", "num_rows"}`` from the ``(lse, target, rank)`` of
    each chunk (:func:`xcent.classifier.full_softmax_stats` or its class-sharded
    twin): mean CE ``lse - target``, top-k correct iff ``rank < k``."""
    total_loss = torch.zeros((), dtype=torch.float64)
    correct1 = correct5 = count = 0
    for lse, target, rank in chunk_stats:
        total_loss += (lse - target).double().sum().cpu()
        correct1 += int((rank < 1).sum())
        correct5 += int((rank < 5).sum())
        count += int(rank.shape[0])
    return {"loss": float(total_loss) / count, "top1": correct1 / count, "top5": correct5 / count,
            "num_rows": count}


@torch.no_grad()
def per_class_stats(split: Split, weight: Tensor, rows: Tensor | None = None, chunk_rows: int = 4096,
                    class_chunk: int = 32768, precision: str = "fp32") -> dict[str, Tensor]:
    """Sums per true class c, each a (C,) CPU tensor: ``rows`` (eval rows of class c),
    ``correct1`` / ``correct5`` (of those, top-1 / top-5 correct over all C classes)
    and ``loss`` (float64 sum of the full-softmax CE ``lse_i - w_{y_i} . x_i``).

    One pass over the split with the same chunked kernel as :func:`evaluate`; every
    aggregate (overall, per bucket, macro) is a sum or mean of these, so one
    evaluation gives all of them and they agree with :func:`evaluate` by construction.
    """
    num_classes = weight.shape[0]
    stats = {key: torch.zeros(num_classes, dtype=torch.long) for key in ("rows", "correct1", "correct5")}
    stats["loss"] = torch.zeros(num_classes, dtype=torch.float64)
    for feats, labels in split.chunks(rows, chunk_rows):
        lse, target, rank = full_softmax_stats(feats, labels, weight, class_chunk, precision=precision)
        y = labels.to(torch.long)
        stats["rows"].index_add_(0, y, torch.ones_like(y))
        stats["correct1"].index_add_(0, y, (rank < 1).long().cpu())
        stats["correct5"].index_add_(0, y, (rank < 5).long().cpu())
        stats["loss"].index_add_(0, y, (lse - target).double().cpu())
    return stats


BUCKETS = ("head", "torso", "tail")


def class_buckets(train_counts: Tensor, num_buckets: int = 3) -> dict[str, Tensor]:
    """Split the classes by how often they occur in the training split.

    Classes with at least one training row are ordered by train count, most frequent
    first (ties by class id, so the split is deterministic), and cut into
    ``num_buckets`` groups of equal numbers of classes (the first groups take one
    extra class when it does not divide): ``head``, ``torso``, ``tail`` for three.
    Classes with zero training rows form ``unseen``. Returns name -> sorted class ids.
    """
    counts = train_counts.to(torch.long).cpu()
    ids = torch.arange(counts.shape[0])
    seen = ids[counts > 0]
    # stable sort on -count keeps ascending class id within a tie
    order = seen[torch.sort(-counts[seen], stable=True).indices]
    names = BUCKETS if num_buckets == 3 else tuple(f"bucket_{j}" for j in range(num_buckets))
    out = {}
    base, extra = divmod(order.shape[0], num_buckets)
    start = 0
    for j, name in enumerate(names):
        size = base + (1 if j < extra else 0)
        out[name] = torch.sort(order[start:start + size]).values
        start += size
    out["unseen"] = ids[counts == 0]
    return out


def _aggregate(stats: dict[str, Tensor], classes: Tensor | None = None) -> dict:
    """Micro (row-weighted) CE/top-1/top-5 and macro (class-averaged) top-1/top-5 over
    ``classes`` (all if None). Macro accuracy = mean over the classes that have at
    least one evaluated row of (correct rows of c / rows of c); classes without
    rows have no accuracy and are left out rather than counted as 0 or 1."""
    pick = (lambda t: t) if classes is None else (lambda t: t.index_select(0, classes))
    rows, c1, c5, loss = (pick(stats[k]) for k in ("rows", "correct1", "correct5", "loss"))
    n = int(rows.sum())
    present = rows > 0
    out = {"num_rows": n, "num_classes_evaluated": int(present.sum())}
    if n == 0:
        return {**out, "loss": None, "top1": None, "top5": None, "macro_top1": None, "macro_top5": None}
    r = rows[present].double()
    return {**out, "loss": float(loss.sum()) / n, "top1": int(c1.sum()) / n, "top5": int(c5.sum()) / n,
            "macro_top1": float((c1[present].double() / r).mean()),
            "macro_top5": float((c5[present].double() / r).mean())}


def bucket_metrics(stats: dict[str, Tensor], train_counts: Tensor, num_buckets: int = 3) -> dict[str, dict]:
    """Metrics of each class-frequency bucket (see :func:`class_buckets`): the
    bucket's ``num_classes`` and train-count range, and :func:`_aggregate` over the
    evaluated rows whose true class is in the bucket."""
    counts = train_counts.to(torch.long).cpu()
    out = {}
    for name, classes in class_buckets(counts, num_buckets).items():
        c = counts.index_select(0, classes)
        out[name] = {"num_classes": int(classes.shape[0]),
                     "train_count_min": int(c.min()) if len(c) else None,
                     "train_count_max": int(c.max()) if len(c) else None,
                     **_aggregate(stats, classes)}
    return out


def train_class_counts(data_dir, num_classes: int) -> Tensor | None:
    """Rows per class in ``DATA_DIR/train`` (labels only; the features are not
    scanned), or None when there is no train split."""
    from .data import load_split

    if not (Path(data_dir) / "train").is_dir():
        return None
    labels = load_split(Path(data_dir), "train", check_features=False).labels
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise UsageError(f"--data-dir {data_dir}: train label {bad} is out of range for {num_classes} classes")
    return torch.bincount(labels, minlength=num_classes)
