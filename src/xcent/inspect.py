"""The data report: what a dataset looks like, and which settings suit it.

:func:`data_report` summarises a loaded :class:`xcent.data.Dataset` as a plain dict
(JSON-ready): rows per split, classes, training rows per class (min / median / max
over the classes that have any, and how many have fewer than three or none),
feature norms (mean, spread and percentiles, on a seeded sample of training rows),
and the val/test classes that never occur in training (their rows cannot be
classified right by any model trained on this split). :func:`suggestions` turns it
into advice; :func:`format_report` prints it on one screen. ``xcent inspect`` and
the start of ``xcent train`` use it.

Labels are in memory, so the class counts are exact; norms read at most
``sample_rows`` feature rows (sorted, in chunks) of the memory-mapped split.
"""

from __future__ import annotations

import torch

from .data import Dataset

__all__ = ["FEW_ROWS", "NORM_RANGE", "data_report", "format_report", "suggestions"]

#: a class with fewer training rows than this counts as rare
FEW_ROWS = 3
#: median train rows per class below which class-mean initialisation is recommended
FEW_ROWS_MEDIAN = 10
#: mean feature norm outside this range: the tuned learning rates do not fit it
NORM_RANGE = (0.5, 2.0)


def _quantiles(values: torch.Tensor, qs) -> list[float]:
    return [float(v) for v in torch.quantile(values.double(), torch.tensor(qs, dtype=torch.float64))]


@torch.no_grad()
def data_report(data: Dataset, sample_rows: int = 20000, seed: int = 0) -> dict:
    """The report of ``data`` as a dict (see the module docstring)."""
    train = data.train
    counts = torch.bincount(train.labels, minlength=data.num_classes)
    present = counts[counts > 0]
    rpc_min, rpc_median, rpc_max = int(present.min()), float(present.double().median()), int(present.max())
    gen = torch.Generator().manual_seed(int(seed))
    n = train.num_samples
    rows = (
        None if sample_rows <= 0 or sample_rows >= n else torch.randperm(n, generator=gen)[:sample_rows].sort().values
    )
    norms = torch.cat([f.to(torch.float32).norm(dim=1) for f, _ in train.chunks(rows)])
    p5, p50, p95 = _quantiles(norms, [0.05, 0.5, 0.95])
    report = {
        "feature_dim": data.feature_dim,
        "num_classes": data.num_classes,
        "rows": {name: split.num_samples for name, split in data.splits.items()},
        "train_rows_per_class": {
            "min": rpc_min, "median": rpc_median, "max": rpc_max, "mean": n / max(len(present), 1),
            "classes_with_rows": len(present),
            "classes_without_rows": int(data.num_classes - len(present)),
            f"classes_below_{FEW_ROWS}_rows": int(((counts > 0) & (counts < FEW_ROWS)).sum()),
        },
        "feature_norm": {"mean": float(norms.mean()), "std": float(norms.std()) if norms.numel() > 1 else 0.0,
                         "p5": p5, "median": p50, "p95": p95, "mean_sq": float((norms.double() ** 2).mean()),
                         "rows_sampled": int(norms.numel())},
        "unseen_in_train": {},
    }
    for name, split in data.splits.items():
        if name == "train":
            continue
        unseen_rows = counts[split.labels] == 0
        report["unseen_in_train"][name] = {
            "classes": int(torch.unique(split.labels[unseen_rows]).numel()),
            "rows": int(unseen_rows.sum()), "share_of_rows": float(unseen_rows.double().mean()),
        }
    report["suggestions"] = suggestions(report)
    return report


def suggestions(report: dict) -> list[str]:
    """Advice drawn from a :func:`data_report` dict, most important first."""
    out = []
    rpc = report["train_rows_per_class"]
    norm = report["feature_norm"]["mean"]
    if rpc["median"] < FEW_ROWS_MEDIAN:
        out.append(f"few rows per class (median {rpc['median']:g}): keep the default --init class-means "
                   f"(a random start learns little in a few epochs)")
    if not NORM_RANGE[0] <= norm <= NORM_RANGE[1]:
        out.append(f"feature norm {norm:.3g} is far from 1: --lr auto recommended (a step moves logits by "
                   f"about lr x |x|^2 / batch, so the tuned lr does not fit)")
    elif rpc["median"] < FEW_ROWS_MEDIAN:
        out.append("few visits per class each epoch: --lr auto recommended")
    for name, u in report["unseen_in_train"].items():
        if u["rows"]:
            out.append(f"{u['share_of_rows']:.1%} of {name} rows ({u['classes']} classes) have classes never seen "
                       f"in train: no model gets them right; their CE grows with training")
    if rpc["classes_without_rows"]:
        out.append(f"{rpc['classes_without_rows']} of {report['num_classes']} classes have no training row")
    if not out:
        out.append("nothing unusual: the tuned defaults should do")
    return out


def format_report(report: dict) -> str:
    """The report on one screen (about 15 lines)."""
    rpc, norm = report["train_rows_per_class"], report["feature_norm"]
    rows = ", ".join(f"{k} {v:,}" for k, v in report["rows"].items())
    lines = [
        f"rows            {rows}",
        (f"classes         {report['num_classes']:,} ({rpc['classes_with_rows']:,} with training rows), "
         f"feature dim {report['feature_dim']}"),
        (f"train rows/class min {rpc['min']}, median {rpc['median']:g}, max {rpc['max']}, mean {rpc['mean']:.3g}; "
         f"{rpc[f'classes_below_{FEW_ROWS}_rows']:,} classes with < {FEW_ROWS}"),
        (f"feature norm    mean {norm['mean']:.4g}, std {norm['std']:.3g} (5% {norm['p5']:.4g}, "
         f"median {norm['median']:.4g}, 95% {norm['p95']:.4g}; {norm['rows_sampled']:,} train rows)"),
    ]
    for name, u in report["unseen_in_train"].items():
        lines.append(f"{name + ' unseen':<15} {u['rows']:,} rows ({u['share_of_rows']:.1%}) of "
                     f"{u['classes']:,} classes never seen in train")
    lines.append("suggestions:")
    lines += [f"  - {s}" for s in report["suggestions"]]
    return "\n".join(lines)

