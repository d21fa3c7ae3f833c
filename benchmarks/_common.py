"""Shared helpers for the benchmarks: timing, the machine's matmul rate, synthetic
memory-mapped splits, tables, memory readings.

These machines are shared and noisy, so every figure is a median of repeats and every
claim is a ratio against a baseline measured in the same run.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

GLINT_CLASSES, FEATURE_DIM = 360_232, 512


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    clk = "wall clock" if clock is time.perf_counter else "process CPU time"
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads, {clk}), load average {os.getloadavg()[0]:.1f}")


#: the clock every timing reads; ``setup`` may switch it to process CPU time
clock = time.perf_counter


def add_common_args(p) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU time, immune to other processes' time slices on a shared "
                        "machine; only with --threads 1")


def setup(a) -> None:
    global clock
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.clock == "cpu":
        if torch.get_num_threads() != 1:
            raise SystemExit("--clock cpu needs --threads 1 (CPU time of several threads is not elapsed time)")
        clock = time.process_time


def median(values) -> float:
    return float(statistics.median(values))


def time_calls(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn()`` for ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = clock()
        fn()
        out.append(clock() - start)
    return out


def matmul_rate(repeats: int = 7) -> dict:
    """Measured float32 matmul rate (flop/s) of this machine through torch.

    ``peak``: the best median over a few large shapes (the rate the floor uses);
    the per-shape figures are reported too."""
    shapes = [(2048, 512, 2048), (4096, 512, 4096), (1024, 1024, 1024), (2048, 2048, 2048)]
    rates = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        out = torch.empty(m, n)
        t = median(time_calls(lambda: torch.mm(a, b, out=out), repeats, warmup=2))  # noqa: B023 - called at once
        rates[f"{m}x{k}x{n}"] = 2.0 * m * k * n / t
    return {"peak": max(rates.values()), "shapes": rates}


def step_shape_rate(B: int, K: int, D: int = FEATURE_DIM, repeats: int = 21) -> float:
    """flop/s of the step's own two matmuls, (B, D) x (D, K) and (K, B) x (B, D)."""
    x, w, g = torch.randn(B, D), torch.randn(K, D), torch.randn(B, K)

    def both():
        x @ w.T
        g.T @ x

    t = median(time_calls(both, repeats, warmup=3))
    return 4.0 * B * K * D / t


# --------------------------------------------------------------------------- data


@contextlib.contextmanager
def temp_dir(prefix: str = "xcent-bench-", keep: bool = False, base: str | None = None):
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def child_env(script: str, argv, threads: int | None) -> dict:
    """Print the machine and the command line, and return the environment of the
    ``xcent`` child processes (``OMP_NUM_THREADS=threads`` when given)."""
    import sys

    print(f"machine: {machine()}; the xcent child runs with "
          f"{'OMP_NUM_THREADS=' + str(threads) if threads else 'default threads'}")
    print(f"command: python benchmarks/{script} {' '.join(argv if argv is not None else sys.argv[1:])}")
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def check_disk(path, need_bytes: int) -> None:
    free = shutil.disk_usage(path).free
    if free < need_bytes * 1.2:
        raise SystemExit(f"not enough disk at {path}: need {need_bytes / 2**30:.1f} GiB, "
                         f"{free / 2**30:.1f} GiB free")


def write_split(directory: Path, num_rows: int, num_classes: int, dim: int = FEATURE_DIM, seed: int = 0,
                block: int = 1 << 17) -> Path:
    """A float16 memory-mapped split of unit-norm random rows with uniform labels, written
    block by block (never the whole array in memory). Returns the split directory."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    feats = np.lib.format.open_memmap(directory / "features.npy", mode="w+", dtype=np.float16,
                                      shape=(num_rows, dim))
    for start in range(0, num_rows, block):
        stop = min(start + block, num_rows)
        x = rng.standard_normal((stop - start, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        feats[start:stop] = x
    feats.flush()
    del feats
    np.save(directory / "labels.npy", rng.integers(0, num_classes, size=num_rows, dtype=np.int64))
    return directory


# --------------------------------------------------------------------------- memory


def rss_now() -> dict:
    """Current VmRSS, RssAnon and RssFile of this process in bytes (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(line.split()[1]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set of this process so far (ru_maxrss), bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# --------------------------------------------------------------------------- tables


def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    if title:
        lines.append(title)
    lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(cells[0], widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or 0.01 <= abs(v) < 1e6:
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return f"{v:.3g}"
    return str(v)


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


# --------------------------------------------------------------------------- child runs


def run_watched(cmd: list[str], interval: float = 0.2, env=None) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v`` (when present), sampling the child's
    VmRSS / RssAnon / RssFile from /proc every ``interval`` s. Returns wall seconds,
    the peaks, the exit code, ``time -v``'s maximum resident set and the output."""
    import subprocess
    import threading

    use_time = Path("/usr/bin/time").exists()
    full = (["/usr/bin/time", "-v"] if use_time else []) + cmd
    start = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def target_pid() -> int | None:
        if not use_time:
            return proc.pid
        try:
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            return int(kids[0]) if kids else None
        except OSError:
            return None

    def sample():
        while not stop.is_set():
            pid = target_pid()
            if pid is not None:
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        key = line.split(":")[0]
                        if key in peaks:
                            peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
                except OSError:
                    pass
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output = proc.communicate()[0]
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
    max_rss = None
    for line in output.splitlines():
        if "Maximum resident set size" in line:
            max_rss = int(line.split(":")[1]) * 1024
    if max_rss is None:
        max_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"wall": wall, "peaks": peaks, "max_rss": max_rss, "returncode": proc.returncode, "output": output}


def read_jsonl(path) -> list[dict]:
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
