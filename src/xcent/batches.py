"""Training batches of an epoch, the next one gathered while the current step runs.

A batch is the rows ``order[t B : (t + 1) B]`` of the epoch's permutation, sorted
(:func:`batch_index`; sorted rows read a memory-mapped file in file order). Reading
it is a fancy-index of the memory-mapped split (:meth:`xcent.data.Split.gather`),
then, on a GPU, a host-to-device copy. :class:`BatchLoader` yields the batches of
one epoch in order and, with ``prefetch``, reads batch t + 1 in a background thread
while the caller runs step t, so that neither the read nor the copy waits on the
critical path:

* the read: numpy copies the rows with the GIL released (and page faults of the
  memory map are served meanwhile), so it runs beside the step's torch ops, which
  release the GIL too. It is single-threaded: with ``--threads auto`` a step at
  B = 128 runs one intra-op thread, and the read takes the second core of a 2-core
  machine (``docs/performance.md`` has the measurements).
* the copy (CUDA): the rows are gathered straight into pinned (page-locked) host
  memory, so ``.to(device, non_blocking=True)`` is a DMA that returns at once
  instead of a staged copy. The pinned tensors come from PyTorch's caching host
  allocator (``pin_memory=True``), which is the ring of reused buffers this needs:
  a non-blocking copy records a CUDA event on its block, and the allocator hands the
  block out again only after that event has completed, so a buffer is never
  overwritten while its copy may still be in flight (and a batch the caller keeps
  is never overwritten at all, which a hand-made ring of 2-3 buffers could not
  promise). ``index`` and ``labels`` are pinned as well: the step may copy them to
  the device with ``non_blocking=True`` without a stream synchronisation.

The batches, and therefore training, are the same with and without ``prefetch``
(the background thread runs the very function the caller would). An exception in
the thread (a file that cannot be read) is raised in the caller, the original
object with its message; the thread is stopped and joined when the loop ends,
early included (divergence, KeyboardInterrupt), by :meth:`BatchLoader.close` or
the ``with`` block. Collectives (the class-sharded engine's all-gather) must run
on the caller's thread, in the same order on every rank: ``finish`` runs there.

Why a thread and not ``torch.utils.data.DataLoader``: the DataLoader's worker
processes would each map the split and pickle every batch back through a pipe,
and with ``num_workers=0`` it prefetches nothing; one thread reading straight into
(pinned) tensors is all that is needed and shares the one memory map.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .data import Split, _torch_dtype

__all__ = ["Batch", "BatchLoader", "THREAD_NAME", "batch_index", "prefetch_enabled", "read_batch"]

#: name of the background thread (tests look for leaked ones by it)
THREAD_NAME = "xcent-batches"


def batch_index(order: Tensor, step: int, batch_size: int) -> Tensor:
    """The training rows of batch ``step`` of an epoch whose row order is ``order``:
    ``order[step B : (step + 1) B]``, sorted (the last batch may be shorter)."""
    return order[step * batch_size:(step + 1) * batch_size].sort().values


def prefetch_enabled(setting: str, device) -> bool:
    """``--prefetch auto|on|off`` on ``device``. ``auto`` is on with CUDA, where the read
    and the copy leave the critical path by design, and off on the CPU: there the read
    is ~10% of a B = 128 step at most, and on a loaded 2-core machine the second thread
    lost more than that (GIL hand-offs and wake-ups wait for a time slice;
    ``benchmarks/prefetch.py``, ``docs/performance.md``)."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"prefetch must be auto, on or off, got {setting!r}")
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return setting == "on"


@dataclass
class Batch:
    """One training batch. ``index`` (B,) int64 global training-row ids, ``labels``
    (B,) int64: host tensors (pinned when the device is a GPU). ``features``: the rows
    this process read (all B, or its slice under class sharding, before ``finish``),
    in the stored dtype, on the device."""

    step: int
    index: Tensor
    labels: Tensor
    features: Tensor


