"""One device check: the test suite on the device, the training step, evaluation, one
end-to-end epoch and (with two GPUs) a 2-process nccl run; one table, also as JSON.

    bash benchmarks/device_check.sh OUT_DIR      # the entry point (this script does the work)

On a CUDA machine (sizes of the GPU targets): the whole test suite with the
device-parametrized tests on cpu and cuda; ``xcent.step.train_step`` for the six
algorithms at C = 360,232, D = 512, B = 128 and 1,024, fp32 and bf16, against the two
GEMMs' floor at the measured matmul rate; full-softmax evaluation of 100,000 rows over
360,232 classes; ``xcent train --epochs 1`` on 2,000,000 synthetic Glint-shape rows
(float16 features in host memory); ``torchrun --nproc-per-node 2`` when two GPUs exist.
On a CPU-only machine the same parts run at small size (under 3 minutes on 2 cores:
C = 36,023, 5 timed steps per point, an epoch of 50,000 rows with 1,000-row
evaluations) so that the command itself is tested where there is no GPU; ``--quick``
(tests/test_device_check.py) shrinks every part further, to seconds.

Every CUDA timing synchronises the device before reading the clock; step times are
the wall time of a run of consecutive steps divided by their number (what training
sees: the host queues the next step while the device runs this one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as cm  # noqa: E402

from xcent.classifier import init_weight  # noqa: E402
from xcent.data import load_split  # noqa: E402
from xcent.device import ThreadPolicy  # noqa: E402
from xcent.evaluate import evaluate  # noqa: E402
from xcent.losses import ALGORITHMS, DEFAULTS, build  # noqa: E402
from xcent.step import StepMonitor, train_step  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    """Wall seconds of ``repeats`` calls of ``fn`` (device synchronised around them)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return time.perf_counter() - start


