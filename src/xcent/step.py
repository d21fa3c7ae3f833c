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

No host synchronisation. The step reads nothing back from the device (see
:mod:`xcent.sync` for why that matters on CUDA), given ``labels`` and ``index`` on the
host, as the trainer passes them:

* the batch's distinct labels, each row's position among them, K, and the columns a
  class shard owns are computed from the host labels and copied to the device in one
  non-blocking copy (:func:`xcent.classifier.in_batch_logits`, :func:`sharded_in_batch`);
* :class:`LazySGD` keeps its per-row step counters on the host (the rows a step
  touches are known there), so catching rows up needs no device read;
* the algorithms branch on nothing that lives on the device (:mod:`xcent.losses`);
* the step's health (finite surrogate and rows, no saturated exponent) is a device
  value, :attr:`StepResult.health`: ``check_finite=True`` reads it at once (one host
  read, :func:`xcent.sync.host_read`), and the trainer instead collects it in a
  :class:`StepMonitor`, read once every ``--check-every-steps`` steps and at the end
  of every epoch (one read for N steps; under class sharding one all-reduce of the
  N values agrees on it).

Labels or index on the device still work, at one host read each where they are
needed on the host (a documented sync).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .classifier import InBatch, in_batch_logits, matmul_nt, relative_logits_, row_gradient_weights_, sparse_sgd_step
from .divergence import divergence_bound
from .errors import ArgumentError
from .sync import host_read, to_device, to_host

__all__ = ["LazySGD", "StepMonitor", "StepResult", "effective_group", "sharded_in_batch", "step_health", "step_ok",
           "train_step"]


@dataclass
class StepResult:
    """``skipped``: the batch had one distinct label (no negatives), nothing changed.
    ``loss``: the surrogate's value (a 0-dim tensor, not synchronised; NaN when
    skipped). ``finite``: loss and updated rows are finite (only checked when asked;
    True otherwise). ``health``: the device value that says so without a read
    (:func:`step_health`; None when skipped), for a :class:`StepMonitor`."""

    skipped: bool
    loss: Tensor
    finite: bool = True
    num_distinct: int = 0
    health: Tensor | None = field(default=None, repr=False)


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
    ``read_rows(shard, rows, rows_on_host) -> (n, D)``: how the rows are read
    (default ``shard.index_select``; :meth:`LazySGD.current` for rows caught up
    lazily). ``precision``: of the score GEMM (:func:`xcent.classifier.matmul_nt`).
    The distinct labels and the owned columns ``a:b`` come from the labels on the
    host (labels on the device: one host read)."""
    group = effective_group(process_group)
    if group is None and lo != 0:
        raise ValueError(f"a single process holds every row: lo must be 0, got {lo}")
    if group is None:
        return in_batch_logits(features, labels, shard, precision, read_rows)
    x = features.to(device=shard.device, dtype=shard.dtype)
    host_classes, host_pos = torch.unique(to_host(labels), sorted=True, return_inverse=True)
    a = int(torch.searchsorted(host_classes, lo))
    b = int(torch.searchsorted(host_classes, lo + shard.shape[0]))
    host_rows = host_classes[a:b] - lo
    classes, label_pos, rows = to_device(shard.device, host_classes, host_pos, host_rows)
    class_weight = shard.index_select(0, rows) if read_rows is None else read_rows(shard, rows, host_rows)
    scores = torch.zeros(x.shape[0], classes.shape[0], dtype=x.dtype, device=x.device)
    scores[:, a:b] = matmul_nt(x, class_weight, precision)
    dist.all_reduce(scores, group=group)
    return InBatch(relative_logits_(scores, label_pos), classes, label_pos, class_weight, x, rows, slice(a, b),
                   host_rows)


@torch.no_grad()
def train_step(weight: Tensor, loss_fn: nn.Module, features: Tensor, labels: Tensor, index: Tensor,
               lr: float, check_finite: bool = True, *, lo: int = 0, process_group=None,
               optimizer: LazySGD | None = None, precision: str = "fp32") -> StepResult:
    """Apply one step of ``loss_fn``'s algorithm to ``weight`` in place.

    ``features`` (B, D), ``labels`` (B,), ``index`` (B,) global training-row ids (the
    rows whose duals are updated): ``features`` on any device, ``labels`` and
    ``index`` best on the host (the CPU), where the step computes what depends on
    them without reading the device (see the module docstring; on the device they
    work too, at one host read each). Only the K rows of the batch's distinct labels
    of ``weight`` are read and written; ``loss_fn`` updates ``nu`` of ``index``.
    A batch with K == 1 has no negatives and is skipped (``skipped=True``), nothing
    changes. With ``check_finite`` the step also reports (one host read, a sync on
    CUDA) whether the surrogate and the new rows are finite, so the caller can stop
    before a NaN spreads; without it, ``health`` carries the same test unread (for
    a :class:`StepMonitor`).

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
    # a host index is taken to the device by the algorithm (softplus also looks it up on the host)
    grad_logits = loss_fn.weights(batch.logits, index)
    if lazy:
        M = row_gradient_weights_(batch.label_pos, grad_logits)[:, batch.owned]
        new_rows = optimizer.step(weight, batch.local_rows, batch.class_weight, M, batch.features, lr,
                                  rows_host=batch.host_rows)
    else:
        new_rows = sparse_sgd_step(weight, batch, grad_logits, lr)
    health = step_health(loss_fn, new_rows)
    finite = True
    if check_finite:
        group = effective_group(process_group)
        if group is not None:  # agreed over the ranks: a sum is finite iff every rank's value is
            dist.all_reduce(health, group=group)
        finite = math.isfinite(host_read(health))
    return StepResult(False, loss_fn.value, finite, batch.num_distinct, health)


