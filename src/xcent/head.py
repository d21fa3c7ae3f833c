"""``xcent.SparseSoftmaxHead``: the six algorithms as a classification head for a backbone.

Put it where a face recognizer or species classifier has its ``nn.Linear`` + cross-entropy
(InsightFace's Partial FC calling shape)::

    head = xcent.SparseSoftmaxHead(num_classes, dim, num_samples, algorithm="scent", epochs=E)
    opt = torch.optim.SGD(backbone.parameters(), lr=0.1)     # any optimizer, backbone only
    for epoch in range(1, E + 1):
        head.set_epoch(epoch)
        for x, labels, index in loader:                       # index: the rows' ids in 0..num_samples-1
            loss = head(backbone(x), labels, index)
            opt.zero_grad()
            loss.backward()          # the backbone gets d(surrogate)/d(embeddings); the head steps
            opt.step()

What a training forward + backward does, for a batch of B embeddings ``x_i``:

1. forward: gathers the K rows of the batch's distinct labels, builds the (B, K)
   in-batch relative logits, and runs the algorithm's dual update and gradient weights
   ``G = dL/dz`` (:mod:`xcent.losses`) **without writing anything**; returns the
   surrogate ``L``;
2. backward: ``dL/dx_i = sum_j G_ij (w_{U_j} - w_{y_i}) = (M W_U)_i`` with
   ``M = G``, ``M[i, pos(y_i)] = -sum_j G_ij``: one (B, K) x (K, D) product with the
   rows as they were at the forward (before the step); then the head takes exactly one
   step of the algorithm: the duals of ``index`` are written and the K rows move by
   ``M^T X`` (:class:`xcent.step.LazySGD`: plain SGD by default, exact sparse momentum
   and weight decay otherwise). No (C, D) gradient, no (B, C) temporary: memory and
   time per step do not depend on C.

Gradient accumulation (several forwards, then their backwards, e.g. one backward of
their sum): each backward takes its forward's step, in backward order; a forward
whose head changed in between (another step, ``set_epoch``, a load) is scored again
at its backward, so the steps are exactly the algorithm's sequential single steps,
while each ``dL/dx`` stays the gradient at the head its forward saw.

The head's step ignores the upstream gradient of the loss (a loss scaler's factor, or
a weight the user multiplies the loss by, scales ``embeddings.grad`` only): its lr is
its own. A forward under ``torch.no_grad()`` or in ``eval()`` mode changes nothing.

Class-sharded (``process_group``): rank r holds the rows of the contiguous classes
``class_range(C, r, P)`` (:mod:`xcent.distributed`); the embeddings, labels and
indices of all ranks are all-gathered; the step is :func:`xcent.step.train_step`'s
sharded in-batch scoring (one all-reduce of the (B, K) scores); in backward each rank
computes its rows' share of ``dL/dx`` for the whole gathered batch, the shares are
summed (all-reduce) and each rank keeps the rows it produced: the backward of the
all-gather. The duals are replicated. With a DDP backbone, note that DDP averages the
ranks' parameter gradients, i.e. the backbone receives ``1/P`` times the gradient of
the global-batch surrogate (as with Partial FC); scale its lr accordingly.

Divergence: each step's health is kept on the device, as the trainer's
(:func:`xcent.step.step_health`: a finite surrogate and finite new rows, no
saturated exponent) together with the trainer's divergence rule applied to the
batch (:func:`xcent.divergence.batch_ce_lower_bound`, a lower bound of the batch's
full-softmax cross-entropy, above ``10 x max(log C, 1)``), and read every
``check_every`` steps (:class:`xcent.step.StepMonitor`), at :meth:`set_epoch` and
before saving. A bad step raises :class:`xcent.errors.DivergenceError` naming the
step, the epoch and the lr; the head then refuses to train or be saved until a state
is loaded.

Host reads: the step needs the batch's labels and row ids on the host (the distinct
labels, which duals are set: see :mod:`xcent.sync`). Labels and index passed on the
CPU cost nothing; on the device they are read once per forward (one sync on CUDA; under
a process group, once after they are all-gathered). The health check reads one value
per step every ``check_every`` steps, all at once (one sync; under a process group
after one all-reduce), and at :meth:`set_epoch` and saving when steps are unread.
Nothing else in forward and backward reads the device.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .classifier import InBatch, init_weight, row_gradient_weights_, scan_classes
from .distributed import all_gather_rows, class_range
from .divergence import DIVERGENCE_FACTOR, batch_ce_lower_bound, divergence_bound
from .errors import ArgumentError, DivergenceError, UsageError
from .init import MAX_PROBE_ROWS, InitResult, probe_rows, scale_class_means_
from .losses import ALGORITHMS, build, get, resolve_hparams
from .modelio import check_finite
from .predict import TopK
from .step import LazySGD, StepMonitor, effective_group, sharded_in_batch, step_health
from .sync import to_host
from .train import lr_at

__all__ = ["SparseSoftmaxHead"]


_DONE = object()  # the end of an iterator (an item may be anything, None included)


@dataclass
class _Pending:
    """A forward's step, applied by the backward."""

    batch: InBatch | None  # None: skipped (one distinct label)
    M: Tensor | None
    labels: Tensor  # host, the global batch's
    index: Tensor  # host
    nu_new: Tensor | None
    row_offset: int  # first row of this rank's embeddings in the gathered batch
    num_local: int
    version: int  # the head's state version the forward saw (SparseSoftmaxHead._version)
    value: Tensor | None = None  # the algorithm's surrogate and overflow flag at the forward
    overflow: Tensor | None = None
    applied: bool = False


