"""Training-step throughput at Glint360K shape, against the seed's dense formulation.

    python benchmarks/train_step.py                 # defaults: a few minutes on 2 cores
    python benchmarks/train_step.py --full          # longer repeats, sweep to 4096
    python benchmarks/train_step.py --compile step  # torch.compile vs eager only (needs a C++ compiler)

Measures, in one run and on one machine state:

1. samples/s of the real per-step work of ``xcent train`` (sorted batch of row ids ->
   ``Split.gather`` from a memory-mapped float16 split -> ``train_step`` -> the
   surrogate summed on the device, the step's health read every 100 steps) for each
   algorithm, beside the dense formulation (``nn.Linear`` weight, autograd to a dense
   (C, D) gradient, ``torch.optim.SGD`` over all rows), with and without the
   reference implementation's per-step full-softmax train loss;
2. the FLOP floor of a step, ``4 B K D`` flops at this machine's measured float32
   matmul rate, and the step time in units of it, at B = 128 and 1024;
3. step time at C = 36,023 / 360,232 / 3,602,320 (the last weight alone 7.4 GB);
4. samples/s across batch sizes;
5. with ``--compile step|dual`` (and nothing else): ``torch.compile`` (inductor, dynamic
   shapes: K differs from batch to batch) of the whole step or of the dual update alone
   (``loss_fn.weights``: the (B, K) arithmetic) against the eager step in the same run,
   with the wall seconds of the first (compiling) call and the graphs compiled while
   warming up and while timed (recompiles). One target per process: dynamo caches
   compiled frames per code object, so a second target would reuse the first's.

Every time is the median over all timed steps (steps interleaved across algorithms in
rounds, so load from other processes hits every variant alike).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as cm  # noqa: E402

from xcent.classifier import init_weight  # noqa: E402
from xcent.data import load_split  # noqa: E402
from xcent.losses import ALGORITHMS, DEFAULTS, build  # noqa: E402
from xcent.step import StepMonitor, train_step  # noqa: E402


class Batches:
    """Sorted row ids of consecutive slices of one shuffled order (as the trainer)."""

    def __init__(self, num_rows: int, batch_size: int, seed: int = 0):
        self.order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
        self.B, self.pos = batch_size, 0

    def next(self) -> torch.Tensor:
        if self.pos + self.B > len(self.order):
            self.pos = 0
        index = self.order[self.pos:self.pos + self.B].sort().values
        self.pos += self.B
        return index


#: "revisit": every dual already set, epoch 2 of 50 (the steady state, 49 epochs of 50);
#: "first": every row on its first visit (epoch 1). Set by --visits.
VISITS = "revisit"


def sparse_runner(split, weight, name: str, batch_size: int, seed: int = 0, step_fn=None):
    """One call = one step of ``xcent train``'s loop (CPU: ``.to(device)`` is a no-op).
    ``step_fn``: called instead of ``train_step`` (a compiled variant)."""
    step_fn = step_fn or train_step
    loss_fn = build(name, split.num_samples, epochs=50)
    loss_fn.set_epoch(1)
    if VISITS == "revisit" and name != "bsgd":
        loss_fn.nu.fill_(0.0)  # log s at the initial weight (logits ~ 0)
        loss_fn.nu_set.fill_(True)
        loss_fn.set_epoch(2)
    batches = Batches(split.num_samples, batch_size, seed)
    lr = DEFAULTS[name]["lr"] * 1e-3  # small: keep the weight sane over many timed steps
    ks = []
    monitor = StepMonitor(100, weight.device)
    surrogate_sum = torch.zeros((), dtype=torch.float64, device=weight.device)

    def step():
        index = batches.next()
        feats, labels = split.gather(index)
        result = step_fn(weight, loss_fn, feats, labels, index, lr, check_finite=False)
        if not result.skipped:  # as the trainer: the loss summed on the device, health read every 100 steps
            surrogate_sum.add_(result.loss)
            monitor.record(result.health, 0)
        if monitor.due:
            monitor.check()
        ks.append(result.num_distinct)

    return step, ks


def dense_runner(split, num_classes: int, name: str, batch_size: int, full_ce: bool, seed: int = 0):
    """The seed's formulation: (B, C) scores, in-batch logits by indexing, autograd to a
    dense (C, D) gradient, SGD over all rows; optionally the per-step full CE train loss
    (computed from the same scores, the cheapest honest form)."""
    linear = torch.nn.Linear(split.feature_dim, num_classes, bias=False)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.01)
    opt = torch.optim.SGD(linear.parameters(), lr=DEFAULTS[name]["lr"] * 1e-3)
    loss_fn = build(name, split.num_samples, epochs=50)
    loss_fn.set_epoch(1)
    batches = Batches(split.num_samples, batch_size, seed)

    def step():
        index = batches.next()
        feats, labels = split.gather(index)
        x = feats.float()
        opt.zero_grad()
        scores = linear(x)
        if full_ce:
            float(F.cross_entropy(scores.detach(), labels))
        classes = torch.unique(labels)
        z = scores[:, classes] - scores[torch.arange(len(labels)), labels][:, None]
        z = z.masked_fill(classes[None, :] == labels[:, None], float("-inf"))
        loss = loss_fn(z, index)
        loss.backward()
        opt.step()
        float(loss.detach())

    return step, linear


def run_rounds(runners: dict, steps: int, repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Per-step seconds of each runner, interleaved in ``repeats`` rounds of ``steps``."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in runners}
    for _ in range(repeats):
        for k, fn in runners.items():
            for _ in range(steps):
                t = cm.clock()
                fn()
                times[k].append(cm.clock() - t)
    return times


def compiled_step(target: str):
    """A ``train_step`` whose ``target`` is compiled: ``step`` (the whole step; dynamo
    breaks the graph at ``torch.unique``, whose output shape depends on the data, and at
    the few host reads) or ``dual`` (each algorithm's ``weights``: dual update and G)."""
    if target == "step":
        return torch.compile(train_step, dynamic=True)

    def step(weight, loss_fn, *args, **kwargs):
        if "weights" not in vars(loss_fn):  # once per loss: the compiled bound method shadows the class's
            loss_fn.weights = torch.compile(loss_fn.weights, dynamic=True)
        return train_step(weight, loss_fn, *args, **kwargs)

    return step


def graphs_compiled() -> int:
    import torch._dynamo

    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def compile_section(a, split, weight, algos) -> None:
    import shutil
    import time

    cxx = shutil.which("c++") or shutil.which("g++") or "none"
    print(f"\n[5] torch.compile (inductor, dynamic=True) of the {a.compile} vs eager, C = {weight.shape[0]:,}; "
          f"C++ compiler: {cxx}")
    rows = []
    for B in [int(b) for b in a.compile_batches.split(",") if b]:
        epoch = max(1, split.num_samples // B)
        for name in algos:
            runners, firsts, graphs = {}, {}, {}
            for target in ("eager", a.compile):
                fn, _ = sparse_runner(split, weight, name, B, seed=B,
                                      step_fn=None if target == "eager" else compiled_step(target))
                before = graphs_compiled()
                t0 = time.perf_counter()
                fn()
                firsts[target] = time.perf_counter() - t0
                for _ in range(a.compile_warmup):  # K differs per batch: the first few recompile
                    fn()
                graphs[target] = [graphs_compiled() - before]
                runners[target] = fn
            steps = min(a.steps * 128 // B, max(1, epoch // a.repeats))
            times = {t: [] for t in runners}
            for _ in range(a.repeats):  # interleaved rounds; graphs compiled during them are recompiles
                for t, fn in runners.items():
                    before = graphs_compiled()
                    times[t] += run_rounds({t: fn}, steps, 1, warmup=0)[t]
                    graphs[t].append(graphs_compiled() - before)
            eager = cm.median(times["eager"])
            for t in ("eager", a.compile):
                med = cm.median(times[t])
                rows.append([name, B, t, med * 1e3, eager / med, firsts[t], graphs[t][0], sum(graphs[t][1:]),
                             steps * a.repeats])
                print(f"  {name} B={B} {t}: {med * 1e3:.3f} ms/step (eager {eager * 1e3:.3f}), first call "
                      f"{firsts[t]:.1f} s, graphs {graphs[t][0]} + {sum(graphs[t][1:])}", flush=True)
    print(cm.table(["algorithm", "B", "compiled", "ms/step", "speed-up vs eager", "first call s (wall)",
                    "graphs (first + warm-up)", "graphs while timed", "steps timed"], rows))


def floor_seconds(B: float, K: float, D: int, rate: float) -> float:
    return 4.0 * B * K * D / rate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=cm.GLINT_CLASSES)
    p.add_argument("--dim", type=int, default=cm.FEATURE_DIM)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rows", type=int, default=1 << 18, help="rows of the memory-mapped float16 train split")
    p.add_argument("--steps", type=int, default=40, help="timed steps per algorithm per round")
    p.add_argument("--repeats", type=int, default=5, help="rounds")
    p.add_argument("--dense-steps", type=int, default=3, help="timed dense steps per variant")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
    p.add_argument("--floor-batches", default="128,1024")
    p.add_argument("--scaling-classes", default="36023,360232,3602320", help="'' to skip")
    p.add_argument("--sweep", default="128,256,512,1024,2048,4096", help="'' to skip")
    p.add_argument("--sweep-seconds", type=float, default=4.0, help="time budget per batch size")
    p.add_argument("--full", action="store_true", help="more repeats")
    p.add_argument("--visits", choices=("revisit", "first"), default="revisit",
                   help="revisit: duals already set, epoch 2 (the steady state); first: epoch-1 first visits")
    p.add_argument("--compile", choices=("step", "dual"), default=None,
                   help="only [5]: torch.compile of the whole step or of the dual update vs eager")
    p.add_argument("--compile-batches", default="128,1024", help="--compile: batch sizes")
    p.add_argument("--compile-warmup", type=int, default=20, help="--compile: untimed steps after the first")
    p.add_argument("--tmp", default=None, help="directory for the temporary split (default: $TMPDIR)")
    cm.add_common_args(p)
    a = p.parse_args(argv)
    cm.setup(a)
    if a.full:
        a.steps, a.repeats, a.dense_steps, a.sweep_seconds = 100, 7, 5, 10.0
    global VISITS
    VISITS = a.visits
    algos = [s for s in a.algorithms.split(",") if s]
    D = a.dim
    print(f"machine: {cm.machine()}")
    print(f"command: python benchmarks/train_step.py {' '.join(argv if argv is not None else sys.argv[1:])}")

    rate = cm.matmul_rate()
    print("float32 matmul rate: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rate["shapes"].items())
          + f" GFLOP/s; floor uses the best, {rate['peak'] / 1e9:.1f} GFLOP/s")
    peak = rate["peak"]

    with cm.temp_dir(base=a.tmp) as tmp:
        cm.check_disk(tmp, a.rows * D * 2)
        cm.write_split(tmp / "train", a.rows, a.classes, D)
        split = load_split(tmp, "train")
        C = a.classes
        weight = init_weight(C, D, seed=0)
        if a.compile:
            compile_section(a, split, weight, algos)
            return 0

        # 1. the six algorithms vs the dense baseline --------------------------------
        print(f"\n[1] training step, C = {C:,}, D = {D}, B = {a.batch_size}, "
              f"{a.rows:,}-row float16 memory-mapped split, duals: {a.visits} visits")
        runners, ks = {}, {}
        for name in algos:
            runners[name], ks[name] = sparse_runner(split, weight, name, a.batch_size)
        sparse = run_rounds(runners, a.steps, a.repeats)
        dense_times = {}
        for full_ce in (False, True):
            fn, linear = dense_runner(split, C, "scent", a.batch_size, full_ce)
            dense_times[full_ce] = run_rounds({"d": fn}, a.dense_steps, 1, warmup=1)["d"]
            del fn, linear
        dense_s = {k: cm.median(v) for k, v in dense_times.items()}
        rows = []
        step_ratio = {}
        for name in algos:
            t = cm.median(sparse[name])
            K = sum(ks[name]) / len(ks[name])
            fl = floor_seconds(a.batch_size, K, D, peak)
            step_ratio[name] = t / fl
            rows.append([name, a.batch_size / t, t * 1e3, K, dense_s[True] / t, dense_s[False] / t, t / fl])
        for full_ce in (True, False):
            t = dense_s[full_ce]
            rows.append([f"dense (seed){' + full CE' if full_ce else ''}", a.batch_size / t, t * 1e3, "-",
                         dense_s[True] / t, dense_s[False] / t, "-"])
        print(cm.table(["algorithm", "samples/s", "ms/step", "mean K", "x dense+CE", "x dense", "x floor"], rows))
        worst_ce = min(dense_s[True] / cm.median(sparse[n]) for n in algos)
        worst = min(dense_s[False] / cm.median(sparse[n]) for n in algos)
        print(f"ratio: slowest algorithm vs dense with per-step full CE = {worst_ce:,.0f}x "
              f"(target >= 500x: {cm.verdict(worst_ce >= 500)})")
        print(
            f"ratio: slowest algorithm vs dense without it = {worst:,.0f}x (target >= 250x: {cm.verdict(worst >= 250)})"
        )
        print(f"dense steps timed: {a.dense_steps} per variant (median), sparse: {a.steps * a.repeats} per algorithm")

        # 2. distance to the floor ---------------------------------------------------------
        print(f"\n[2] step time / FLOP floor (4 B K D flops at {peak / 1e9:.1f} GFLOP/s)")
        rows = []
        floors = {}
        for B in [int(b) for b in a.floor_batches.split(",") if b]:
            runners, ks = {}, {}
            for name in algos:
                runners[name], ks[name] = sparse_runner(split, weight, name, B, seed=B)
            steps = max(3, a.steps * 128 // B)
            times = run_rounds(runners, steps, a.repeats, warmup=2)
            K = sum(sum(v) / len(v) for v in ks.values()) / len(ks)
            fl = floor_seconds(B, K, D, peak)
            mm_rate = cm.step_shape_rate(B, round(K), D)
            floors[B] = []
            for name in algos:
                t = cm.median(times[name])
                floors[B].append(t / fl)
                rows.append([B, name, t * 1e3, fl * 1e3, t / fl, floor_seconds(B, K, D, mm_rate) * 1e3])
        print(cm.table(["B", "algorithm", "ms/step", "floor ms", "x floor", "the 2 matmuls alone, ms"], rows))
        for B, target in ((128, 3.0), (1024, 1.5)):
            if B in floors:
                print(f"ratio: B = {B}: worst algorithm at {max(floors[B]):.2f}x the floor, best "
                      f"{min(floors[B]):.2f}x (target <= {target}x: {cm.verdict(max(floors[B]) <= target)})")
        del weight

        # 3. cost independent of C ------------------------------------------------------------
        scaling = [int(c) for c in a.scaling_classes.split(",") if c]
        if scaling:
            print(f"\n[3] step time vs number of classes (scent, B = {a.batch_size})")
            # all weights resident at once and the steps interleaved in rounds, so that
            # load from other processes cannot masquerade as a C effect
            runners = {}
            for C2 in scaling:
                labels = torch.randint(0, C2, (split.num_samples,), generator=torch.Generator().manual_seed(C2))
                s2 = dataclasses.replace(split, labels=labels)
                runners[C2], _ = sparse_runner(s2, init_weight(C2, D, seed=0), "scent", a.batch_size)
            times = run_rounds(runners, a.steps, a.repeats)
            del runners
            rows, medians = [], {}
            for C2 in scaling:
                t = medians[C2] = cm.median(times[C2])
                rows.append([f"{C2:,}", f"{C2 * D * 4 / 1e9:.2f} GB", t * 1e3, a.batch_size / t])
            print(cm.table(["classes", "weight", "ms/step", "samples/s"], rows))
            spread = max(medians.values()) / min(medians.values())
            print(f"ratio: max/min step time over C = {spread:.2f} (target <= 1.3: {cm.verdict(spread <= 1.3)})")

        # 4. batch-size sweep -----------------------------------------------------------------
        sweep = [int(b) for b in a.sweep.split(",") if b]
        if sweep:
            C = a.classes
            weight = init_weight(C, D, seed=0)
            print(f"\n[4] batch-size sweep (scent, C = {C:,})")
            rows = []
            for B in sweep:
                fn, kB = sparse_runner(split, weight, "scent", B, seed=B)
                t0 = cm.clock()
                fn()
                first = cm.clock() - t0
                steps = max(3, min(200, int(a.sweep_seconds / max(first, 1e-4))))
                t = cm.median(run_rounds({"s": fn}, steps, 1, warmup=1)["s"])
                K = sum(kB) / len(kB)
                rows.append([B, B / t, t * 1e3, K, t / floor_seconds(B, K, D, peak), steps])
            print(cm.table(["B", "samples/s", "ms/step", "mean K", "x floor", "steps timed"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