def step_health(loss_fn: nn.Module, new_rows: Tensor, batch_ce: Tensor | None = None,
                num_classes: int | None = None) -> Tensor:
    """A 0-dim float64 device value, finite exactly when the step's surrogate and new
    rows are finite and the algorithm's exact arithmetic stayed in range
    (``loss_fn.overflow``): ``sum(new_rows) + surrogate``, NaN on overflow. No sync.
    ``loss_fn``: the algorithm after the step, or anything holding the step's
    ``value`` and ``overflow``.

    Given ``batch_ce`` (:func:`xcent.divergence.batch_ce_lower_bound` of the step's
    logits) and ``num_classes``, also NaN when the batch breaks the divergence rule:
    a lower bound of its full-softmax CE above
    :func:`xcent.divergence.divergence_bound` (a finite blow-up, see
    :mod:`xcent.divergence`).

    One pass: a float64 sum of float32 rows cannot overflow, so it is finite exactly
    when every entry is (inf and NaN propagate; inf - inf is NaN). (float64 weights:
    only with entries beyond ~1e304, far past divergence.) A sum of such values over
    ranks is finite exactly when each one is."""
    health = new_rows.sum(dtype=torch.float64).add_(loss_fn.value)
    if batch_ce is not None:
        health.masked_fill_(batch_ce > divergence_bound(num_classes), math.nan)
    return health if loss_fn.overflow is None else health.masked_fill_(loss_fn.overflow, math.nan)


def step_ok(loss_fn: nn.Module, new_rows: Tensor) -> Tensor:
    """0-dim bool tensor (no sync): :func:`step_health` is finite."""
    return torch.isfinite(step_health(loss_fn, new_rows))


