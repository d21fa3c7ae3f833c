"""Batch prefetch: ``xcent train`` epochs with ``--prefetch`` (the next batch read from
the memory-mapped split in a background thread while the step runs) against
``--no-prefetch`` (read in the loop), at B = 128 and 1,024, ``--threads 1`` and
``--threads auto``; the eight settings interleaved in every repeat, medians of
``--repeats``, ratios within the same run.

    python benchmarks/prefetch.py               # 36,023 classes, 200,000 rows x 512 float16: ~5 minutes
    python benchmarks/prefetch.py --rows 500000 --repeats 5

First, in-process: the two halves of a step (one thread), the batch read
(``xcent.data.Split.gather``) and ``xcent.step.train_step``, which bound what the
overlap can save (at most the read's share of read + step); then the epoch loop's core
(``xcent.batches.BatchLoader`` + ``train_step``) with prefetch on and off alternating
in short blocks, whose paired ratio is steadier than separate processes on a shared
machine.

Wall-clock times on a shared machine: run it when the machine is otherwise quiet,
and read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as cm  # noqa: E402


def train_once(data: Path, out: Path, B: int, threads: str, prefetch: bool) -> float:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    cmd = [sys.executable, "-m", "xcent", "train", "--data-dir", str(data), "--out-dir", str(out), "--name", "p",
           "--epochs", "1", "--device", "cpu", "--batch-size", str(B), "--threads", threads,
           "--prefetch", "on" if prefetch else "off", "--train-eval-size", "1000", "--check-features", "false",
           "--keep-best", "false", "--log-every-steps", "0", "--overwrite", "true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-2000:])
        raise SystemExit("xcent train failed")
    return cm.read_jsonl(out / "p" / "eval_p.jsonl")[-1]["samples_per_second"]


def in_process(data: Path, classes: int, batch_sizes, threads_modes, blocks: int, block_rows: int) -> list[list]:
    """The epoch loop's core in this process: ``BatchLoader`` + ``train_step`` over blocks
    of ``block_rows`` rows, prefetch on and off alternating block by block (paired, so
    that the load of the shared machine drifts under both alike); per setting the median
    samples/s of each and the median of the per-pair ratios. Also the two halves of a
    step (one thread): the batch read and the step, which bound what overlap can save."""
    import torch

    from xcent.batches import BatchLoader
    from xcent.classifier import init_weight
    from xcent.data import load_split
    from xcent.device import ThreadPolicy
    from xcent.losses import build
    from xcent.step import train_step

    split = load_split(data, "train", check_features=False)
    gen = torch.Generator().manual_seed(0)
    weight = init_weight(classes, split.feature_dim, 0)
    loss_fn = build("scent", split.num_samples)
    cores = torch.get_num_threads()
    halves_rows, pair_rows = [], []
    for B in batch_sizes:
        torch.set_num_threads(1)
        read, step = [], []
        order = torch.randperm(split.num_samples, generator=gen)
        for t in range(min(60, split.num_samples // B)):
            index = order[t * B:(t + 1) * B].sort().values
            start = cm.clock()
            feats, labels = split.gather(index)
            mid = cm.clock()
            train_step(weight, loss_fn, feats, labels, index, 0.1)
            read.append(mid - start)
            step.append(cm.clock() - mid)
        r, s = cm.median(read[3:]) * 1e3, cm.median(step[3:]) * 1e3
        halves_rows.append([B, r, s, r / (r + s)])
        for threads in threads_modes:
            policy = ThreadPolicy(threads, max_threads=cores)
            torch.set_num_threads(policy.step_threads(B, split.feature_dim))
            rates = {False: [], True: []}
            for k in range(blocks):
                for prefetch in ((False, True) if k % 2 == 0 else (True, False)):
                    order = torch.randperm(split.num_samples, generator=gen)[:block_rows]
                    start = time.perf_counter()
                    with BatchLoader(split, order, B, "cpu", prefetch=prefetch) as batches:
                        for b in batches:
                            train_step(weight, loss_fn, b.features, b.labels, b.index, 0.1)
                    rates[prefetch].append(block_rows / (time.perf_counter() - start))
            ratio = cm.median([on / off for on, off in zip(rates[True], rates[False])])
            pair_rows.append([B, threads, torch.get_num_threads(), cm.median(rates[False]), cm.median(rates[True]),
                              ratio])
            print(f"  in-process B={B} --threads {threads}: prefetch / none {ratio:.3f}", flush=True)
    torch.set_num_threads(cores)
    return halves_rows, pair_rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=36_023)
    p.add_argument("--rows", type=int, default=200_000, help="training rows")
    p.add_argument("--held", type=int, default=1_000, help="val rows")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--blocks", type=int, default=10, help="in-process: blocks per setting and prefetch mode")
    p.add_argument("--block-rows", type=int, default=40_000, help="in-process: rows per block")
    p.add_argument("--tmp", default=None)
    a = p.parse_args(argv)
    print(f"machine: {cm.machine()}")
    print(f"command: python benchmarks/prefetch.py {' '.join(sys.argv[1:])}")
    settings = [(B, threads, prefetch) for B in a.batch_sizes for threads in ("1", "auto")
                for prefetch in (False, True)]
    results = {s: [] for s in settings}
    with cm.temp_dir(base=a.tmp) as tmp:
        cm.check_disk(tmp, (a.rows + a.held) * cm.FEATURE_DIM * 2)
        data = tmp / "data"
        cm.write_split(data / "train", a.rows, a.classes, seed=0)
        cm.write_split(data / "val", a.held, a.classes, seed=1)
        halves_rows, pair_rows = in_process(data, a.classes, a.batch_sizes, ("1", "auto"), a.blocks,
                                            min(a.block_rows, a.rows))
        print(cm.table(["B", "read ms", "step ms", "read share"], halves_rows,
                       title="one thread, in-process: the batch read vs the step (medians)"))
        print(cm.table(["B", "--threads", "step threads", "none samples/s", "prefetch samples/s",
                        "prefetch / none (paired)"], pair_rows,
                       title=f"in-process BatchLoader + train_step, {a.blocks} alternating blocks of "
                             f"{min(a.block_rows, a.rows):,} rows each"))
        for rep in range(a.repeats):
            # alternate the order of each pair so neither setting always runs second
            for s in settings if rep % 2 == 0 else settings[::-1]:
                sps = train_once(data, tmp / "out", *s)
                results[s].append(sps)
                B, threads, prefetch = s
                print(f"  repeat {rep + 1} B={B:<5} --threads {threads:<4} prefetch {'on ' if prefetch else 'off'}"
                      f" {sps:>10,.0f} samples/s", flush=True)
    rows = []
    for B in a.batch_sizes:
        for threads in ("1", "auto"):
            offs, ons = results[(B, threads, False)], results[(B, threads, True)]
            paired = cm.median([on / off for on, off in zip(ons, offs)])  # each pair ran back to back
            rows.append([B, threads, cm.median(offs), cm.median(ons), cm.median(ons) / cm.median(offs), paired])
    print(f"\nxcent train, 1 epoch, {a.rows:,} rows x {cm.FEATURE_DIM} float16 (memory-mapped .npy), "
          f"{a.classes:,} classes; medians of {a.repeats}")
    print(cm.table(["B", "--threads", "no prefetch samples/s", "prefetch samples/s", "ratio of medians",
                    "median paired ratio"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
