"""One training step: in-batch logits -> dual update and G -> sparse row update.

This is the whole per-step computation of ``xcent train`` and of
:class:`xcent.SparseSoftmaxHead`; the callers only add data loading, schedules and
bookkeeping around it.

There is one step, written for class sharding (Partial-FC style, see
:mod:`xcent.distributed`): a process holds the weight rows ``lo .. lo + len`` of a
contiguous block of classes, and with a ``process_group`` the (B, K) in-batch scores
are completed by one exact all-reduce (each entry is non-zero on exactly one rank).
A single process is the case ``process_group=None``, ``lo=0``: the process owns all K
columns, and no collective, no zero-filled (B, K) buffer and no column slicing is
done, so the single-process step costs what it did before the sharded step joined it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .classifier import InBatch, in_batch_logits, matmul_nt, relative_logits_, row_gradient_weights_, sparse_sgd_step

__all__ = ["LazySGD", "StepResult", "effective_group", "sharded_in_batch", "step_ok", "train_step"]


@dataclass
class StepResult:
    """``skipped``: the batch had one distinct label (no negatives), nothing changed.
    ``loss``: the surrogate's value (a 0-dim tensor, not synchronised; NaN when
    skipped). ``finite``: loss and updated rows are finite (only checked when asked)."""

    skipped: bool
    loss: Tensor
    finite: bool = True
    num_distinct: int = 0


def effective_group(process_group):
    """``None`` when there is nothing to communicate with (no group, or a group of
    one process), else the group: a one-process group runs the single-process step."""
    if process_group is None or dist.get_world_size(process_group) == 1:
        return None
    return process_group


def sharded_in_batch(features: Tensor, labels: Tensor, shard: Tensor, lo: int = 0,
                     process_group=None, read_rows=None, precision: str = "fp32") -> InBatch:
    """:func:`xcent.classifier.in_batch_logits` when this process holds only the rows
    ``shard = W[lo : lo + len]``: it scores the batch against the distinct labels it
    owns (columns ``owned`` of the (B, K) logits, rows ``rows`` of ``shard``) and one
    all-reduce over ``process_group`` completes the scores on every rank. Every rank
    passes the same ``features`` and ``labels`` (the global batch) and gets the same
    logits. ``process_group=None``: the single-process path (``lo`` must be 0).
    ``read_rows(shard, rows) -> (n, D)``: how the rows are read (default
    ``shard.index_select``; :meth:`LazySGD.current` for rows caught up lazily).
    ``precision``: of the score GEMM (:func:`xcent.classifier.matmul_nt`)."""
    group = effective_group(process_group)
    if group is None and lo != 0:
        raise ValueError(f"a single process holds every row: lo must be 0, got {lo}")
    if group is None:
        return in_batch_logits(features, labels, shard, precision, read_rows)
    x = features.to(device=shard.device, dtype=shard.dtype)
    classes, label_pos = torch.unique(labels.to(shard.device), sorted=True, return_inverse=True)
    a = int(torch.searchsorted(classes, lo))
    b = int(torch.searchsorted(classes, lo + shard.shape[0]))
    rows = classes[a:b] - lo
    class_weight = shard.index_select(0, rows) if read_rows is None else read_rows(shard, rows)
    scores = torch.zeros(x.shape[0], classes.shape[0], dtype=x.dtype, device=x.device)
    scores[:, a:b] = matmul_nt(x, class_weight, precision)
    dist.all_reduce(scores, group=group)
    return InBatch(relative_logits_(scores, label_pos), classes, label_pos, class_weight, x, rows, slice(a, b))


@torch.no_grad()
def train_step(weight: Tensor, loss_fn: nn.Module, features: Tensor, labels: Tensor, index: Tensor,
               lr: float, check_finite: bool = True, *, lo: int = 0, process_group=None,
               optimizer: LazySGD | None = None, precision: str = "fp32") -> StepResult:
    """Apply one step of ``loss_fn``'s algorithm to ``weight`` in place.

    ``features`` (B, D), ``labels`` (B,), ``index`` (B,) global training-row ids (the
    rows whose duals are updated). Only the K rows of the batch's distinct labels
    of ``weight`` are read and written; ``loss_fn`` updates ``nu`` of ``index``.
    A batch with K == 1 has no negatives and is skipped (``skipped=True``), nothing
    changes. With ``check_finite`` the step also reports (one device sync) whether
    the surrogate and the new rows are finite, so the caller can stop before a
    NaN spreads.

    Class-sharded: ``weight`` is this rank's rows ``W[lo : lo + len]`` and every rank
    of ``process_group`` passes the same global batch. The dual update and ``G`` are
    computed identically on every rank (the duals are replicated), each rank updates
    only the rows it owns, and ``finite`` is agreed over the group.

    ``optimizer``: a :class:`LazySGD` with momentum or weight decay (over this
    process's rows); None is the spec's plain SGD.

    ``precision``: ``"bf16"`` computes the (B, K) in-batch scores from bfloat16
    operands with float32 accumulation (:func:`xcent.classifier.matmul_nt`); the
    duals, the algorithm's arithmetic, the row update GEMM and the weight stay
    float32."""
    lazy = optimizer is not None and optimizer.lazy
    batch = sharded_in_batch(features, labels, weight, lo, process_group,
                             read_rows=optimizer.current if lazy else None, precision=precision)
    if batch.num_distinct < 2:
        return StepResult(True, torch.tensor(float("nan")), True, batch.num_distinct)
    grad_logits = loss_fn.weights(batch.logits, index.to(weight.device))
    if lazy:
        M = row_gradient_weights_(batch.label_pos, grad_logits)[:, batch.owned]
        new_rows = optimizer.step(weight, batch.local_rows, batch.class_weight, M, batch.features, lr)
    else:
        new_rows = sparse_sgd_step(weight, batch, grad_logits, lr)
    loss = loss_fn.value
    finite = True
    if check_finite:
        ok = step_ok(loss_fn, new_rows)
        group = effective_group(process_group)
        if group is not None:
            flag = ok.to(torch.int32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
            ok = flag[0]
        finite = bool(ok)
    return StepResult(False, loss, finite, batch.num_distinct)


def step_ok(loss_fn: nn.Module, new_rows: Tensor) -> Tensor:
    """0-dim bool tensor (no sync): the step's surrogate and new rows are finite and
    the algorithm's exact arithmetic stayed in range (``loss_fn.overflow``).

    One pass: a float64 sum of float32 rows cannot overflow, so it is finite exactly
    when every entry is (inf and NaN propagate; inf - inf is NaN). (float64 weights:
    only with entries beyond ~1e304, far past divergence.)"""
    ok = torch.isfinite(new_rows.sum(dtype=torch.float64) + loss_fn.value)
    return ok if loss_fn.overflow is None else ok & ~loss_fn.overflow


class LazySGD:
    """``torch.optim.SGD(momentum=mu, weight_decay=lam)`` applied densely to all C rows,
    computed exactly while a step touches only the K rows of its batch.

    Dense SGD (dampening 0, no Nesterov) on a row with gradient ``g``::

        d = g + lam w ;  buf = mu buf + d ;  w = w - lr buf

    A row outside the batch has ``g = 0``, so over k such steps at a constant lr the
    pair ``(w, buf)`` of each coordinate follows ``x <- A^k x`` with

        A = [[1 - lr lam, -lr mu],
             [lam,         mu   ]]

    (four scalars, the same for every row and coordinate). Each row remembers the step
    at which it was last brought up to date; before its next real step (and at
    :meth:`flush`) it is caught up by ``A^k``. The powers ``A^0 .. A^S`` are cumulative
    products in float64 (stable where the closed form through A's eigenvalues is not:
    they nearly coincide for mu = 0.9 and small lr lam), grown on demand. The lr may
    only change at a :meth:`flush` (the epoch boundary of a per-epoch schedule); a new
    lr flushes first by itself.

    State: ``buf`` (C, D) when ``mu > 0`` (torch's buffer; a step reads and writes
    only its K rows of it), ``last`` (C,) int64 and the step counter. After
    :meth:`flush` every row is current and ``last`` is all zero, so ``buf`` is the
    whole state worth saving. ``mu = lam = 0`` is plain SGD: nothing is stored and
    :meth:`step` is the one fused update of :func:`xcent.classifier.sparse_sgd_step`.
    """

    #: rows caught up per block in :meth:`flush` (bounds its temporaries)
    FLUSH_ROWS = 65536

    def __init__(self, num_rows: int, dim: int, momentum: float = 0.0, weight_decay: float = 0.0,
                 dtype: torch.dtype = torch.float32, device=None):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.buf = torch.zeros(num_rows, dim, dtype=dtype, device=device) if self.momentum > 0 else None
        self.last = torch.zeros(num_rows, dtype=torch.long, device=device) if self.lazy else None
        self.steps = 0
        self.lr: float | None = None
        self._powers = torch.eye(2, dtype=torch.float64)[None]  # (n, 2, 2): A^0 .. A^(n-1)

    @property
    def lazy(self) -> bool:
        """Whether untouched rows move at all (momentum or weight decay)."""
        return self.momentum > 0 or self.weight_decay > 0

    def to(self, device) -> LazySGD:
        if self.buf is not None:
            self.buf = self.buf.to(device)
        if self.last is not None:
            self.last = self.last.to(device)
        return self

    def _matrix(self, lr: float) -> Tensor:
        mu, lam = self.momentum, self.weight_decay
        return torch.tensor([[1.0 - lr * lam, -lr * mu], [lam, mu]], dtype=torch.float64)

    def _coefficients(self, k: Tensor) -> Tensor:
        """(n, 2, 2) float64 ``A^k`` for each entry of ``k``, on ``k``'s device."""
        need = int(k.max()) + 1 if k.numel() else 1
        if need > self._powers.shape[0]:
            A = self._matrix(self.lr)
            n = max(need, 2 * self._powers.shape[0])
            powers = [self._powers[i] for i in range(self._powers.shape[0])]
            while len(powers) < n:
                powers.append(A @ powers[-1])
            self._powers = torch.stack(powers)
        return self._powers.to(k.device)[k]

    def _advance(self, w: Tensor, buf: Tensor | None, k: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(w, buf)`` of rows idle for ``k`` steps, caught up (new tensors)."""
        P = self._coefficients(k).to(w.dtype)
        a, b, c, d = (P[:, i, j, None] for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
        if buf is None:  # mu = 0: w_k = (1 - lr lam)^k w; there is no buffer to carry
            return a * w, None
        return a * w + b * buf, c * w + d * buf

    def current(self, weight: Tensor, rows: Tensor) -> Tensor:
        """The up-to-date values of ``weight[rows]`` (a new (K, D) tensor), written
        nowhere: what dense SGD's weight holds now."""
        w = weight.index_select(0, rows)
        if not self.lazy or self.steps == 0:
            return w
        k = self.steps - self.last[rows]
        buf = None if self.buf is None else self.buf.index_select(0, rows)
        return self._advance(w, buf, k)[0]

    def step(self, weight: Tensor, rows: Tensor, class_weight: Tensor, M: Tensor, x: Tensor, lr: float) -> Tensor:
        """One dense-equivalent SGD step on the rows ``rows`` of ``weight`` whose
        current values are ``class_weight`` (from :meth:`current`), with gradient
        ``M^T x``. Writes and returns the new (K, D) rows."""
        if not self.lazy:
            new_rows = torch.addmm(class_weight, M.T, x, alpha=-lr)
            weight.index_copy_(0, rows, new_rows)
            return new_rows
        if self.lr != lr:
            self.flush(weight)
            self.lr = lr
            self._powers = self._powers[:1]
        d = M.T @ x
        if self.weight_decay:
            d.add_(class_weight, alpha=self.weight_decay)
        if self.buf is not None:
            k = self.steps - self.last[rows]
            # A^k acts on the stored (stale) pair (w, buf), not on the caught-up w
            buf = self._advance(weight.index_select(0, rows), self.buf.index_select(0, rows), k)[1]
            d = buf.mul_(self.momentum).add_(d)
            self.buf.index_copy_(0, rows, d)
        new_rows = torch.add(class_weight, d, alpha=-lr)
        weight.index_copy_(0, rows, new_rows)
        self.steps += 1
        self.last.index_fill_(0, rows, self.steps)
        return new_rows

    def mark_current(self) -> None:
        """Declare every row up to date without touching it (after loading rows that
        were saved flushed); the next step starts a fresh lr."""
        if self.last is not None:
            self.last.zero_()
        self.steps, self.lr = 0, None
        self._powers = self._powers[:1]

    @torch.no_grad()
    def flush(self, weight: Tensor) -> None:
        """Bring every row up to date (one pass over the C rows in blocks); then all
        rows are current at step 0 and a new lr may start."""
        if self.lazy and self.steps > 0:
            for lo in range(0, weight.shape[0], self.FLUSH_ROWS):
                hi = min(lo + self.FLUSH_ROWS, weight.shape[0])
                k = self.steps - self.last[lo:hi]
                buf = None if self.buf is None else self.buf[lo:hi]
                w, new_buf = self._advance(weight[lo:hi], buf, k)
                weight[lo:hi] = w
                if new_buf is not None:
                    self.buf[lo:hi] = new_buf
            self.last.zero_()
        self.steps = 0
