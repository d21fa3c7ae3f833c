"""Where the work runs: the one place that turns ``--device`` into a ``torch.device``, and
the CPU thread policy (``--threads``) of each phase of the work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import UsageError

__all__ = ["resolve_device", "ThreadPolicy", "parse_threads", "STEP_PARALLEL_FLOPS"]


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


class ThreadPolicy:
    """Intra-op CPU threads per phase of the work (``--threads N|auto``).

    PyTorch's default (one thread per core for every op) suits large GEMMs and hurts
    small ops: a training step at B = 128 is ~40 ops of a few microseconds each, and
    every op ends in a barrier across threads, so on a shared machine one descheduled
    thread stalls them all (we measured 93,880 samples/s with one thread and 1,877
    with two under load). With ``auto`` the training step uses one thread unless its
    GEMMs are large (:data:`STEP_PARALLEL_FLOPS`), and evaluation (long GEMMs over all
    C classes, where a second thread nearly halves the time) uses all of
    ``max_threads``: PyTorch's own count at start-up, so ``OMP_NUM_THREADS`` still
    caps it. A number applies to every phase. On CUDA the CPU threads only gather
    batches; the policy changes nothing there that matters.
    """

    def __init__(self, threads: int | str | None = None, max_threads: int | None = None):
        self.threads = parse_threads(threads)
        self.max_threads = int(max_threads or torch.get_num_threads())

    def step_threads(self, batch_size: int, feature_dim: int) -> int:
        """Threads for training steps of ``batch_size`` rows of ``feature_dim`` features
        (``K ~ batch_size`` distinct classes: the step costs ``4 B K D`` flops)."""
        if self.threads is not None:
            return self.threads
        flops = 4.0 * batch_size * batch_size * feature_dim
        return self.max_threads if flops >= STEP_PARALLEL_FLOPS else 1

    def eval_threads(self) -> int:
        """Threads for full-softmax evaluation and prediction."""
        return self.threads if self.threads is not None else self.max_threads

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
