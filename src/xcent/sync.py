"""Host reads of device values: the one door through which the training step and the
training loop read what lives on the accelerator, so that every read is deliberate and
countable.

Why it matters. On CUDA a read of a device value (``.item()``, ``bool(t)``, ``int(t)``,
``float(t)``, ``.tolist()``, ``.cpu()``, and the ops whose output shape depends on the
data: ``torch.unique``, ``nonzero``, boolean-mask indexing) blocks the host until the
GPU has finished everything queued before it. The host can then no longer run ahead
of the GPU, and a training step of ~40 small kernels costs its launch latency plus its
GPU time in series instead of overlapped. So xcent's step reads nothing from the
device:

* what depends on the batch's *shape* (the distinct labels, their positions, K, the
  columns a class shard owns, the rows :class:`xcent.step.LazySGD` catches up) is
  computed from the labels and row ids on the host, where the batch comes from, and
  copied to the device once (:func:`to_device`);
* host bookkeeping mirrors what the host would otherwise read back (softplus's
  "has this row a dual yet", LazySGD's per-row step counters);
* the health of each step (finite loss and rows, no saturated exponent) is recorded
  on the device and read once every ``--check-every-steps`` steps
  (:class:`xcent.step.StepMonitor`).

The reads that remain go through :func:`host_read` / :func:`host_copy` (always
counted) or :func:`to_host` (counted when its argument is not already on the host);
:func:`read_count` is the running total, which the tests compare before and after a
step (``tests/test_syncs.py`` also traces implicit reads, so a stray ``bool(t)`` cannot
hide from the count). Written by hand: PyTorch has a debug mode that *reports* CUDA
syncs (``torch.cuda.set_sync_debug_mode``), but no counter, and nothing on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["host_copy", "host_read", "read_count", "to_device", "to_host"]

_count = 0
#: callables told of each counted read's host result (the test's tracer: what an
#: explicit read returns is host data)
watchers: list[Callable[[Tensor], None]] = []


def read_count() -> int:
    """Host reads made through this module so far (in this process)."""
    return _count


def host_copy(t: Tensor) -> Tensor:
    """A new CPU tensor holding ``t``'s values: one host read (a sync on CUDA),
    counted even when ``t`` is on the CPU (the step's code path is the same there)."""
    global _count
    _count += 1
    out = t.detach().to("cpu", copy=True)
    for watch in watchers:
        watch(out)
    return out


def host_read(t: Tensor):
    """``t``'s values as Python numbers (``tolist()``): one counted host read."""
    return host_copy(t).tolist()


def to_host(t: Tensor) -> Tensor:
    """``t`` on the CPU: itself when it is there already (no read), else
    :func:`host_copy` (one counted read). For inputs a caller may pass from either
    side, such as the batch's labels."""
    return t if t.device.type == "cpu" else host_copy(t)


def to_device(device: torch.device, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Host tensors on ``device`` without a sync: on the CPU the tensors themselves;
    elsewhere one non-blocking copy of their concatenation (one dtype, by torch's
    promotion; from pinned memory on CUDA, so that the copy is truly asynchronous and
    its source is kept until it is done), split into views of their shapes."""
    device = torch.device(device)
    if device.type == "cpu":
        return tensors
    packed = torch.cat([t.reshape(-1) for t in tensors])
    if device.type == "cuda":
        packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)
    return tuple(part.view(t.shape) for part, t in zip(packed.split([t.numel() for t in tensors]), tensors))
