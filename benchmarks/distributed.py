"""Class-sharded training step: samples/s for P processes and bytes communicated per step.

    python benchmarks/distributed.py                       # C=36,023, D=512, B=128, P=1,2
    python benchmarks/distributed.py --num-classes 360232 --procs 1,2,4 --steps 200

Each configuration runs the real step of ``xcent train`` under torch.distributed (gloo
on CPU, spawned processes on this machine) on a memory-mapped synthetic split; the
single-process step without torch.distributed is measured in the same run as the
baseline. Bytes per step are counted by wrapping the collectives (what each rank
sends into all_gather / all_reduce), and printed beside the formula
``ceil(B/P)*D*4 (features) + B*K*4 (scores) + 4`` for several B, D.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as cm  # noqa: E402

from xcent.classifier import init_weight  # noqa: E402
from xcent.data import load_split  # noqa: E402
from xcent.losses import build  # noqa: E402
from xcent.step import train_step  # noqa: E402


class ByteCounter:
    """Wraps the collectives used by the step and counts the bytes this rank sends."""

    def __init__(self):
        self.bytes = 0
        self._orig = (dist.all_gather, dist.all_reduce)

        def all_gather(tensor_list, tensor, *a, **k):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._orig[0](tensor_list, tensor, *a, **k)

        def all_reduce(tensor, *a, **k):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._orig[1](tensor, *a, **k)

        dist.all_gather, dist.all_reduce = all_gather, all_reduce


def _worker(rank, world, port, args, data_dir, result_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, args.threads // world))
    from xcent import distributed as xd

    ctx = xd.init_from_env(torch.device("cpu"), 300)
    counter = ByteCounter()
    split = load_split(Path(data_dir), "train", check_features=False)
    lo, hi = xd.class_range(args.num_classes, rank, world)
    shard = init_weight(args.num_classes, args.feature_dim, 0, rows=(lo, hi))
    loss_fn = build("scent", split.num_samples)
    gen = torch.Generator().manual_seed(1)
    times = []
    for step in range(args.warmup + args.steps):
        index = torch.randint(0, split.num_samples, (args.batch_size,), generator=gen).unique()
        dist.barrier()
        t = time.perf_counter()
        feats = xd.gather_batch_rows(split, index, ctx, torch.float32)
        labels = split.labels.index_select(0, index)
        if step == args.warmup:
            counter.bytes = 0
        train_step(shard, loss_fn, feats, labels, index, 0.1, lo=lo, process_group=ctx.group)
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    if rank == 0:
        per_step = counter.bytes / args.steps
        Path(result_file).write_text(f"{statistics.median(times)} {per_step}")
    xd.shutdown()


def single_process(args, data_dir) -> float:
    torch.set_num_threads(args.threads)
    split = load_split(Path(data_dir), "train", check_features=False)
    weight = init_weight(args.num_classes, args.feature_dim, 0)
    loss_fn = build("scent", split.num_samples)
    gen = torch.Generator().manual_seed(1)
    times = []
    for step in range(args.warmup + args.steps):
        index = torch.randint(0, split.num_samples, (args.batch_size,), generator=gen).unique()
        t = time.perf_counter()
        feats, labels = split.gather(index)
        train_step(weight, loss_fn, feats, labels, index, 0.1)
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-classes", type=int, default=36_023)
    p.add_argument("--feature-dim", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--procs", type=str, default="1,2")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads shared by all processes")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        cm.write_split(data_dir / "train", args.rows, args.num_classes, args.feature_dim)
        base = single_process(args, data_dir)
        print(f"C={args.num_classes} D={args.feature_dim} B={args.batch_size} on {os.cpu_count()} cores, "
              f"median of {args.steps} steps")
        print(f"{'setup':<28}{'ms/step':>9}{'samples/s':>11}{'vs 1 proc':>10}{'bytes sent/step/rank':>22}")
        print(f"{'1 process, no dist':<28}{base * 1e3:>9.2f}{args.batch_size / base:>11.0f}{1.0:>10.2f}{0:>22}")
        for world in [int(x) for x in args.procs.split(",")]:
            result = Path(tmp) / f"result_{world}"
            port = 29600 + os.getpid() % 500 + world
            mp.spawn(_worker, args=(world, port, args, str(data_dir), str(result)), nprocs=world, join=True)
            t, sent = map(float, result.read_text().split())
            print(f"{f'{world} process(es), gloo':<28}{t * 1e3:>9.2f}{args.batch_size / t:>11.0f}"
                  f"{base / t:>10.2f}{sent:>22.0f}")
    print("\nbytes each rank sends per step = ceil(B/P)*D*4 (its feature rows) + B*K*4 (scores) + 4 (flag),")
    print("independent of C; K <= B distinct labels (K = B is the worst case shown):")
    print(f"{'P':>4}{'B':>6}{'D':>6}{'K':>6}{'bytes':>14}")
    for P in (2, 8):
        for B in (128, 1024, 4096):
            for D in (512, 768):
                print(f"{P:>4}{B:>6}{D:>6}{B:>6}{-(-B // P) * D * 4 + B * B * 4 + 4:>14}")


if __name__ == "__main__":
    main()