class _HeadFunction(torch.autograd.Function):
    """Value: the surrogate. Backward: ``dL/dx`` at the head before the step, then the step."""

    @staticmethod
    def forward(ctx, anchor, embeddings, head, pending, value):
        ctx.head, ctx.pending, ctx.dtype = head, pending, embeddings.dtype
        return value

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.pending.applied:
            raise RuntimeError("SparseSoftmaxHead: backward ran twice through one forward; the head "
                               "steps once per forward (do not use retain_graph=True through it)")
        dx = _take_step(ctx.head, ctx.pending)
        dx = dx.mul_(grad_out.to(dx.dtype)).to(ctx.dtype)
        return None, dx, None, None, None


class SparseSoftmaxHead(nn.Module):
    """A C-class softmax head trained by one of the six algorithms, touching K rows a step.

    ``num_classes`` C, ``dim`` D (the embeddings' width), ``num_samples`` N (the number
    of training rows; ``index`` passed to :meth:`forward` are their ids, the duals'
    rows). ``algorithm``: scent, sox, bsgd, asgd, softplus or umax; ``lr``: the head's
    own base lr (None: the algorithm's tuned default); ``epochs`` E: the length of
    the per-epoch cosine lr (and of the dual schedules). ``momentum``, ``weight_decay``:
    as ``torch.optim.SGD`` applied densely to all C rows, computed exactly and sparsely
    (:class:`xcent.step.LazySGD`); 0 by default, i.e. the algorithm's own update.
    ``dtype``: the head's arithmetic (float32; float64 for tests); embeddings of any
    float dtype (autocast bf16/fp16) are cast to it and their gradient is returned in
    their dtype. ``process_group``: class-sharded over its ranks (None: one process).
    ``hparams``: ``gamma``, ``rho``, ``delta`` as in :func:`xcent.losses.build`;
    ``init_seed``: the weight's N(0, 0.01^2) initialisation (:func:`xcent.classifier.init_weight`).
    ``check_every``: the steps between two reads of the steps' health (one host read
    each, a sync on CUDA; see the module docstring): a divergence is reported naming
    its exact step whatever the interval, only up to ``check_every - 1`` steps later.

    Bad arguments (here, to :meth:`forward`, :meth:`set_epoch`, :meth:`topk`,
    :meth:`init_class_means_`) raise :class:`xcent.errors.ArgumentError`, a ValueError
    naming the argument: a count, an id or an epoch must be an integer (a float is
    never truncated), ids must be in range (a negative one never wraps around).

    State (``state_dict``): ``weight`` (this rank's rows), ``momentum_buffer`` (when
    momentum > 0), ``loss_fn.nu`` / ``loss_fn.nu_set`` (the duals), the epoch, and the
    algorithm, its hyper-parameters (:attr:`hparams`) and the class rows, which loading
    requires to match (ArgumentError before anything is copied: one algorithm's duals
    are not another's); saving first brings every row up to date, so that loading
    resumes exactly.
    """

    def __init__(self, num_classes: int, dim: int, num_samples: int, algorithm: str = "scent",
                 lr: float | None = None, epochs: int = 1, momentum: float = 0.0, weight_decay: float = 0.0,
                 dtype: torch.dtype = torch.float32, device=None, process_group=None, init_seed: int = 0,
                 check_every: int = 100, **hparams):
        super().__init__()
        num_classes, dim = _integer("num_classes", num_classes, 2), _integer("dim", dim, 1)
        num_samples, epochs = _integer("num_samples", num_samples, 1), _integer("epochs", epochs, 1)
        init_seed, check_every = _integer("init_seed", init_seed), _integer("check_every", check_every, 1)
        if not isinstance(algorithm, str):
            raise ArgumentError(f"algorithm must be a name (one of {', '.join(ALGORITHMS)}), got {algorithm!r}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ArgumentError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.algorithm = algorithm.lower()
        self.loss_fn = build(self.algorithm, num_samples, dtype=dtype, epochs=epochs, **hparams)
        #: the algorithm's hyper-parameters by config key (given or tuned defaults), saved in the state
        resolved = resolve_hparams(self.algorithm, hparams)
        self.hparams = {p.key: resolved[p.key] for p in get(self.algorithm).parameters if p.argument}
        if device is not None:
            self.loss_fn.to(device)
        self.num_classes, self.dim, self.num_samples = num_classes, dim, num_samples
        self.base_lr = get(self.algorithm).lr if lr is None else _positive("lr", lr)
        self.epochs = epochs
        self.process_group = effective_group(process_group)
        if self.process_group is None:
            self.rank, self.world_size = 0, 1
        else:
            self.rank, self.world_size = dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
            if num_classes < self.world_size:
                raise ArgumentError(f"{self.world_size} processes need at least as many classes, got {num_classes}")
        self.lo, self.hi = class_range(num_classes, self.rank, self.world_size)
        self.register_buffer("weight", init_weight(num_classes, dim, init_seed, device or "cpu", dtype,
                                                   rows=(self.lo, self.hi)))
        self.optimizer = LazySGD(self.hi - self.lo, dim, momentum, weight_decay, dtype, self.weight.device)
        if self.optimizer.buf is not None:
            self.register_buffer("momentum_buffer", self.optimizer.buf)
        self.epoch: int | None = None
        self.skipped_steps = 0
        # bumped by every change of the training state (a step, a new epoch, a load):
        # a forward whose version is stale at its backward is scored again there
        self._version = 0
        # the schedule-dependent algorithms (sox, asgd, softplus, umax) read the epoch
        self._needs_epoch = bool(self.loss_fn.scheduled)
        #: steps taken (skipped batches not counted; saved in the state): the step a divergence names
        self.steps = 0
        # each step's health (xcent.step.step_health) and batch CE bound, read every check_every steps
        self.check_every = check_every
        self._monitor = StepMonitor(check_every, self.weight.device, self.process_group)
        self._batch_ce = torch.zeros(check_every, dtype=torch.float64, device=self.weight.device)
        self._diverged: str | None = None  # the divergence message, once a check failed

    # ------------------------------------------------------------------ schedule

    @property
    def lr(self) -> float:
        """The current epoch's lr (epoch 1's before :meth:`set_epoch`)."""
        return lr_at(self.epoch or 1, self.epochs, self.base_lr)

    def set_epoch(self, epoch: int) -> None:
        """Start 1-based ``epoch``: the previous epoch's rows are brought up to date
        (momentum / weight decay), then the lr and the dual schedule follow ``epoch``.
        ``epoch``: an integer in ``[1, epochs]`` (ArgumentError otherwise: 1.7 is not
        an epoch)."""
        epoch = _integer("epoch", epoch, 1, self.epochs)
        self.check()  # every step of the epoch healthy before the next one starts
        self.flush()
        self.epoch = epoch
        self._version += 1  # the lr and dual schedule: a forward's step pending across it is redone
        self.loss_fn.set_epoch(self.epoch, self.epochs)

    @torch.no_grad()
    def flush(self) -> None:
        """Bring every row up to date (a no-op without momentum and weight decay):
        done by :meth:`set_epoch`, :meth:`eval`, :meth:`logits`, :meth:`topk` and saving."""
        self.optimizer.flush(self.weight)

    # ------------------------------------------------------------------ health

    def check(self) -> None:
        """Read the health of the steps taken since the last check now and raise
        :class:`xcent.errors.DivergenceError` naming the first bad one. Done every
        ``check_every`` steps and by :meth:`set_epoch`; one host read (none when no step
        is unread). Class-sharded: a collective (one all-reduce of the recorded
        values), called by every rank at the same point."""
        n = len(self._monitor)
        bad, ce = self._monitor.check(self._batch_ce[:n] if n else None)
        if bad is not None:
            self._diverge(bad, ce)

    def _record(self, health: Tensor, batch_ce: Tensor) -> None:
        """Keep one step's health and batch CE bound on the device (no read); check when due."""
        self.steps += 1
        slot = len(self._monitor)
        self._batch_ce[slot].copy_(batch_ce)
        self._monitor.record(health, (self.steps, self.epoch, self.lr, slot))
        if self._monitor.due:
            self.check()

    def _diverge(self, label: tuple, batch_ce: list) -> None:
        step, epoch, lr, slot = label
        ce, bound = batch_ce[slot], divergence_bound(self.num_classes)
        if math.isfinite(ce) and ce > bound:
            why = (f"the batch's CE is at least {ce:.3g} > {bound:.3g} ({DIVERGENCE_FACTOR:g} x max(log C, 1), "
                   f"log C = {math.log(self.num_classes):.3g})")
        elif not math.isfinite(ce):
            why = "non-finite in-batch logits (NaN or inf in the embeddings or the rows)"
        else:
            why = "non-finite surrogate or rows, or an exponent out of the dtype's range"
        self._diverged = (f"SparseSoftmaxHead diverged at step {step} (epoch {epoch}, {self.algorithm}, lr {lr:.4g}): "
                          f"{why}; lower the head's lr or check the embeddings. Its rows and duals are no longer "
                          "usable: load a saved state_dict (or init_class_means_) to go on")
        raise DivergenceError(self._diverged)

    def train(self, mode: bool = True):
        if not mode:
            self.flush()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        # ``.to()`` / ``.cuda()`` replace the buffers: keep the optimizer's views on them
        out = super()._apply(fn, *args, **kwargs)
        self.optimizer.buf = self._buffers.get("momentum_buffer")
        self.optimizer.to(self.weight.device)
        self._monitor.values = self._monitor.values.to(self.weight.device)  # float64 whatever the head's dtype
        self._batch_ce = self._batch_ce.to(self.weight.device)
        return out

    # ------------------------------------------------------------------ state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # a diverged head is never saved: the steps not yet checked are read first (this
        # rank's values, no collective: one host read when steps are unread)
        n = len(self._monitor)
        bad, ce = self._monitor.peek(self._batch_ce[:n] if n else None)
        if bad is not None:  # kept recorded: the next collective check finds it on every rank
            self._diverge(bad, ce)
        if self._diverged is not None:
            raise DivergenceError(self._diverged)
        self.flush()  # every row current: the saved state needs no per-row step counters
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def get_extra_state(self) -> Any:
        return {"epoch": self.epoch, "skipped_steps": self.skipped_steps, "steps": self.steps, **self._identity()}

    def _identity(self) -> dict:
        """What a saved state must agree on to be loaded here: the algorithm and its
        hyper-parameters (they give the duals their meaning) and the class rows."""
        return {"algorithm": self.algorithm, "hparams": dict(self.hparams), "num_classes": self.num_classes,
                "rows": [self.lo, self.hi]}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checked before anything is copied (this module's tensors here, loss_fn's after):
        # a refused state leaves the head as it was
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None and (problem := self._state_problem(extra)):
            raise ArgumentError(f"load_state_dict: {problem}")
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, Tensor) and weight.is_floating_point():
            try:  # a diverged head's state: NaN would rank first in topk
                check_finite(weight, prefix + "weight", "load_state_dict")
            except UsageError as exc:
                raise ArgumentError(str(exc)) from None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _state_problem(self, extra: Any) -> str:
        """Why a saved head's extra state cannot be loaded into this head ('' when it can).
        States saved before the algorithm was recorded carry no identity: accepted."""
        if not isinstance(extra, dict) or "epoch" not in extra or "skipped_steps" not in extra:
            return "the state's _extra_state is not a SparseSoftmaxHead's"
        epoch = extra["epoch"]
        if epoch is not None and not (isinstance(epoch, int) and 1 <= epoch <= self.epochs):
            return f"the state is at epoch {epoch!r}, outside this head's [1, {self.epochs}] (epochs={self.epochs})"
        if "algorithm" not in extra:
            return ""
        mine = self._identity()
        if extra["algorithm"] != mine["algorithm"]:
            return (f"the state was saved by a {extra['algorithm']} head, this head runs {mine['algorithm']} "
                    "(their duals mean different things)")
        changed = [f"{k} {extra['hparams'].get(k)} (state) vs {v} (this head)"
                   for k, v in mine["hparams"].items() if extra["hparams"].get(k) != v]
        if changed:
            return f"{mine['algorithm']}'s hyper-parameters differ: " + ", ".join(changed)
        if extra["num_classes"] != mine["num_classes"] or list(extra["rows"]) != mine["rows"]:
            lo, hi = extra["rows"]
            return (f"the state holds rows {lo}..{hi - 1} of {extra['num_classes']} classes, this head rows "
                    f"{self.lo}..{self.hi - 1} of {self.num_classes} (load each rank's state into the same "
                    "rank of a head with the same classes and number of processes)")
        return ""

    def set_extra_state(self, state: Any) -> None:
        # the loaded rows were saved current (saving flushes): no catch-up is owed
        self.optimizer.mark_current()
        self._version += 1
        self._monitor.clear()  # the unread steps' rows are gone, and so is a divergence
        self._diverged = None
        self.epoch, self.skipped_steps = state["epoch"], int(state["skipped_steps"])
        self.steps = int(state.get("steps", 0))
        if self.epoch is not None:
            self.loss_fn.set_epoch(self.epoch, self.epochs)

    # ------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def init_class_means_(self, batches: Iterable[tuple[Tensor, Tensor]], probe_size: int = MAX_PROBE_ROWS
                          ) -> InitResult:
        """Set the weight to the class-mean classifier of ``batches`` (:mod:`xcent.init`):
        ``w_c = s * m_c / |m_c|``, ``m_c`` the mean of the embeddings of class c (zero
        for a class without any), ``s`` minimising the full-softmax CE of rows held out
        of the means while it is searched. Returns the :class:`xcent.init.InitResult`:
        the scale, and the CE / top-1 / top-5 it gives on the held-out rows.

        ``batches``: an iterable of ``(embeddings, labels)``, (B, D) floats of any dtype
        and device and (B,) integer class ids, read once (typically the backbone run
        over the training data under ``torch.no_grad()``). The sums go straight into
        the weight's rows (``index_add_``, batch by batch: no N x D copy). Held out:
        the rows at the stream positions :func:`xcent.init.probe_rows` picks for
        ``num_samples`` rows and a regular ``probe_size`` subset (every k-th row, at
        most 20% of the rows, ``probe_size`` and :data:`xcent.init.MAX_PROBE_ROWS`
        (4,096): one scale needs no more), kept in memory; they join the means
        once the scale is chosen.

        Class-sharded: a collective; each rank passes its own part of the data (a
        ``DistributedSampler``'s, any number of batches per rank); every batch is
        all-gathered (rank order), each rank sums the rows of its own classes, and
        the held-out rows, the search and every error are the same on every rank.

        Resets the training state: the momentum buffer to zero, every dual to unset
        (each row's next visit estimates it afresh, as in a new head); the epoch and
        the lr schedule are left alone. Raises ArgumentError (a ValueError; on every rank) on a
        batch that is not ``(B, D)`` embeddings with ``(B,)`` integer labels in
        ``[0, num_classes)``, on non-finite embeddings, or when ``batches`` gives no
        rows; the weight then holds a partial sum (call again with good data)."""
        probe_size = _integer("probe_size", probe_size, 1)
        n = self.num_samples
        held = probe_rows(n, None if probe_size >= n else torch.arange(0, n, math.ceil(n / probe_size)))
        weight, device = self.weight, self.weight.device
        weight.zero_()
        counts = torch.zeros(weight.shape[0], dtype=torch.long, device=device)
        probe_x, probe_y, position = [], [], 0
        batches = iter(batches)
        while True:
            x, y = self._init_batch(batches)
            if x is None:
                break
            is_held = torch.isin(torch.arange(position, position + x.shape[0]), held).to(device)
            position += x.shape[0]
            own = (y >= self.lo) & (y < self.hi)
            counts.index_add_(0, y[own] - self.lo, torch.ones_like(y[own]))
            summed = own & ~is_held
            weight.index_add_(0, y[summed] - self.lo, x[summed])
            probe_x.append(x[is_held])
            probe_y.append(y[is_held])
        if position == 0:
            raise ArgumentError("init_class_means_: batches gave no rows")
        if self.optimizer.buf is not None:
            self.optimizer.buf.zero_()
        self.optimizer.mark_current()  # the old rows' pending catch-up belongs to a weight that is gone
        self._version += 1
        self._monitor.clear()
        self._diverged = None
        self.loss_fn.nu.fill_(float("nan"))
        self.loss_fn.nu_set.zero_()
        return scale_class_means_(weight, counts, torch.cat(probe_x), torch.cat(probe_y), self.lo,
                                  self.process_group)

    def _init_batch(self, batches) -> tuple[Tensor | None, Tensor | None]:
        """The next ``(embeddings, labels)`` of ``batches``, checked and, class-sharded,
        all-gathered over the ranks; ``(None, None)`` when every rank's are done."""
        problem, x, y = "", None, None
        item = next(batches, _DONE)
        done = item is _DONE
        if not done:
            try:
                x, y = item
            except (TypeError, ValueError):
                problem = "batches must give (embeddings, labels) pairs"
            else:
                problem = self._check_init_batch(x, y)
        if not problem and x is not None:
            x = x.detach().to(device=self.weight.device, dtype=self.weight.dtype)
            y = y.detach().to(device=self.weight.device, dtype=torch.long)
        if self.process_group is None:
            if problem:
                raise ArgumentError(f"init_class_means_: {problem}")
            return x, y
        # one header per rank: rows, failed, done; every rank then takes the same decision
        rows = 0 if x is None or problem else x.shape[0]
        header = torch.tensor([rows, bool(problem), done], dtype=torch.long, device=self.weight.device)
        headers = [torch.empty_like(header) for _ in range(self.world_size)]
        dist.all_gather(headers, header, group=self.process_group)
        failed = [r for r, h in enumerate(headers) if int(h[1])]
        if failed:
            ranks = ", ".join(map(str, failed))
            raise ArgumentError(f"init_class_means_: {problem} (rank {self.rank})" if problem else
                             f"init_class_means_: rank {ranks} passed a bad batch (its error says what)")
        if all(int(h[2]) for h in headers):
            return None, None
        sizes = [int(h[0]) for h in headers]
        if x is None:
            x = torch.zeros(0, self.dim, dtype=self.weight.dtype, device=self.weight.device)
            y = torch.zeros(0, dtype=torch.long, device=self.weight.device)
        if sum(sizes) == 0:  # every rank's batch was empty: nothing to gather
            return x, y
        return all_gather_rows(x, sizes, self.process_group), all_gather_rows(y, sizes, self.process_group)

    def _check_init_batch(self, x, y) -> str:
        """What is wrong with one ``(embeddings, labels)`` batch ('' when nothing)."""
        if not (torch.is_tensor(x) and torch.is_tensor(y)):
            return "batches must give (embeddings, labels) tensors"
        if x.dim() != 2 or x.shape[1] != self.dim or not x.is_floating_point():
            return f"embeddings must be (B, {self.dim}) floats, got {tuple(x.shape)} {x.dtype}"
        if y.shape != x.shape[:1] or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            return f"labels must be ({x.shape[0]},) integer class ids, got {tuple(y.shape)} {y.dtype}"
        if y.numel() and bool(((y < 0) | (y >= self.num_classes)).any()):
            return f"labels must be class ids in [0, {self.num_classes}), got {int(y.min())}..{int(y.max())}"
        if not bool(torch.isfinite(x).all()):
            return "embeddings must be finite (found NaN or inf)"
        return ""

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def logits(self, embeddings: Tensor) -> Tensor:
        """Full scores ``w_c . x_i`` over all C classes, (B, C) in the head's dtype.

        Class-sharded: a collective (every rank calls it with its own embeddings and
        gets its rows' (B_r, C) scores; the blocks are assembled by all-gathers).
        For large C prefer :meth:`topk`, which never builds (B, C)."""
        problem = self._check_embeddings(embeddings)
        if self.process_group is None and problem:
            raise ArgumentError(problem)
        self.flush()
        x = None if problem else embeddings.detach().to(device=self.weight.device, dtype=self.weight.dtype)
        if self.process_group is None:
            return x @ self.weight.T
        x, _, _, offset, _ = self._gather(x, problem=problem)
        blocks = all_gather_rows((x @ self.weight.T).T.contiguous(), self._shard_sizes(), self.process_group)
        return blocks.T[offset:offset + embeddings.shape[0]]

    @torch.no_grad()
    def topk(self, embeddings: Tensor, k: int = 5, class_chunk: int = 16384) -> TopK:
        """``TopK(ids, probs)`` (B, k): the k best classes of each embedding and their
        softmax probabilities over all C classes, computed class chunk by chunk with
        :func:`xcent.classifier.scan_classes` (memory: one (B, class_chunk) block).
        Class-sharded: a collective; each rank scores its classes and the per-rank
        top-k and log-normalisers are merged."""
        k, class_chunk = _integer("k", k, 1, self.num_classes), _integer("class_chunk", class_chunk, 1)
        problem = self._check_embeddings(embeddings)
        if self.process_group is None and problem:
            raise ArgumentError(problem)
        self.flush()
        x = None if problem else embeddings.detach().to(device=self.weight.device, dtype=self.weight.dtype)
        if self.process_group is None:
            scan = scan_classes(x, self.weight, k=k, class_chunk=class_chunk)
            _refuse_nonfinite_scores(scan.lse)
            return TopK(scan.top_ids, torch.exp(scan.top_scores - scan.lse[:, None]))
        x, _, _, offset, _ = self._gather(x, problem=problem)
        scan = scan_classes(x, self.weight, k=k, class_chunk=class_chunk, class_offset=self.lo)
        scores, lse = scan.top_scores, scan.lse
        pad = k - scores.shape[1]  # a shard with fewer than k classes
        scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
        ids = torch.nn.functional.pad(scan.top_ids, (0, pad), value=-1)
        parts = [torch.empty_like(t) for t in (scores, ids, lse) for _ in range(self.world_size)]
        P = self.world_size
        dist.all_gather(parts[:P], scores, group=self.process_group)
        dist.all_gather(parts[P:2 * P], ids, group=self.process_group)
        dist.all_gather(parts[2 * P:], lse, group=self.process_group)
        best, pos = torch.cat(parts[:P], 1).topk(k, dim=1)
        best_ids = torch.cat(parts[P:2 * P], 1).gather(1, pos)
        lse = torch.logsumexp(torch.stack(parts[2 * P:]), dim=0)
        rows = slice(offset, offset + embeddings.shape[0])
        _refuse_nonfinite_scores(lse[rows])
        return TopK(best_ids[rows], torch.exp(best - lse[:, None])[rows])

    def _shard_sizes(self) -> list[int]:
        ranges = (class_range(self.num_classes, r, self.world_size) for r in range(self.world_size))
        return [hi - lo for lo, hi in ranges]

    # ------------------------------------------------------------------ training

    def forward(self, embeddings: Tensor, labels: Tensor, index: Tensor) -> Tensor:
        """The algorithm's surrogate on the batch (a 0-dim tensor in the head's dtype).

        ``embeddings`` (B, D) floats, ``labels`` (B,) integer class ids in 0..C-1,
        ``index`` (B,) integer row ids in 0..N-1. In training mode with autograd
        recording, ``loss.backward()`` gives ``embeddings`` the surrogate's gradient
        (at the head as this forward saw it) and then applies the step. Otherwise
        nothing changes. Raises :class:`xcent.errors.ArgumentError` (a ValueError)
        naming the argument for anything else: float or bool labels or index (never
        truncated), a label or row id out of range (negative ones included: they
        would wrap around), a wrong shape. The ranges are checked on the host copies
        of labels and index that the step needs anyway: no device read, and on CUDA a
        clear error instead of a device-side assert. Class-sharded, every rank raises
        (the rank with the bad batch says what is wrong; the others name it)."""
        problem = self._check_embeddings(embeddings) or self._check_ids(embeddings, labels, index)
        if self.process_group is None and problem:
            raise ArgumentError(problem)
        if self._needs_epoch and self.epoch is None:
            raise RuntimeError(f"SparseSoftmaxHead: {self.algorithm}'s dual schedule follows the epoch; "
                               "call head.set_epoch(epoch) before the first step")
        if self._diverged is not None and self.training and torch.is_grad_enabled():
            raise DivergenceError(self._diverged)
        with torch.autocast(embeddings.device.type if torch.is_tensor(embeddings) else "cpu", enabled=False):
            pending, value = self._prepare(embeddings, labels, index, problem)
        if not (self.training and torch.is_grad_enabled()):
            return value
        anchor = torch.zeros((), requires_grad=True)  # so that backward runs with a frozen backbone too
        return _HeadFunction.apply(anchor, embeddings, self, pending, value)

    def _check_embeddings(self, embeddings) -> str:
        """What is wrong with ``embeddings`` ('' when nothing): its shape and dtype only."""
        if not torch.is_tensor(embeddings):
            return f"embeddings must be a (B, {self.dim}) tensor, got {type(embeddings).__name__}"
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim or not embeddings.is_floating_point():
            return f"embeddings must be (B, {self.dim}) floats, got {tuple(embeddings.shape)} {embeddings.dtype}"
        return ""

    @staticmethod
    def _check_ids(embeddings: Tensor, labels, index) -> str:
        """What is wrong with the types and shapes of ``labels`` and ``index`` ('' when
        nothing); their values are checked on the host (:meth:`_range_problem`)."""
        B = embeddings.shape[0]
        for name, ids, what in (("labels", labels, "class ids"), ("index", index, "row ids")):
            if not torch.is_tensor(ids):
                return f"{name} must be a ({B},) tensor of integer {what}, got {type(ids).__name__}"
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                return f"{name} must be integer {what}, got {ids.dtype} (a float or bool is never taken for an id)"
            if ids.shape != (B,):
                return f"{name} must be ({B},) like the embeddings' rows, got {tuple(ids.shape)}"
        return ""

    def _range_problem(self, labels: Tensor, index: Tensor, sizes: list[int]) -> str:
        """What is out of range in the host ``labels`` and ``index`` of the (gathered)
        batch ('' when nothing); ``sizes``: each rank's rows, to name the rank."""
        for name, ids, high, what in (("labels", labels, self.num_classes, "class ids"),
                                      ("index", index, self.num_samples, "row ids")):
            if not ids.numel():
                continue
            low_id, high_id = torch.aminmax(ids)  # one pass; the details only on failure
            if int(low_id) < 0 or int(high_id) >= high:
                bad = (ids < 0) | (ids >= high)
                first = int(bad.to(torch.uint8).argmax())
                where = f"{int(bad.sum())} outside it, e.g. {int(ids[first])}"
                if len(sizes) > 1:
                    rank = next(r for r in range(len(sizes)) if first < sum(sizes[:r + 1]))
                    first -= sum(sizes[:rank])
                    where += f" at position {first} of rank {rank}'s batch"
                else:
                    where += f" at position {first}"
                return f"{name} must be {what} in [0, {high}), got {where}"
        return ""

    @torch.no_grad()
    def _gather(self, x: Tensor | None, labels: Tensor | None = None, index: Tensor | None = None,
                problem: str = ""):
        """The global batch of all ranks: ``(x, labels, index, row_offset, sizes)``
        (labels and index only when given). ``problem``: what is wrong with this rank's
        inputs ('' when nothing; then ``x`` may be None); it travels with the row
        counts, so that every rank raises together instead of waiting for the others."""
        if self.process_group is None:
            return x, labels, index, 0, [x.shape[0]]
        n = torch.tensor([0 if problem else x.shape[0], bool(problem)], device=self.weight.device)
        headers = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(headers, n, group=self.process_group)
        failed = [r for r, h in enumerate(headers) if int(h[1])]
        if failed:
            raise ArgumentError(f"{problem} (rank {self.rank})" if problem else
                                f"rank {', '.join(map(str, failed))} passed a bad batch (its error says what)")
        sizes = [int(h[0]) for h in headers]
        offset = sum(sizes[:self.rank])
        x = all_gather_rows(x, sizes, self.process_group)
        if labels is None:
            return x, None, None, offset, sizes
        ids = all_gather_rows(torch.stack([labels.to(x.device, torch.long), index.to(x.device, torch.long)], 1),
                              sizes, self.process_group)
        return x, ids[:, 0], ids[:, 1], offset, sizes

    @torch.no_grad()
    def _prepare(self, embeddings: Tensor, labels: Tensor, index: Tensor, problem: str = ""
                 ) -> tuple[_Pending, Tensor]:
        """Everything of the step except its writes: ``(pending, surrogate)``."""
        x = None if problem else embeddings.detach().to(device=self.weight.device, dtype=self.weight.dtype)
        num_local = 0 if problem else x.shape[0]
        sizes = [num_local]
        if self.process_group is not None:  # all-gathered on the device (the collective's), then read once
            if problem:
                self._gather(None, problem=problem)  # raises on every rank
            x, labels, index, offset, sizes = self._gather(x, labels.to(x.device), index.to(x.device))
        else:
            offset = 0
        labels, index = _ids_to_host(labels, index)
        if problem := self._range_problem(labels, index, sizes):  # the same on every rank: all raise
            raise ArgumentError(problem)
        loss_fn = self.loss_fn
        index_dev = index.to(loss_fn.nu.device, non_blocking=True)
        nu_old, set_old = loss_fn.nu[index_dev].clone(), loss_fn.visited(index).clone()
        batch, M = self._score(x, labels, index)
        if M is None:
            zero = torch.zeros((), dtype=self.weight.dtype, device=self.weight.device)
            return _Pending(None, None, labels, index, None, offset, num_local, self._version), zero
        value = loss_fn.value
        nu_new = loss_fn.nu[index_dev].clone() if bool(loss_fn.visited(index).any()) else None
        # undo the dual writes: they belong to the backward (a forward changes nothing);
        # a repeated index has one old value, so the restore is exact
        loss_fn.write_duals(index, nu_old, set_old)
        return _Pending(batch, M, labels, index, nu_new, offset, num_local, self._version, value,
                        loss_fn.overflow), value

    def _score(self, x: Tensor, labels: Tensor, index: Tensor) -> tuple[InBatch, Tensor | None]:
        """The batch scored against the head's rows as they are now, and the algorithm's
        dual update (written) and row gradient weights ``M`` (None when the batch has one
        distinct label: nothing is written). ``x`` the (gathered) embeddings in the
        head's dtype, ``labels`` and ``index`` on the host."""
        batch = sharded_in_batch(x, labels, self.weight, self.lo, self.process_group,
                                 read_rows=self.optimizer.current)
        if batch.num_distinct < 2:
            return batch, None
        return batch, row_gradient_weights_(batch.label_pos, self.loss_fn.weights(batch.logits, index))


