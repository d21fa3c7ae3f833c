"""Evaluation throughput: full-softmax CE + top-1/top-5 over all classes.

    python benchmarks/evaluate.py                      # 2,048 rows x 360,232 classes
    python benchmarks/evaluate.py --rows 16384 --repeats 5

Runs ``xcent.evaluate.evaluate`` (the trainer's and ``xcent eval``'s path: chunks of a
memory-mapped float16 split -> ``full_softmax_stats``) and reports its achieved
matmul rate, ``2 n C D`` flops per second, against the machine's float32 matmul rate
measured in the same run, and against the same product as one bare GEMM per
class chunk. Peak memory above the weight is read from VmHWM (reset before each
evaluation) for two row counts, to show it is bounded by the chunk size, not n.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as cm  # noqa: E402

from xcent.data import load_split  # noqa: E402
from xcent.evaluate import evaluate  # noqa: E402


def child_memory(a) -> int:
    """Print the peak resident bytes that evaluating ``a.child_mem`` rows adds above
    the loaded split and the resident weight."""
    split = load_split(Path(a.child_dir), "val")
    weight = torch.empty(a.classes, a.dim).normal_(0.0, 0.05)
    base = cm.rss_now()["VmRSS"]
    if not cm.reset_peak_rss():
        return 1
    evaluate(split, weight, rows=torch.arange(a.child_mem))
    print(cm.rss_now()["VmHWM"] - base)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=cm.GLINT_CLASSES)
    p.add_argument("--dim", type=int, default=cm.FEATURE_DIM)
    p.add_argument("--rows", type=int, default=2048, help="rows evaluated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tmp", default=None)
    p.add_argument("--child-mem", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-dir", default=None, help=argparse.SUPPRESS)
    cm.add_common_args(p)
    a = p.parse_args(argv)
    cm.setup(a)
    if a.child_mem is not None:
        return child_memory(a)
    C, D, n = a.classes, a.dim, a.rows
    print(f"machine: {cm.machine()}")
    print(f"command: python benchmarks/evaluate.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    rate = cm.matmul_rate()
    peak = rate["peak"]
    print("float32 matmul rate: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rate["shapes"].items())
          + f" GFLOP/s; best {peak / 1e9:.1f}")

    with cm.temp_dir(base=a.tmp) as tmp:
        cm.write_split(tmp / "val", n, C, D, seed=1)
        split = load_split(tmp, "val")
        weight = torch.empty(C, D).normal_(0.0, 0.05)
        flops = 2.0 * n * C * D

        # bare GEMMs of the same product, class chunk by class chunk (no softmax work)
        x = torch.from_numpy(split.features[:n].astype("float32"))
        chunk = 32768
        out = torch.empty(n, chunk)

        def bare():
            for c0 in range(0, C, chunk):
                c1 = min(c0 + chunk, C)
                torch.mm(x, weight[c0:c1].T, out=out[:, :c1 - c0])

        bare_s = cm.median(cm.time_calls(bare, a.repeats, warmup=0)) if n * chunk <= 1 << 28 else None
        del out

        eval_s = cm.median(cm.time_calls(lambda: evaluate(split, weight), a.repeats, warmup=1))
        metrics = evaluate(split, weight)

        # peak memory above the resident weight, for n // 4 and n rows, each in a fresh
        # process (so no memory freed earlier is already counted as resident)
        mem_rows = []
        for rows in (n // 4, n):
            out = subprocess.run([sys.executable, __file__, "--child-mem", str(rows), "--child-dir", str(tmp),
                                  "--classes", str(C), "--dim", str(D)], capture_output=True, text=True)
            extra = int(out.stdout.split()[-1]) if out.returncode == 0 else None
            mem_rows.append([rows, cm.gib(extra) if extra is not None else "n/a"])

    rows = [["xcent evaluate (CE + top-1/top-5)", eval_s, flops / eval_s / 1e9, flops / eval_s / peak]]
    if bare_s is not None:
        rows.append(["bare GEMM, same product", bare_s, flops / bare_s / 1e9, flops / bare_s / peak])
    print(f"\n[5] evaluation of {n:,} rows over C = {C:,} classes, D = {D} "
          f"(loss {metrics['loss']:.3f}, top-1 {metrics['top1']:.4f})")
    print(cm.table(["what", "seconds", "GFLOP/s", "x matmul rate"], rows))
    achieved = flops / eval_s / peak
    print(f"ratio: evaluation runs at {achieved:.0%} of the measured matmul rate "
          f"(target >= 70%: {cm.verdict(achieved >= 0.70)})")
    if bare_s is not None:
        print(f"ratio: evaluation / bare GEMM time = {eval_s / bare_s:.2f}")
    print(cm.table(["rows evaluated", "peak memory above the weight"], mem_rows))
    print(f"weight: {cm.gib(C * D * 4)}; one score block: at most 256 x 8192 float32 = {cm.gib(256 * 8192 * 4)} "
          f"on the CPU, plus a 4,096-row feature chunk ({cm.gib(4096 * D * 4)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
