"""Where the work runs: the one place that turns ``--device`` into a ``torch.device``, and
the CPU thread policy (``--threads``) of each phase of the work."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from .errors import UsageError

__all__ = ["resolve_device", "ThreadPolicy", "parse_threads", "gemm_probe", "STEP_PARALLEL_FLOPS",
           "EVAL_PROBE_BUDGET", "EVAL_REPROBE_SECONDS"]

log = logging.getLogger("xcent.device")


def resolve_device(name: str | None) -> torch.device:
    """``auto`` (or empty) picks CUDA when present, else the CPU; anything else must be a
    valid, available torch device, or a one-line ``UsageError`` naming ``--device``."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (cpu, cuda, cuda:N or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


# --------------------------------------------------------------------------- CPU threads

#: Above this many flops per training step (``4 B K D``: the step's two GEMMs), the step's
#: matrix products are large enough for several intra-op threads to pay for their
#: synchronisation; below it, one thread is faster. Measured with
#: ``benchmarks/threads.py --sweep`` (B = 128 .. 2048 at D = 512 on a 2-core machine):
#: at B = 128 (34 MFLOP, ~40 small ops per step) two threads lose on an idle machine and
#: collapse under load (each op's barrier waits for a descheduled thread); from
#: B = 1024 (2.1 GFLOP) the GEMMs dominate and two threads win when the cores are free.
STEP_PARALLEL_FLOPS = 1.0e9


