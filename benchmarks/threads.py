"""CPU threads: does ``xcent train``'s default thread policy survive a shared machine?

Two measurements, each on an idle machine and beside a CPU-bound background process
that this script starts and stops itself (one busy Python process per ``--load-procs``):

* ``xcent train`` end to end (one epoch): training samples/s and evaluation seconds of
  the default (``--threads auto``) against ``OMP_NUM_THREADS=1``, medians of
  ``--repeats`` runs, the conditions interleaved. The default should reach at least 80%
  of the better of the two in both conditions, and evaluation should keep using all
  cores where that is faster.
* ``--eval``: seconds of one evaluation (``xcent.evaluate.evaluate``, full softmax over
  all classes, the split memory-mapped) with ``--threads auto`` (a fresh policy each
  time, so its probe is timed too), one thread and all cores, medians of ``--repeats``,
  the modes interleaved: ``auto`` should reach at least 80% of the better of the two.
* ``--sweep``: ms per training step (``xcent.step.train_step``, scent) with one thread
  and with all threads, for B = 128 .. 2048: where more threads start to pay, which
  sets ``xcent.device.STEP_PARALLEL_FLOPS``.

    python benchmarks/threads.py                 # 36,023 classes, 200,000 rows: ~3 minutes
    python benchmarks/threads.py --full          # Glint360K shape: 360,232 classes, 400,000 rows
    python benchmarks/threads.py --eval          # evaluation: auto vs 1 thread vs all cores, ~1 minute
    python benchmarks/threads.py --sweep         # step time per batch size, 1 vs all threads

Wall-clock times (the point is how threads fare against other processes): run it on an
otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as cm  # noqa: E402

BURN = "while True:\n    pass\n"


@contextlib.contextmanager
def background_load(procs: int):
    """``procs`` CPU-bound processes for the duration of the block (none for 0)."""
    children = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(procs)]
    try:
        if children:
            time.sleep(0.5)  # let them reach the run queue
        yield
    finally:
        for child in children:
            child.kill()
        for child in children:
            child.wait()


def train_once(data: Path, out: Path, name: str, threads_env: int | None, train_eval_size: int) -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads_env:
        env["OMP_NUM_THREADS"] = str(threads_env)
    cmd = [sys.executable, "-m", "xcent", "train", "--data-dir", str(data), "--out-dir", str(out), "--name", name,
           "--epochs", "1", "--device", "cpu", "--train-eval-size", str(train_eval_size), "--overwrite", "true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-2000:])
        raise SystemExit("xcent train failed")
    last = cm.read_jsonl(out / name / f"eval_{name}.jsonl")[-1]
    return {"samples_per_second": last["samples_per_second"], "eval_seconds": last["eval_seconds"]}


def end_to_end(a) -> int:
    total = a.rows + 2 * a.held
    print(f"machine: {cm.machine()}")
    print(f"command: python benchmarks/threads.py {' '.join(sys.argv[1:])}")
    with cm.temp_dir(base=a.tmp) as tmp:
        cm.check_disk(tmp, total * cm.FEATURE_DIM * 2)
        data = tmp / "data"
        cm.write_split(data / "train", a.rows, a.classes, seed=0)
        cm.write_split(data / "val", a.held, a.classes, seed=1)
        modes = {"default (auto)": None, "OMP_NUM_THREADS=1": 1}
        results = {(cond, mode): [] for cond in ("idle", "loaded") for mode in modes}
        for rep in range(a.repeats):
            for cond, procs in (("idle", 0), ("loaded", a.load_procs)):
                with background_load(procs):
                    for mode, env_threads in modes.items():
                        r = train_once(data, tmp / "out", "t", env_threads, a.train_eval_size)
                        results[(cond, mode)].append(r)
                        print(f"  repeat {rep + 1} {cond:<6} {mode:<18} {r['samples_per_second']:>10,.0f} samples/s"
                              f"  eval {r['eval_seconds']:.2f} s", flush=True)
    rows, ratios = [], []
    for cond in ("idle", "loaded"):
        med = {mode: {k: cm.median([r[k] for r in results[(cond, mode)]]) for k in ("samples_per_second",
                                                                                    "eval_seconds")}
               for mode in modes}
        best = max(m["samples_per_second"] for m in med.values())
        for mode, m in med.items():
            rows.append([cond, mode, m["samples_per_second"], m["samples_per_second"] / best, m["eval_seconds"]])
        ratio = med["default (auto)"]["samples_per_second"] / best
        eval_ratio = med["OMP_NUM_THREADS=1"]["eval_seconds"] / med["default (auto)"]["eval_seconds"]
        ratios.append((cond, ratio, eval_ratio))
    print(f"\nxcent train, 1 epoch, {a.rows:,} rows x {cm.FEATURE_DIM} (float16), {a.classes:,} classes, B = 128; "
          f"background load: {a.load_procs} busy process(es); medians of {a.repeats}")
    print(cm.table(["machine", "threads", "train samples/s", "x best", "eval seconds"], rows))
    for cond, ratio, eval_ratio in ratios:
        print(f"ratio: {cond}: default reaches {ratio:.2f} of the better training throughput (target >= 0.80); "
              f"its evaluation is {eval_ratio:.2f}x as fast as one thread's")
    return 0


def eval_phase(a) -> int:
    import torch

    from xcent.classifier import init_weight
    from xcent.data import load_split
    from xcent.device import ThreadPolicy
    from xcent.evaluate import evaluate

    cores = torch.get_num_threads()
    print(f"machine: {cm.machine()}")
    print(f"command: python benchmarks/threads.py {' '.join(sys.argv[1:])}")
    flops = 2.0 * a.eval_rows * a.classes * cm.FEATURE_DIM
    with cm.temp_dir(base=a.tmp) as tmp:
        cm.write_split(tmp / "val", a.eval_rows, a.classes, seed=1)
        split = load_split(tmp, "val", check_features=False)
        weight = init_weight(a.classes, cm.FEATURE_DIM, 0)
        evaluate(split, weight, rows=torch.arange(min(256, a.eval_rows)))  # warm-up
        modes = ("auto", "1 thread", f"{cores} threads")
        results = {(cond, mode): [] for cond in ("idle", "loaded") for mode in modes}
        choices = {cond: [] for cond in ("idle", "loaded")}
        for cond, procs in (("idle", 0), ("loaded", a.load_procs)):
            with background_load(procs):
                for rep in range(a.repeats):
                    for mode in modes[rep % 3:] + modes[:rep % 3]:  # rotated: no mode always follows another
                        policy = ThreadPolicy("auto")
                        start = time.perf_counter()
                        if mode == "auto":
                            with policy.evaluation(cm.FEATURE_DIM, flops) as threads:
                                evaluate(split, weight)
                            choices[cond].append(threads)
                        else:
                            with ThreadPolicy.use(1 if mode == "1 thread" else cores):
                                evaluate(split, weight)
                        seconds = time.perf_counter() - start
                        results[(cond, mode)].append(seconds)
                        print(f"  {cond:<6} repeat {rep + 1} {mode:<10} {seconds:6.2f} s"
                              + (f"  (chose {threads})" if mode == "auto" else ""), flush=True)
    rows, verdicts = [], []
    for cond in ("idle", "loaded"):
        med = {mode: cm.median(results[(cond, mode)]) for mode in modes}
        best = min(med[modes[1]], med[modes[2]])
        for mode in modes:
            rows.append([cond, mode, med[mode], best / med[mode],
                         ", ".join(map(str, choices[cond])) if mode == "auto" else ""])
        verdicts.append((cond, best / med["auto"]))
    print(f"\nevaluation of {a.eval_rows:,} rows x {cm.FEATURE_DIM} (float16, memory-mapped) over {a.classes:,} "
          f"classes; background load: {a.load_procs} busy process(es); medians of {a.repeats}")
    print(cm.table(["machine", "threads", "eval seconds", "x best (speed)", "auto chose"], rows))
    for cond, ratio in verdicts:
        print(f"ratio: {cond}: auto reaches {ratio:.2f} of the better of 1 thread and {cores} threads "
              f"(target >= 0.80)")
    return 0


def sweep(a) -> int:
    import torch

    from xcent.classifier import init_weight
    from xcent.losses import build
    from xcent.step import train_step

    cm.setup(a)
    cores = torch.get_num_threads()
    print(f"machine: {cm.machine()}")
    rows = []
    for cond, procs in (("idle", 0), ("loaded", a.load_procs)):
        with background_load(procs):
            for B in (128, 256, 512, 1024, 2048):
                gen = torch.Generator().manual_seed(B)
                weight = init_weight(a.classes, cm.FEATURE_DIM, 0)
                loss_fn = build("scent", 1 << 20)
                times = {}
                for threads in (1, cores):
                    torch.set_num_threads(threads)

                    def one(B=B, gen=gen, weight=weight, loss_fn=loss_fn):
                        x = torch.randn(B, cm.FEATURE_DIM, generator=gen)
                        y = torch.randint(0, a.classes, (B,), generator=gen)
                        idx = torch.randint(0, 1 << 20, (B,), generator=gen)
                        train_step(weight, loss_fn, x, y, idx, 0.1)

                    times[threads] = cm.median(cm.time_calls(one, a.steps, warmup=3))
                torch.set_num_threads(cores)
                rows.append([cond, B, f"{4 * B * B * cm.FEATURE_DIM / 1e9:.2f}", times[1] * 1e3, times[cores] * 1e3,
                             times[1] / times[cores]])
                print(f"  {cond} B={B}: 1 thread {times[1] * 1e3:.2f} ms, {cores} threads {times[cores] * 1e3:.2f} ms",
                      flush=True)
    print(cm.table(["machine", "B", "GFLOP/step", "1 thread ms", f"{cores} threads ms", "speed-up"], rows))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=36_023)
    p.add_argument("--rows", type=int, default=200_000, help="training rows")
    p.add_argument("--held", type=int, default=1_000, help="val rows")
    p.add_argument("--train-eval-size", type=int, default=1_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--load-procs", type=int, default=1, help="busy background processes in the loaded condition")
    p.add_argument("--full", action="store_true", help="360,232 classes, 400,000 training rows")
    p.add_argument("--sweep", action="store_true", help="step time per batch size, 1 vs all threads")
    p.add_argument("--eval", action="store_true", help="evaluation seconds: auto vs 1 thread vs all cores")
    p.add_argument("--eval-rows", type=int, default=4_000, help="--eval: rows evaluated")
    p.add_argument("--steps", type=int, default=50, help="--sweep: timed steps per point")
    p.add_argument("--tmp", default=None)
    cm.add_common_args(p)
    a = p.parse_args(argv)
    if a.full:
        a.classes, a.rows = cm.GLINT_CLASSES, 400_000
    return sweep(a) if a.sweep else eval_phase(a) if a.eval else end_to_end(a)


if __name__ == "__main__":
    raise SystemExit(main())