def _refuse_nonfinite_scores(lse: Tensor) -> None:
    """``topk``'s check: a row whose log-normaliser is not finite has a NaN or an
    overflowing score (the embeddings are checked finite, so the head's weight or the
    product is at fault), which ``torch.topk`` would rank first with probability NaN."""
    bad = ~torch.isfinite(lse)
    if bool(bad.any()):
        raise RuntimeError(f"SparseSoftmaxHead.topk: the scores of embedding row {int(bad.nonzero()[0, 0])} are "
                           "not finite (the head's weight holds NaN or inf, or the scores overflow float32)")


def _integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int, or :class:`xcent.errors.ArgumentError` naming ``name``: a
    float (2.0 included: an epoch, a count or an id is never truncated) or a bool is
    refused, as is a value outside ``[low, high]``."""
    try:
        if isinstance(value, bool) or (torch.is_tensor(value) and value.dtype == torch.bool):
            raise TypeError
        number = operator.index(value)
    except (TypeError, ValueError, RuntimeError):
        raise ArgumentError(f"{name} must be an integer, got {value!r}") from None
    if (low is not None and number < low) or (high is not None and number > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ArgumentError(f"{name} must be {span}, got {number}")
    return number


def _positive(name: str, value) -> float:
    """``value`` as a finite float > 0, or ArgumentError naming ``name``."""
    try:
        if isinstance(value, (bool, str)):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ArgumentError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise ArgumentError(f"{name} must be > 0 and finite, got {number:g}")
    return number


def _ids_to_host(labels: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Labels and index (int64) on the host: one read when both are on one device."""
    if labels.device == index.device and labels.device.type != "cpu":
        return to_host(torch.stack([labels.to(torch.long), index.to(torch.long)])).unbind(0)
    return to_host(labels).to(torch.long), to_host(index).to(torch.long)