def _read_host(split: Split, index: Tensor, rows_of: Callable[[Tensor], Tensor] | None,
               pin: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(features of the rows this process reads, ``rows_of(index)`` or all of ``index``;
    labels of ``index``; ``index``) on the host; in pinned memory when ``pin``."""
    rows = index if rows_of is None else rows_of(index)
    out = None
    if pin:
        dtype = split.features.dtype
        if not isinstance(dtype, torch.dtype):
            dtype = _torch_dtype(dtype)
        out = torch.empty((rows.shape[0], split.feature_dim), dtype=dtype, pin_memory=True)
    features, _ = split.gather(rows, out=out)
    labels = split.labels.index_select(0, index)
    if pin:
        labels, index = labels.pin_memory(), index.pin_memory()
    return features, labels, index


def _to_device(features: Tensor, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return features  # nothing to copy
    return features.to(device, non_blocking=True)


def read_batch(split: Split, index: Tensor, device, rows_of: Callable[[Tensor], Tensor] | None = None,
               step: int = 0) -> Batch:
    """The batch of the rows ``index``, read now (no thread): what :class:`BatchLoader`
    does for each batch. ``rows_of(index)``: the rows this process reads (default all)."""
    device = torch.device(device)
    features, labels, index = _read_host(split, index, rows_of, device.type == "cuda")
    return Batch(step, index, labels, _to_device(features, device))


class BatchLoader:
    """The batches of one epoch, in order: ``for batch in BatchLoader(split, order, B,
    device)``. With ``prefetch`` a background thread reads up to ``depth`` batches
    ahead (host memory only; the device copy is issued by the caller's thread when it
    takes the batch, so it lands on the caller's current CUDA stream, in order with
    the step). ``rows_of``: see :func:`read_batch`. ``finish(features, index)``: run on
    the caller's thread on each batch's device features, its result replacing them
    (the class-sharded engine all-gathers there).

    Use it as a context manager, or call :meth:`close`, so that the thread is stopped
    when the loop is left early; iterating it to the end closes it too."""

    def __init__(self, split: Split, order: Tensor, batch_size: int, device, prefetch: bool = True,
                 rows_of: Callable[[Tensor], Tensor] | None = None,
                 finish: Callable[[Tensor, Tensor], Tensor] | None = None, depth: int = 2):
        if batch_size < 1 or depth < 1:
            raise ValueError(f"batch_size and depth must be >= 1, got {batch_size}, {depth}")
        self.split, self.order, self.batch_size = split, order, int(batch_size)
        self.device = torch.device(device)
        self.prefetch, self.rows_of, self.finish, self.depth = prefetch, rows_of, finish, int(depth)
        self.num_batches = -(-order.shape[0] // self.batch_size)
        self._pin = self.device.type == "cuda"
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready: queue.Queue | None = None
        self._started = False

    def __len__(self) -> int:
        return self.num_batches

    def _host(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        return _read_host(self.split, batch_index(self.order, step, self.batch_size), self.rows_of, self._pin)

    def _put(self, item) -> bool:
        """Queue ``item`` for the caller unless it has stopped listening (False)."""
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        """The thread: read the batches in order into ``_ready`` (at most ``depth``
        waiting), then an end mark; an exception is passed on instead and ends it."""
        try:
            if self._pin and self.device.index is not None:
                torch.cuda.set_device(self.device)  # the current device is per thread: pin for the run's
            for step in range(self.num_batches):
                if not self._put(("batch", step, self._host(step))):
                    return
        except BaseException as exc:  # noqa: BLE001  handed to the caller, who raises it
            self._put(("error", exc, None))
            return
        self._put(("end", None, None))

    def __iter__(self) -> Iterator[Batch]:
        if self._started:
            raise RuntimeError("a BatchLoader is iterated once (one per epoch)")
        self._started = True
        try:
            if not self.prefetch:
                for step in range(self.num_batches):
                    yield self._batch(step, self._host(step))
                return
            # the thread reads ahead; the caller only takes finished batches from the queue
            self._ready = queue.Queue(maxsize=self.depth)
            self._thread = threading.Thread(target=self._produce, name=THREAD_NAME, daemon=True)
            self._thread.start()
            while True:
                kind, step, host = self._ready.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise step  # the thread's exception, its message and traceback intact
                yield self._batch(step, host)
        finally:
            self.close()

    def _batch(self, step: int, host: tuple[Tensor, Tensor, Tensor]) -> Batch:
        features, labels, index = host
        features = _to_device(features, self.device)
        if self.finish is not None:
            features = self.finish(features, index)
        return Batch(step, index, labels, features)

    def close(self) -> None:
        """Stop the thread (it finishes the read in hand) and wait for it."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