class StepMonitor:
    """The health of training steps, kept on the device and read every ``every`` steps.

    :meth:`record` stores a step's :attr:`StepResult.health` (a device copy, no read)
    with a host label (the trainer's step number); :meth:`check` reads all stored
    values in one host read (:func:`xcent.sync.host_read`), together with any
    ``extra`` device values the caller wants at the same time (the step log's), and
    returns the label of the first unhealthy step, so that a divergence is still
    reported at the exact step. Under class sharding (``process_group``) every rank
    records the same steps and :meth:`check` is a collective: one all-reduce of the
    stored values agrees on them (a sum is finite iff every rank's value is).

    The trainer checks when :attr:`due` (``every`` steps recorded), on step-log steps
    (whose read carries the check) and at every epoch's end, before evaluating or
    saving: a checkpoint is only ever written after every step before it passed.
    """

    def __init__(self, every: int, device, process_group=None):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = int(every)
        self.values = torch.zeros(self.every, dtype=torch.float64, device=device)
        self.group = effective_group(process_group)
        self.labels: list = []

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def due(self) -> bool:
        """``every`` steps are recorded (the next :meth:`record` needs a :meth:`check`)."""
        return len(self.labels) >= self.every

    def record(self, health: Tensor, label) -> None:
        """Store one step's health (no sync); ``label`` names the step in :meth:`check`."""
        if self.due:
            raise RuntimeError(f"StepMonitor: {self.every} steps recorded and not checked")
        self.values[len(self.labels)].copy_(health)
        self.labels.append(label)

    def check(self, extra: Tensor | None = None):
        """``(label of the first unhealthy step or None, extra's values as a list)``:
        one host read (none when nothing is recorded and ``extra`` is None); then the
        record is empty. ``extra``: a 1-d device tensor read at the same time. Under
        class sharding every rank must call it at the same steps."""
        n = len(self.labels)
        recorded = self.values[:n]
        if n and self.group is not None:
            dist.all_reduce(recorded, group=self.group)
        if extra is None and not n:
            return None, []
        bad, values = self._read(recorded, extra)
        self.labels.clear()
        return bad, values

    def _read(self, recorded: Tensor, extra: Tensor | None):
        """One host read of ``recorded`` and ``extra``: (first unhealthy label, extra's values)."""
        n = recorded.shape[0]
        both = recorded if extra is None else torch.cat([recorded, extra.to(torch.float64).reshape(-1)])
        values = host_read(both)
        return next((label for label, v in zip(self.labels, values) if not math.isfinite(v)), None), values[n:]

    def peek(self, extra: Tensor | None = None):
        """:meth:`check` of this process's own recorded values, keeping the record (no
        collective: any one rank may call it): one host read, none when nothing is
        recorded. A non-finite value here is non-finite in :meth:`check` too."""
        n = len(self.labels)
        return self._read(self.values[:n], extra) if n else (None, [])

    def clear(self) -> None:
        """Forget the recorded steps unread (the state they describe was replaced)."""
        self.labels.clear()


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

    State: ``buf`` (C, D) when ``mu > 0`` (torch's buffer, on the weight's device; a
    step reads and writes only its K rows of it), ``last`` (C,) int64 and the step
    counter. ``last`` lives on the host, whatever the device: the rows a step touches
    are known there (:attr:`xcent.classifier.InBatch.host_rows`), so the catch-up
    powers ``A^k`` are picked on the host and copied over without reading the device
    (rows given only on the device cost one host read). After :meth:`flush` every row
    is current and ``last`` is all zero, so ``buf`` is the whole state worth saving.
    ``mu = lam = 0`` is plain SGD: nothing is stored and :meth:`step` is the one fused
    update of :func:`xcent.classifier.sparse_sgd_step`.
    """

    #: rows caught up per block in :meth:`flush` (bounds its temporaries)
    FLUSH_ROWS = 65536

    def __init__(self, num_rows: int, dim: int, momentum: float = 0.0, weight_decay: float = 0.0,
                 dtype: torch.dtype = torch.float32, device=None):
        if not 0.0 <= momentum < 1.0:  # NaN fails too
            raise ArgumentError(f"momentum must be in [0, 1), got {momentum}")
        if not 0.0 <= weight_decay < math.inf:
            raise ArgumentError(f"weight_decay must be >= 0 and finite, got {weight_decay}")
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.buf = torch.zeros(num_rows, dim, dtype=dtype, device=device) if self.momentum > 0 else None
        self.last = torch.zeros(num_rows, dtype=torch.long) if self.lazy else None  # on the host
        self.steps = 0
        self.lr: float | None = None
        self._powers = torch.eye(2, dtype=torch.float64)[None]  # (n, 2, 2): A^0 .. A^(n-1)

    @property
    def lazy(self) -> bool:
        """Whether untouched rows move at all (momentum or weight decay)."""
        return self.momentum > 0 or self.weight_decay > 0

    def to(self, device) -> LazySGD:
        """The buffer to ``device`` (``last`` stays on the host)."""
        if self.buf is not None:
            self.buf = self.buf.to(device)
        return self

    def _matrix(self, lr: float) -> Tensor:
        mu, lam = self.momentum, self.weight_decay
        return torch.tensor([[1.0 - lr * lam, -lr * mu], [lam, mu]], dtype=torch.float64)

    def _coefficients(self, k: Tensor) -> Tensor:
        """(n, 2, 2) float64 ``A^k`` for each entry of the host tensor ``k``, on the host."""
        need = int(k.max()) + 1 if k.numel() else 1
        if need > self._powers.shape[0]:
            A = self._matrix(self.lr)
            n = max(need, 2 * self._powers.shape[0])
            powers = [self._powers[i] for i in range(self._powers.shape[0])]
            while len(powers) < n:
                powers.append(A @ powers[-1])
            self._powers = torch.stack(powers)
        return self._powers[k]

    def _advance(self, w: Tensor, buf: Tensor | None, k: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(w, buf)`` of rows idle for ``k`` (host) steps, caught up (new tensors)."""
        P, = to_device(w.device, self._coefficients(k).to(w.dtype))
        a, b, c, d = (P[:, i, j, None] for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
        if buf is None:  # mu = 0: w_k = (1 - lr lam)^k w; there is no buffer to carry
            return a * w, None
        return a * w + b * buf, c * w + d * buf

    def current(self, weight: Tensor, rows: Tensor, rows_host: Tensor | None = None) -> Tensor:
        """The up-to-date values of ``weight[rows]`` (a new (K, D) tensor), written
        nowhere: what dense SGD's weight holds now. ``rows_host``: ``rows`` on the
        host (None: read from ``rows``, a sync when they are on a device)."""
        w = weight.index_select(0, rows)
        if not self.lazy or self.steps == 0:
            return w
        k = self.steps - self.last[to_host(rows) if rows_host is None else rows_host]
        buf = None if self.buf is None else self.buf.index_select(0, rows)
        return self._advance(w, buf, k)[0]

    def step(self, weight: Tensor, rows: Tensor, class_weight: Tensor, M: Tensor, x: Tensor, lr: float,
             rows_host: Tensor | None = None) -> Tensor:
        """One dense-equivalent SGD step on the rows ``rows`` of ``weight`` whose
        current values are ``class_weight`` (from :meth:`current`), with gradient
        ``M^T x``. Writes and returns the new (K, D) rows. ``rows_host``: as in
        :meth:`current`."""
        if not self.lazy:
            new_rows = torch.addmm(class_weight, M.T, x, alpha=-lr)
            weight.index_copy_(0, rows, new_rows)
            return new_rows
        if self.lr != lr:
            self.flush(weight)
            self.lr = lr
            self._powers = self._powers[:1]
        if rows_host is None:
            rows_host = to_host(rows)
        d = M.T @ x
        if self.weight_decay:
            d.add_(class_weight, alpha=self.weight_decay)
        if self.buf is not None:
            k = self.steps - self.last[rows_host]
            # A^k acts on the stored (stale) pair (w, buf), not on the caught-up w
            buf = self._advance(weight.index_select(0, rows), self.buf.index_select(0, rows), k)[1]
            d = buf.mul_(self.momentum).add_(d)
            self.buf.index_copy_(0, rows, d)
        new_rows = torch.add(class_weight, d, alpha=-lr)
        weight.index_copy_(0, rows, new_rows)
        self.steps += 1
        self.last.index_fill_(0, rows_host, self.steps)
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
