"""The class-mean init's scale search: the grid search of :mod:`xcent.init`
(:func:`xcent.init.scale_class_means_`: two grid passes, every candidate scale from one
float32 GEMM per logit block, plus one pass at the chosen scale) against the
golden-section search it replaced (22 full-softmax evaluations of the held-out rows in
float64, :func:`xcent.classifier.full_softmax_stats`), in the same run, one thread.

    python benchmarks/init.py                                  # C = 36,000, D = 512, 4,096 rows: ~3 minutes
    python benchmarks/init.py --rows 4096 20000 --repeats 3    # adds the old 20,000-row default: ~15 minutes

The old search always makes 22 evaluations of the same cost, so it is timed as one
evaluation (median of ``--repeats``) times 22; the new one end to end (median of
``--repeats``). Both are linear in rows x classes x feature_dim; the last lines
extrapolate by FLOPs to Glint360K's shape (C = 360,232, D = 512) at this machine's
measured rate. Synthetic data: unit class directions, rows = their class's direction
plus Gaussian noise (an interior optimum of the scale, as on real data). Wall-clock
times on a shared machine: read the ratios.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from xcent.classifier import full_softmax_stats
from xcent.init import SCALE_BRACKET, scale_class_means_

#: the golden-section search's evaluations (20 steps + 2), before the grid search replaced it
OLD_EVALUATIONS = 22
GLINT = (360_232, 512)


def make(num_classes: int, dim: int, rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    y = torch.randint(0, num_classes, (rows,), generator=g)
    x = directions[y] + 1.2 * torch.randn(rows, dim, generator=g) / math.sqrt(dim)
    return directions, x, y


def old_evaluation(directions: torch.Tensor, x, y, scale: float) -> float:
    """One probe of the golden-section search as it was: float64 logits, CE over all rows."""
    d64, x64 = directions.double(), x.double()
    total = 0.0
    for a in range(0, x64.shape[0], 4096):
        lse, target, _ = full_softmax_stats(x64[a:a + 4096] * scale, y[a:a + 4096], d64)
        total += float((lse - target).sum())
    return total / x64.shape[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=36_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--rows", type=int, nargs="+", default=[4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"C = {a.classes:,}, D = {a.dim}, threads {a.threads}, medians of {a.repeats}")
    for rows in a.rows:
        directions, x, y = make(a.classes, a.dim, rows)
        mean_norm = float(x.double().norm(dim=1).mean())
        new_times, scales = [], []
        for _ in range(a.repeats):
            sums = directions.clone()
            start = time.perf_counter()
            result = scale_class_means_(sums, torch.ones(a.classes, dtype=torch.long), x, y)
            new_times.append(time.perf_counter() - start)
            scales.append(result.scale)
        old_times = []
        for _ in range(a.repeats):
            start = time.perf_counter()
            old_loss = old_evaluation(directions, x, y, result.scale)
            old_times.append(time.perf_counter() - start)
        new, old = statistics.median(new_times), OLD_EVALUATIONS * statistics.median(old_times)
        flop = 2.0 * rows * a.classes * a.dim
        print(f"rows {rows:>6,}: new search {new:8.1f} s (scale {scales[0]:.5g} x mean norm {mean_norm:.3g}, "
              f"CE {result.loss:.5f}; old-style float64 CE there {old_loss:.5f}); "
              f"old search {OLD_EVALUATIONS} x {statistics.median(old_times):.2f} s = {old:8.1f} s; "
              f"old/new {old / new:.1f}x")
        glint = 2.0 * rows * GLINT[0] * GLINT[1]
        print(f"  Glint shape by FLOPs (x{glint / flop:.1f}): new {new * glint / flop / 60:.1f} min, "
              f"old {old * glint / flop / 60:.1f} min (one GEMM pass = {glint / 1e12:.2f} TFLOP)")
    print(f"bracket {SCALE_BRACKET} / mean norm")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