def _take_step(head: SparseSoftmaxHead, pending: _Pending) -> Tensor:
    """The backward: ``dL/dx`` for this rank's embeddings (at the rows of the forward),
    then the step (duals, K rows). Returns (B_local, D) in the head's dtype.

    When the head's state changed since the forward (another forward's backward ran
    first: gradient accumulation; or ``set_epoch``, a load), the step is the
    algorithm's step on this batch at the head as it is now: scored and its duals
    updated afresh (one more in-batch scoring), so that the steps of several pending
    forwards compose as sequential single steps in backward order. ``dL/dx`` stays
    the gradient at the rows the forward saw (what it returned the value of)."""
    pending.applied = True
    batch = pending.batch
    if batch is None:
        head.skipped_steps += 1
        return torch.zeros(pending.num_local, head.dim, dtype=head.weight.dtype, device=head.weight.device)
    with torch.no_grad():
        M = pending.M[:, batch.owned]
        dx = M @ batch.class_weight  # this rank's rows' share, (B_global, D)
        if head.process_group is not None:
            dist.all_reduce(dx, group=head.process_group)
            dx = dx[pending.row_offset:pending.row_offset + pending.num_local]
        stale = pending.version != head._version  # the same on every rank: they take the same steps
        outcome = pending  # the surrogate and overflow flag of the scoring the step follows
        if stale:  # the step at the head as it is now (duals written by _score)
            batch, M = head._score(batch.features, pending.labels, pending.index)
            M, outcome = M[:, batch.owned], head.loss_fn
        new_rows = head.optimizer.step(head.weight, batch.local_rows, batch.class_weight, M, batch.features,
                                       head.lr, rows_host=batch.host_rows)
        if not stale and pending.nu_new is not None:
            head.loss_fn.write_duals(pending.index, pending.nu_new, True)
        head._version += 1
        ce = batch_ce_lower_bound(batch.logits)  # the divergence rule (xcent.divergence)
        head._record(step_health(outcome, new_rows, ce, head.num_classes), ce)
    return dx
