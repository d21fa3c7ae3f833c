"""The training head's own divergence check on a many-class task: where it stops a head
driven at too large an lr, and how far below its bound healthy heads stay.

    PYTHONPATH=src python benchmarks/head_divergence.py --threads 1

Generated data of the shape of a 117,659-class text task (2.5 rows per class on
average, unit-length 384-d embeddings: a random direction per class plus noise, frozen:
no backbone), batch 256, 3 epochs, checked every 100 steps (the default). Each run
prints where :class:`xcent.SparseSoftmaxHead` stopped (or that it did not), the largest
ratio of a step's batch CE bound (:func:`xcent.divergence.batch_ce_lower_bound`) to the
divergence bound ``10 x max(log C, 1)``, and the full-softmax CE of 5,000 held-out rows
at the end (``log C`` = 11.68 for the untrained head). Not a timed benchmark.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import xcent.head as head_module
from xcent.divergence import batch_ce_lower_bound, divergence_bound
from xcent.errors import DivergenceError
from xcent.head import SparseSoftmaxHead


def make_data(num_classes: int, dim: int, rows_per_class: float, held_out: int, noise: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(num_classes, dim, generator=gen), dim=1)
    n = int(num_classes * rows_per_class)
    y = torch.cat([torch.arange(num_classes), torch.randint(0, num_classes, (n - num_classes,), generator=gen)])
    y = y[torch.randperm(n, generator=gen)]
    x = F.normalize(directions[y] + noise * torch.randn(n, dim, generator=gen) / math.sqrt(dim), dim=1)
    return x[held_out:], y[held_out:], x[:held_out], y[:held_out]


def full_ce(head, x, y, chunk=1000) -> float:
    with torch.no_grad():
        return sum(F.cross_entropy(head.logits(x[i:i + chunk]), y[i:i + chunk], reduction="sum").item()
                   for i in range(0, len(y), chunk)) / len(y)


def run(args, data, algorithm, lr, start):
    x, y, x_val, y_val = data
    C, N = args.classes, len(y)
    seen = []

    def recorded(logits):  # every step's bound, for the margin (read here, not by the head)
        value = batch_ce_lower_bound(logits)
        seen.append(value)
        return value

    head_module.batch_ce_lower_bound = recorded
    head = SparseSoftmaxHead(C, args.dim, N, algorithm=algorithm, lr=lr, epochs=args.epochs)
    if start == "class-means":
        head.init_class_means_((x[i:i + 4096], y[i:i + 4096]) for i in range(0, N, 4096))
    gen = torch.Generator().manual_seed(1)
    outcome, t0 = f"ran {args.epochs} epochs", time.perf_counter()
    try:
        for epoch in range(1, args.epochs + 1):
            head.set_epoch(epoch)
            for idx in torch.randperm(N, generator=gen).split(args.batch_size):
                head(x[idx], y[idx], idx).backward()
        head.check()
    except DivergenceError as err:
        outcome = str(err).split(":")[0].replace("SparseSoftmaxHead diverged", "stopped")
    finally:
        head_module.batch_ce_lower_bound = batch_ce_lower_bound
    ratio = max(float(v) for v in seen) / divergence_bound(C)
    seconds = time.perf_counter() - t0
    head.eval()
    print(f"{algorithm:>6} {start:>11} lr {lr:<8g} {outcome:<45} max bound ratio {ratio:9.3g}   "
          f"held-out CE {full_ce(head, x_val, y_val):9.4g}   ({seconds:.0f} s)", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=117_659)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--rows-per-class", type=float, default=2.5)
    p.add_argument("--noise", type=float, default=1.0, help="noise norm relative to the unit class direction")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--runs", default="scent:random:5,scent:random:500,scent:random:5000,scent:class-means:5,"
                                     "sox:class-means:5,bsgd:random:1",
                   help="algorithm:start:lr, comma-separated")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = make_data(args.classes, args.dim, args.rows_per_class, 5000, args.noise, seed=0)
    print(f"C = {args.classes:,}, {len(data[1]):,} training rows, D = {args.dim}, "
          f"log C = {math.log(args.classes):.2f}, bound {divergence_bound(args.classes):.1f}")
    for spec in args.runs.split(","):
        algorithm, start, lr = spec.split(":")
        run(args, data, algorithm, float(lr), start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
