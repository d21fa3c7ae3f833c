"""One training step: in-batch logits -> dual update and G -> sparse SGD row update.

This is the whole per-step computation of ``xcent train``; the trainer only adds
data loading, schedules and bookkeeping around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .classifier import in_batch_logits, sparse_sgd_step

__all__ = ["StepResult", "train_step", "step_ok"]


@dataclass
class StepResult:
    """``skipped``: the batch had one distinct label (no negatives), nothing changed.
    ``loss``: the surrogate's value (a 0-dim tensor, not synchronised; NaN when
    skipped). ``finite``: loss and updated rows are finite (only checked when asked)."""

    skipped: bool
    loss: Tensor
    finite: bool = True
    num_distinct: int = 0


@torch.no_grad()
def train_step(weight: Tensor, loss_fn: nn.Module, features: Tensor, labels: Tensor, index: Tensor,
               lr: float, check_finite: bool = True) -> StepResult:
    """Apply one step of ``loss_fn``'s algorithm to ``weight`` in place.

    ``features`` (B, D), ``labels`` (B,), ``index`` (B,) global training-row ids (the
    rows whose duals are updated). Only the K rows of the batch's distinct labels
    of ``weight`` are read and written; ``loss_fn`` updates ``nu`` of ``index``.
    A batch with K == 1 has no negatives and is skipped (``skipped=True``), nothing
    changes. With ``check_finite`` the step also reports (one device sync) whether
    the surrogate and the new rows are finite, so the caller can stop before a
    NaN spreads."""
    batch = in_batch_logits(features, labels, weight)
    if batch.num_distinct < 2:
        return StepResult(True, torch.tensor(float("nan")), True, batch.num_distinct)
    grad_logits = loss_fn.weights(batch.logits, index.to(weight.device))
    new_rows = sparse_sgd_step(weight, batch, grad_logits, lr)
    loss = loss_fn.value
    finite = bool(step_ok(loss_fn, new_rows)) if check_finite else True
    return StepResult(False, loss, finite, batch.num_distinct)


def step_ok(loss_fn: nn.Module, new_rows: Tensor) -> Tensor:
    """0-dim bool tensor (no sync): the step's surrogate and new rows are finite and
    the algorithm's exact arithmetic stayed in range (``loss_fn.overflow``).

    One pass: a float64 sum of float32 rows cannot overflow, so it is finite exactly
    when every entry is (inf and NaN propagate; inf - inf is NaN). (float64 weights:
    only with entries beyond ~1e304, far past divergence.)"""
    ok = torch.isfinite(new_rows.sum(dtype=torch.float64) + loss_fn.value)
    return ok if loss_fn.overflow is None else ok & ~loss_fn.overflow