def parse_threads(value) -> int | None:
    """``--threads``: ``auto`` (None) or a positive whole number."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        threads = int(str(value))
    except ValueError:
        threads = 0
    if threads < 1:
        raise UsageError(f"--threads {value}: expected auto or a whole number >= 1")
    return threads


#: The evaluation probe may cost at most this share of the evaluation work it decides
#: (counted in flops, so the rule itself does not depend on the clock).
EVAL_PROBE_BUDGET = 0.03
#: The evaluation probe is repeated at most this often (the load of a shared machine
#: changes), and only once the evaluations since the last probe have paid for it.
EVAL_REPROBE_SECONDS = 60.0
#: The probe: rounds of one GEMM of (rows, D) x (D, classes) and the exp pass over its
#: block, the shape of a CPU evaluation block cut to half its classes
#: (``xcent.classifier.CPU_BLOCK``; ~12 ms on one idle core at D = 512), at each thread
#: count, interleaved, for up to PROBE_ROUNDS rounds. Shorter probes (~2.5 ms) chose
#: wrongly under load: their timings are dominated by where the time slices fall. The
#: probe stops after a round in which one count took PROBE_CLEAR_RATIO times as long
#: as the other (loaded, we saw two threads take twice as long as one, every round).
#: More threads must win by PROBE_MARGIN: a near tie goes to one thread, which cannot
#: stall on a descheduled peer.
PROBE_ROWS, PROBE_CLASSES, PROBE_ROUNDS = 256, 4096, 2
PROBE_CLEAR_RATIO, PROBE_MARGIN = 1.5, 1.1


def _probe_flops(rounds: int, feature_dim: int) -> float:
    """Flops of ``rounds`` rounds of the evaluation-thread probe: each times one
    (PROBE_ROWS x D x PROBE_CLASSES) GEMM at one thread and one at all cores."""
    return 2 * rounds * 2.0 * PROBE_ROWS * PROBE_CLASSES * feature_dim


def gemm_probe(feature_dim: int, dtype: torch.dtype = torch.float32) -> Callable[[int], float]:
    """A probe for :class:`ThreadPolicy`: ``probe(threads)`` is the wall seconds of one
    evaluation-shaped score GEMM plus the exp pass over its block with ``threads``
    intra-op threads (the caller's count is restored). Wall time on purpose: what
    matters on a shared machine is how long the op waits for its slowest thread."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_ROWS, feature_dim, generator=gen).to(dtype)
    w = torch.randn(PROBE_CLASSES, feature_dim, generator=gen).to(dtype)
    block = torch.empty(PROBE_ROWS, PROBE_CLASSES, dtype=dtype)

    def probe(threads: int) -> float:
        with ThreadPolicy.use(threads):
            start = time.perf_counter()
            torch.mm(x, w.T, out=block)
            block.exp_().sum(dim=1)
            return time.perf_counter() - start

    return probe


class ThreadPolicy:
    """Intra-op CPU threads per phase of the work (``--threads N|auto``).

    PyTorch's default (one thread per core for every op) suits large GEMMs and hurts
    small ops: a training step at B = 128 is ~40 ops of a few microseconds each, and
    every op ends in a barrier across threads, so on a shared machine one descheduled
    thread stalls them all (we measured 93,880 samples/s with one thread and 1,877
    with two under load). With ``auto`` the training step uses one thread unless its
    GEMMs are large (:data:`STEP_PARALLEL_FLOPS`). Evaluation and prediction (long
    GEMMs over all C classes) are chosen by measurement: the same ops split well over
    idle cores, but on a loaded machine we measured two threads 2-4x *slower* than one.
    So ``auto`` times a probe of the evaluation's block shape (:func:`gemm_probe`) at
    one thread and at ``max_threads``, interleaved, keeps the faster, logs the choice,
    and probes again when :data:`EVAL_REPROBE_SECONDS` have passed and the evaluations
    since the last probe have paid for it (:data:`EVAL_PROBE_BUDGET`). An evaluation
    too small to pay for a first probe runs on one thread. ``max_threads`` is
    PyTorch's own count at start-up, so ``OMP_NUM_THREADS`` still caps every phase. A
    number applies to every phase. The thread count changes how work is split, not
    what is summed: ``tests/test_device.py`` checks that evaluation gives the same
    bits at one and at two threads. Off the CPU (``device``) the CPU threads only
    gather batches: no probe, all threads.

    ``probe(threads) -> seconds`` and ``clock() -> seconds`` can be injected (tests).
    """

    def __init__(self, threads: int | str | None = None, max_threads: int | None = None, *,
                 device: torch.device | str | None = None,
                 probe: Callable[[int], float] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.threads = parse_threads(threads)
        self.max_threads = int(max_threads or torch.get_num_threads())
        self.cpu = device is None or torch.device(device).type == "cpu"
        self._probe, self._clock = probe, clock
        self._eval_choice: int | None = None
        self._probed_at = float("-inf")
        self._flops_since_probe = 0.0
        self.probe_flops = 0.0  # spent on probes so far
        self.probes: list[dict] = []  # every probe's timings and choice (for logs and tests)

    def step_threads(self, batch_size: int, feature_dim: int) -> int:
        """Threads for training steps of ``batch_size`` rows of ``feature_dim`` features
        (``K ~ batch_size`` distinct classes: the step costs ``4 B K D`` flops)."""
        if self.threads is not None:
            return self.threads
        flops = 4.0 * batch_size * batch_size * feature_dim
        return self.max_threads if flops >= STEP_PARALLEL_FLOPS else 1

    def eval_threads(self, feature_dim: int = 512, flops: float | None = None) -> int:
        """Threads for a full-softmax evaluation or prediction of about ``flops`` flops
        (``2 rows C D``; None: large) over ``feature_dim`` features (the probe's shape)."""
        if self.threads is not None:
            return self.threads
        if self.max_threads == 1 or not self.cpu:
            return self.max_threads
        self._flops_since_probe += float("inf") if flops is None else float(flops)
        probe_flops = _probe_flops(PROBE_ROUNDS, feature_dim)  # what a probe costs at most
        due = self._eval_choice is None or self._clock() - self._probed_at >= EVAL_REPROBE_SECONDS
        if due and self._flops_since_probe * EVAL_PROBE_BUDGET >= probe_flops:
            self._measure(feature_dim)
        return 1 if self._eval_choice is None else self._eval_choice

    @contextmanager
    def evaluation(self, feature_dim: int = 512, flops: float | None = None) -> Iterator[int]:
        """Run the block with :meth:`eval_threads`, then restore the caller's count."""
        threads = self.eval_threads(feature_dim, flops)
        with self.use(threads):
            yield threads

    def _measure(self, feature_dim: int) -> None:
        probe = self._probe or gemm_probe(feature_dim)
        counts = (1, self.max_threads)
        seconds = dict.fromkeys(counts, 0.0)
        rounds = 0
        while rounds < PROBE_ROUNDS:  # interleaved, so a change of load hits both alike
            rounds += 1
            for threads in counts:
                seconds[threads] += probe(threads)
            if max(seconds.values()) >= PROBE_CLEAR_RATIO * min(seconds.values()):
                break  # clear already (a loaded machine: the slow count would only add cost)
        # the mean, not the median: an evaluation pays for every stall of a slow thread
        choice = self.max_threads if seconds[self.max_threads] * PROBE_MARGIN < seconds[1] else 1
        self._eval_choice, self._probed_at, self._flops_since_probe = choice, self._clock(), 0.0
        self.probe_flops += _probe_flops(rounds, feature_dim)
        self.probes.append({"threads": choice, "rounds": rounds,
                            **{f"seconds_{t}": s / rounds for t, s in seconds.items()}})
        log.info("evaluation threads: %d (probe at D = %d, %d round(s): 1 thread %.2f ms, %d threads %.2f ms)",
                 choice, feature_dim, rounds, seconds[1] / rounds * 1e3, self.max_threads,
                 seconds[self.max_threads] / rounds * 1e3)

    @staticmethod
    @contextmanager
    def use(threads: int) -> Iterator[None]:
        """Run the block with ``threads`` intra-op threads, then restore the previous
        count (setting it is cheap: the OpenMP pool is kept)."""
        previous = torch.get_num_threads()
        if threads != previous:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            if torch.get_num_threads() != previous:
                torch.set_num_threads(previous)