def matmul_rate(device: torch.device, dtype: torch.dtype, sides=(1024, 2048)) -> float:
    """Best flop/s of square GEMMs in ``dtype`` (TF32 off: the float32 rate is true float32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    best = 0.0
    for n in sides:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        timed(lambda a=a, b=b: a @ b, device, 2)
        reps = 10 if device.type == "cuda" else 2
        best = max(best, 2.0 * n**3 * reps / timed(lambda a=a, b=b: a @ b, device, reps))
    return best


def supports_precision() -> bool:
    import inspect

    return "precision" in inspect.signature(train_step).parameters


def step_rows(device, split, sizes, precisions, rates) -> list[dict]:
    rows = []
    host = split.features  # float16, in host memory (pinned on CUDA: what the trainer gathers into)
    labels = split.labels
    for precision in precisions:
        for B in sizes["batches"]:
            for name in ALGORITHMS:
                weight = init_weight(sizes["classes"], cm.FEATURE_DIM, 0, device=device)
                loss_fn = build(name, split.num_samples, epochs=50).to(device)
                loss_fn.set_epoch(2)
                gen = torch.Generator().manual_seed(B)
                order = torch.randperm(split.num_samples, generator=gen)
                batches = [order[i * B:(i + 1) * B].sort().values for i in range(len(order) // B)]
                lr = DEFAULTS[name]["lr"] * 1e-3
                kw = {"precision": precision} if precision != "fp32" else {}
                ks = []

                monitor = StepMonitor(100, device)  # as xcent train: one health read per 100 steps

                def step(i, batches=batches, weight=weight, loss_fn=loss_fn, lr=lr, kw=kw, ks=ks, monitor=monitor):
                    index = batches[i % len(batches)]
                    feats = host.index_select(0, index).to(device, non_blocking=True)
                    # labels and index stay on the host: the step reads nothing from the device
                    result = train_step(weight, loss_fn, feats, labels.index_select(0, index), index, lr,
                                        check_finite=False, **kw)
                    if not result.skipped:
                        monitor.record(result.health, i)
                    if monitor.due:
                        monitor.check()
                    ks.append(result.num_distinct)

                steps = sizes["steps"]
                counter = iter(range(5, 5 + steps))
                with ThreadPolicy.use(ThreadPolicy().step_threads(B, cm.FEATURE_DIM)):  # as xcent train does
                    for i in range(5):
                        step(i)
                    seconds = timed(lambda step=step, counter=counter: step(next(counter)), device, steps) / steps
                K = sum(ks) / len(ks)
                floor = 4.0 * B * K * cm.FEATURE_DIM / rates["bf16" if precision == "bf16" else "fp32"]
                rows.append({"part": "train step", "algorithm": name, "batch_size": B, "precision": precision,
                             "ms_per_step": seconds * 1e3, "samples_per_second": B / seconds,
                             "x_floor": seconds / floor})
                print(f"  step {name:<8} B={B:<5} {precision}: {seconds * 1e3:8.3f} ms  {B / seconds:12,.0f} "
                      f"samples/s  {seconds / floor:6.2f} x floor", flush=True)
    return rows


def eval_rows(device, split, sizes, rates) -> list[dict]:
    weight = init_weight(sizes["classes"], cm.FEATURE_DIM, 0, device=device)
    rows_n = min(sizes["eval_rows"], split.num_samples)
    index = torch.arange(rows_n)
    flops = 2.0 * rows_n * sizes["classes"] * cm.FEATURE_DIM
    with ThreadPolicy(device=device).evaluation(cm.FEATURE_DIM, flops):
        evaluate(split, weight, rows=index[:1024])  # warm-up
        seconds = timed(lambda: evaluate(split, weight, rows=index), device)
    print(f"  evaluation of {rows_n:,} rows x {sizes['classes']:,} classes: {seconds:.2f} s", flush=True)
    return [{"part": "evaluation", "rows": rows_n, "classes": sizes["classes"], "seconds": seconds,
             "x_matmul_rate": flops / seconds / rates["fp32"]}]


def run(cmd: list[str], env=None, timeout=None) -> subprocess.CompletedProcess:
    print("  $ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT, check=False)


def e2e_rows(device, data: Path, out: Path, sizes) -> list[dict]:
    rows = []
    args = ["--data-dir", str(data), "--out-dir", str(out), "--epochs", "1", "--device", device.type,
            "--train-eval-size", str(sizes["train_eval_size"])]
    proc = run([sys.executable, "-m", "xcent", "train", *args, "--name", "e2e"])
    rec = _last_record(proc, out / "e2e" / "eval_e2e.jsonl")
    rows.append({"part": "xcent train, 1 epoch", "rows": sizes["e2e_rows"], "processes": 1, **rec})
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "xcent", "train",
                    *args, "--name", "e2e_nccl"])
        rec = _last_record(proc, out / "e2e_nccl" / "eval_e2e_nccl.jsonl")
        rows.append({"part": "xcent train, 1 epoch, nccl", "rows": sizes["e2e_rows"], "processes": 2, **rec})
    return rows


def _last_record(proc, path: Path) -> dict:
    if proc.returncode != 0:
        print(proc.stdout[-1500:], proc.stderr[-1500:])
        return {"error": f"exit {proc.returncode}"}
    last = cm.read_jsonl(path)[-1]
    print(f"  -> {last['samples_per_second']:,.0f} samples/s, epoch {last['epoch_seconds']:.1f} s, "
          f"evaluation {last['eval_seconds']:.1f} s", flush=True)
    return {k: last[k] for k in ("samples_per_second", "epoch_seconds", "eval_seconds", "val_loss")}


def tests_row(device) -> dict:
    env = dict(os.environ)
    if device.type == "cuda":
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "tests"]
    else:  # CI runs the whole suite on the CPU; here only the device-parametrized tests
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "device", "tests"]
    proc = run(cmd, env=env)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"  {summary}", flush=True)
    return {"part": "tests", "command": " ".join(cmd[2:]), "exit_code": proc.returncode, "summary": summary}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="folder for device_check.json (created)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cuda or cpu")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--quick", action="store_true", help="every part at the smallest size (CPU; for tests)")
    a = p.parse_args(argv)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    gpu = device.type == "cuda"
    # the GPU sizes are the targets; the CPU sizes keep the whole command under 3
    # minutes on a shared 2-core machine (the epoch's evaluations dominate it there)
    sizes = ({"classes": cm.GLINT_CLASSES, "batches": (128, 1024), "steps": 300, "eval_rows": 100_000,
              "e2e_rows": 2_000_000, "split_rows": 2_000_000, "val_rows": 10_000, "train_eval_size": 10_000,
              "matmul_sides": (4096, 8192)}
             if gpu else
             {"classes": 36_023, "batches": (128, 1024), "steps": 5, "eval_rows": 2_048,
              "e2e_rows": 50_000, "split_rows": 50_000, "val_rows": 1_000, "train_eval_size": 1_000,
              "matmul_sides": (1024, 2048)})
    if a.quick:
        sizes.update(classes=2_000, batches=(128,), steps=2, eval_rows=256, e2e_rows=4_000, split_rows=4_000,
                     val_rows=200, train_eval_size=200, matmul_sides=(256,))
    precisions = ("fp32", "bf16") if supports_precision() else ("fp32",)
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"device check on {name}; machine: {cm.machine()}", flush=True)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": name, "machine": cm.machine(), "torch": torch.__version__, "sizes": sizes, "rows": []}
    start = time.perf_counter()
    if not a.skip_tests:
        report["rows"].append(tests_row(device))
    rates = {"fp32": matmul_rate(device, torch.float32, sizes["matmul_sides"])}
    rates["bf16"] = (matmul_rate(device, torch.bfloat16, sizes["matmul_sides"]) if "bf16" in precisions
                     else rates["fp32"])
    report["matmul_gflops"] = {k: v / 1e9 for k, v in rates.items()}
    print("  matmul rate: " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in rates.items()), flush=True)
    with cm.temp_dir() as tmp:
        data = tmp / "data"
        cm.write_split(data / "train", sizes["split_rows"], sizes["classes"], seed=0)
        cm.write_split(data / "val", sizes["val_rows"], sizes["classes"], seed=1)
        train = load_split(data, "train", check_features=False)
        train.features = torch.from_numpy(train.features[:].copy())  # host memory, as the target
        if gpu:  # pinned, for asynchronous copies
            train.features = train.features.pin_memory()
        report["rows"] += step_rows(device, train, sizes, precisions, rates)
        report["rows"] += eval_rows(device, train, sizes, rates)
        del train
        report["rows"] += e2e_rows(device, data, tmp / "out", sizes)
    report["seconds"] = time.perf_counter() - start
    print_table(report)
    path = out / "device_check.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path} ({report['seconds']:.0f} s)")
    return 0


def print_table(report: dict) -> None:
    rows = []
    for r in report["rows"]:
        if r["part"] == "train step":
            what = f"{r['algorithm']} B={r['batch_size']} {r['precision']}"
            rows.append([r["part"], what, f"{r['samples_per_second']:,.0f} samples/s",
                         f"{r['ms_per_step']:.3f} ms, {r['x_floor']:.2f}x floor"])
        elif r["part"] == "evaluation":
            rows.append([r["part"], f"{r['rows']:,} rows x {r['classes']:,} classes", f"{r['seconds']:.2f} s",
                         f"{r['x_matmul_rate']:.2f} x matmul rate"])
        elif r["part"] == "tests":
            rows.append([r["part"], r["command"], r["summary"], f"exit {r['exit_code']}"])
        elif "error" in r:
            rows.append([r["part"], f"{r['rows']:,} rows", r["error"], ""])
        else:
            rows.append([r["part"], f"{r['rows']:,} rows, {r['processes']} process(es)",
                         f"{r['samples_per_second']:,.0f} samples/s",
                         f"epoch {r['epoch_seconds']:.1f} s, evaluation {r['eval_seconds']:.1f} s"])
    print(cm.table(["part", "what", "result", "detail"], rows, title=f"\ndevice check: {report['device']}"))


if __name__ == "__main__":
    raise SystemExit(main())
