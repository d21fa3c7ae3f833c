"""Class-mean initialisation: a training-free classifier to start from.

The nearest-class-mean classifier is strong on data with few rows per class, where
a randomly initialised linear model learns little in a few epochs. Its weight is

    w_c = s * m_c / |m_c|,    m_c = mean of the training rows of class c

(``w_c = 0`` for a class without training rows), with one scale ``s`` shared by all
classes and chosen to minimise the full-softmax cross-entropy on a fixed subset of
training rows. That CE is convex in ``s`` (a log-sum-exp of functions linear in
``s``, minus a linear one), hence unimodal in ``log s``; and since the logits of
``s W`` on ``x`` are ``s`` times those of ``W``, one GEMM per logit block serves every
candidate scale. So the search (:func:`search_scale`) evaluates a log-spaced grid of
scales over the whole bracket in one pass over the classes, a finer grid around the
best in a second, and takes the vertex of a parabola in ``log s`` (or the dual
floor's crossing); a third pass gives the CE / top-1 at the chosen scale.

Cost: one streaming pass over the memory-mapped training split (chunked
``index_add_`` into the (C, D) weight itself: no N x D copy, no second C x D buffer)
and three GEMM passes of at most :data:`MAX_PROBE_ROWS` held-out rows against the C
unit means (``3 * 2 * n * C * D`` flops; at Glint360K's C = 360,232, D = 512 and
4,096 rows, ~4.5 TFLOP, against ~160 TFLOP for the 22 float64 golden-section probes
of 20,000 rows this replaced; docs/own-data.md has the measured times), plus per
logit block one float64 ``exp`` pass per grid scale (37 in all). Under torchrun
every rank sums only the rows of its own classes (selected from the in-memory
labels, so each rank reads about 1/P of the file) and the grid statistics of its
own classes, combined over the ranks (:func:`scale_grid_stats`); every rank then
takes the same search decisions, since the gathered statistics are identical on
every rank. :meth:`xcent.SparseSoftmaxHead.init_class_means_` streams a user's
``(embeddings, labels)`` batches into the same search (:func:`scale_class_means_`).
Hand-written because no library evaluates many scales of a chunked, class-sharded
softmax per GEMM (scipy's ``minimize_scalar`` would call a full evaluation per probe).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .data import Split
from .errors import UsageError

__all__ = [
    "InitResult",
    "class_mean_directions",
    "class_means_init",
    "class_means_rows",
    "class_sums",
    "grid_objective",
    "probe_rows",
    "scale_class_means_",
    "scale_grid_stats",
    "search_scale",
]

#: the scale bracket, as the largest logit ``s |x|`` it gives. The top keeps relative
#: logits ``(w_j - w_y) . x`` above -80, inside float32's ``exp`` range, which the
#: algorithms' dual arithmetic needs: on separable data the held-out CE keeps falling
#: as ``s`` grows, and scent then overflowed at any learning rate
SCALE_BRACKET = (0.1, 40.0)
#: the scale search admits only scales whose probe rows have a mean ``log s_i`` (the
#: statistic the duals track) of at least ``-DUAL_FLOOR`` (see :func:`scale_class_means_`).
#: Measured at the tuned learning rates: with a floor of 10, SCENT diverged on
#: ``xcent demo``'s data; with 8, ASGD diverged at batch 40 on the tests' tiny data (in its
#: last epoch, where its dual step is 0); with 7 and 6 all six algorithms trained on both.
#: 6 keeps a margin; on data the class means do not separate it does not bind
DUAL_FLOOR = 6.0


@dataclass
class InitResult:
    """The initial weight rows (this process's classes), the chosen scale, and the CE /
    top-1 / top-5 that scale gives on the search subset; ``probes`` [(scale, CE)]."""

    weight: Tensor
    scale: float
    loss: float
    top1: float
    top5: float
    classes_with_rows: int
    probes: list[tuple[float, float]]

    def summary(self) -> dict:
        return {"init": "class-means", "init_scale": self.scale, "init_train_loss": self.loss,
                "init_train_acc": self.top1, "init_classes_with_rows": self.classes_with_rows}


def _normalize_rows_(sums: Tensor) -> Tensor:
    """Divide each row by its norm in place (zero rows stay zero); returns the norms
    used (1 for zero rows), so that ``mul_`` by them restores the sums."""
    norms = sums.norm(dim=1, keepdim=True)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    sums.div_(norms)
    return norms


@torch.no_grad()
def class_sums(split: Split, num_classes: int, classes: tuple[int, int] | None = None,
               chunk_rows: int = 8192) -> tuple[Tensor, Tensor]:
    """``(sums, counts)`` for the classes ``[lo, hi)`` (default all): the (hi - lo, D)
    float32 sum of each class's training rows and the (hi - lo,) int64 row counts.

    One pass over the rows of those classes, ``chunk_rows`` at a time (with a class
    range, only the rows whose in-memory label is in the range are read), summed
    with ``index_add_`` into the returned tensor: memory is the (C, D) result plus
    one chunk."""
    lo, hi = (0, num_classes) if classes is None else classes
    sums = torch.zeros(hi - lo, split.feature_dim, dtype=torch.float32)
    counts = torch.zeros(hi - lo, dtype=torch.long)
    labels = split.labels
    rows = None if (lo, hi) == (0, num_classes) else torch.nonzero((labels >= lo) & (labels < hi)).squeeze(1)
    if rows is not None and rows.numel() == 0:
        return sums, counts
    for feats, y in split.chunks(rows, chunk_rows):
        local = y.to(torch.long) - lo
        sums.index_add_(0, local, feats.to(torch.float32))
        counts.index_add_(0, local, torch.ones_like(local))
    return sums, counts


def class_mean_directions(split: Split, num_classes: int, classes: tuple[int, int] | None = None,
                          chunk_rows: int = 8192) -> tuple[Tensor, Tensor]:
    """``(directions, counts)``: the unit mean of each class's training rows (zero for
    classes without any; normalising the sum equals normalising the mean) and the
    row counts, for the classes ``[lo, hi)`` (see :func:`class_sums`)."""
    sums, counts = class_sums(split, num_classes, classes, chunk_rows)
    _normalize_rows_(sums)
    return sums, counts


def scale_grid_stats(x: Tensor, y: Tensor, directions: Tensor, scales: Tensor, lo: int = 0, group=None,
                     row_chunk: int = 256, class_chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Per-row statistics of the held-out rows ``(x, y)`` under ``s * directions`` for
    every scale ``s`` of ``scales`` (G,) at once: ``(log_other, rank)``, with

        ``log_other[k, i] = log sum_{j != y_i} exp(s_k (z_ij - z_iy))``,   ``z_ij = w_j . x_i``

    (G, n) float64, from which the CE of row i is ``log1p(exp(log_other))`` and the
    dual statistic ``log_other - log(C - 1)`` (:func:`search_scale`), and ``rank[i] =
    #{j != y_i : z_ij >= z_iy}`` (n,), which no positive scale changes (top-k), with
    the evaluation's rule for ties and for rows whose logits are not finite
    (:func:`xcent.classifier.tie_threshold`, :func:`xcent.classifier.rank_or_wrong`).

    The logits of ``s W`` are ``s`` times those of ``W``, so each (``row_chunk`` x
    ``class_chunk``) logit block is one GEMM in ``directions``' dtype whatever the
    number of scales; per row, an online log-sum-exp per scale (float64, shifted by
    the row's running maximum logit, shared by all positive scales) takes the block
    in cache-sized in-place passes. ``directions``: the classes ``[lo, lo + C_r)``;
    with ``group``, the ranks' maxima and sums are combined (all-gathered, float64),
    so every rank returns the same statistics."""
    from .classifier import count_at_least, max_row_norm, rank_or_wrong, target_logits, tie_threshold

    scales = scales.to(device=directions.device, dtype=torch.float64)
    n, num_local = x.shape[0], directions.shape[0]
    x = x.to(device=directions.device, dtype=directions.dtype)
    y_local = y.to(device=directions.device, dtype=torch.long) - lo
    log_other = torch.empty(scales.numel(), n, dtype=torch.float64, device=directions.device)
    # the counts, then this rank's class count (summed over the ranks: C for rank_or_wrong)
    counts = torch.zeros(n + 1, dtype=torch.long, device=directions.device)
    counts[n] = num_local
    rank = counts[:n]
    weight_norm = max_row_norm(directions)
    if group is not None:
        torch.distributed.all_reduce(weight_norm, op=torch.distributed.ReduceOp.MAX, group=group)
    col = scales[:, None]
    for a in range(0, n, row_chunk):
        b = min(a + row_chunk, n)
        xr, yr = x[a:b], y_local[a:b]
        target = target_logits(xr, yr, directions)
        if group is not None:
            torch.distributed.all_reduce(target, group=group)
        threshold = tie_threshold(xr, target, weight_norm)
        peak = torch.full((b - a,), -math.inf, dtype=torch.float64, device=x.device)
        sums = torch.zeros(scales.numel(), b - a, dtype=torch.float64, device=x.device)
        for c0 in range(0, num_local, class_chunk):
            z = xr @ directions[c0:c0 + class_chunk].T
            mine = (yr >= c0) & (yr < c0 + z.shape[1])
            z[mine.nonzero().squeeze(1), yr[mine] - c0] = -math.inf  # the target is not an 'other' class
            rank[a:b] += count_at_least(z, threshold)
            z = z.to(torch.float64)
            new_peak = torch.maximum(peak, z.max(1).values)
            finite = torch.isfinite(new_peak)
            shift = torch.where(finite, peak - new_peak, torch.zeros_like(peak))
            sums.mul_(torch.exp(col * shift[None]))  # rescale to the new running maximum
            z.sub_(torch.where(finite, new_peak, torch.zeros_like(new_peak))[:, None])
            peak = new_peak
            block = torch.empty_like(z)
            for k in range(scales.numel()):
                torch.mul(z, scales[k], out=block)
                sums[k] += block.exp_().sum(1)
        if group is not None:  # combine the ranks' shifted sums at the global maximum
            world = torch.distributed.get_world_size(group)
            peaks = [torch.empty_like(peak) for _ in range(world)]
            parts = [torch.empty_like(sums) for _ in range(world)]
            torch.distributed.all_gather(peaks, peak, group=group)
            torch.distributed.all_gather(parts, sums, group=group)
            peak = torch.stack(peaks).max(0).values
            finite = torch.isfinite(peak)
            sums = torch.zeros_like(sums)
            for p, part in zip(peaks, parts):
                shift = torch.where(finite & torch.isfinite(p), p - peak, torch.full_like(p, -math.inf))
                sums += part * torch.exp(col * shift[None])
        log_other[:, a:b] = col * (peak - target.to(torch.float64))[None] + torch.log(sums)
    if group is not None:
        torch.distributed.all_reduce(counts, group=group)
    return log_other, rank_or_wrong(rank, counts[n], log_other)


#: pass 1 of the scale search: this many log-spaced scales over the whole bracket
COARSE_POINTS = 16
#: pass 2: the lattice step of pass 1 divided by this, over pass 1's best +- one step
FINE_STEPS = 10


def grid_objective(log_other: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """``(ce, dual)``, each (G,) float64, from :func:`scale_grid_stats`' ``log_other``:
    the mean CE ``log1p(exp(log_other))`` and the mean dual statistic ``log_other -
    log(C - 1)`` (the held-out rows' mean ``log s_i``, :data:`DUAL_FLOOR`)."""
    ce = torch.logaddexp(log_other, torch.zeros_like(log_other)).mean(1)
    return ce, log_other.mean(1) - math.log(max(num_classes - 1, 1))


def search_scale(evaluate: Callable[[Tensor], tuple[Tensor, Tensor]], lo: float, hi: float
                 ) -> tuple[float, list[tuple[float, float]]]:
    """The scale in ``[lo, hi]`` minimising a CE unimodal in ``log s``, subject to the
    dual floor; ``evaluate(scales)`` returns ``(ce, dual)`` (G,) for a (G,) float64
    tensor of scales (one pass over the data: :func:`scale_grid_stats`). Returns
    ``(scale, probes)``, probes the [(s, CE)] evaluated.

    Admissible: ``dual >= -DUAL_FLOOR``; the objective is the CE there, +inf beyond.
    Pass 1: :data:`COARSE_POINTS` scales evenly spaced in ``log s`` over the bracket
    (step ``h``); its best admissible point ``k``. Pass 2: the lattice ``log lo + m h /
    FINE_STEPS`` over ``[u_{k-1}, u_{k+1}]`` (holds the minimum of a unimodal
    function); its best admissible point ``m``. The result: the vertex of the
    parabola in ``log s`` through the CE at ``m - 1, m, m + 1`` (clamped to them; the
    lattice point at the bracket's edge), and where ``m + 1`` is inadmissible, at
    most the floor's crossing, linear in ``log s`` between ``m`` and ``m + 1``.

    Why this rule: two passes of the data instead of ~22 golden-section probes, and
    a result continuous in the statistics: pass 2's points lie on one lattice, so
    when noise flips pass 1's choice between two near-equal points, pass 2 still
    sees the same points around the minimum; the parabola and the crossing move
    the result continuously. (A flip of pass 2's best between two equal points can
    still move it by the parabola's error, ~1e-4 relative; it needs CEs equal to
    the statistics' noise, ~1e-15 with float64 sums.)"""
    u_lo, u_hi = math.log(lo), math.log(hi)
    fine = (u_hi - u_lo) / ((COARSE_POINTS - 1) * FINE_STEPS)
    probes: list[tuple[float, float]] = []

    def run(m: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        u = u_lo + fine * m.to(torch.float64)
        ce, dual = (t.double().cpu() for t in evaluate(torch.exp(u)))
        probes.extend(zip(torch.exp(u).tolist(), ce.tolist()))
        objective = torch.where(dual >= -DUAL_FLOOR, ce, torch.full_like(ce, math.inf))
        objective = torch.where(torch.isfinite(objective), objective, torch.full_like(ce, math.inf))
        return u, ce, dual, int(torch.argmin(objective))  # the first of equal minima

    last = (COARSE_POINTS - 1) * FINE_STEPS
    _, _, _, k = run(torch.arange(0, last + 1, FINE_STEPS))
    m = torch.arange(max(0, (k - 1) * FINE_STEPS), min(last, (k + 1) * FINE_STEPS) + 1)
    u, ce, dual, j = run(m)
    best = float(u[j])
    if 0 < j < len(m) - 1:
        left, mid, right = float(ce[j - 1]), float(ce[j]), float(ce[j + 1])
        curvature = left - 2 * mid + right
        if curvature > 0 and math.isfinite(curvature):
            best = min(max(best + fine * (left - right) / (2 * curvature), float(u[j - 1])), float(u[j + 1]))
    if j < len(m) - 1 and not float(dual[j + 1]) >= -DUAL_FLOOR:
        d0, d1 = float(dual[j]), float(dual[j + 1])
        if math.isfinite(d1) and d0 > d1:
            best = min(best, float(u[j]) + fine * (d0 + DUAL_FLOOR) / (d0 - d1))
        else:
            best = min(best, float(u[j]))
    return math.exp(best), probes


#: at most this share of the training rows is held out of the means to probe the scale
MAX_PROBE_SHARE = 0.2
#: at most this many held-out rows choose the scale: one scalar needs a few thousand
#: rows, not the whole ``--train-eval-size`` subset (20,000 by default). The search
#: costs (rows x classes x feature_dim) multiply-adds per pass, so this cap is what
#: keeps it at seconds-to-minutes at Glint360K's 360K classes (docs/own-data.md)
MAX_PROBE_ROWS = 4096


def probe_rows(num_samples: int, subset: Tensor | None, limit: int = MAX_PROBE_ROWS) -> Tensor:
    """The rows that choose the scale: ``subset`` (sorted ids; None = all rows),
    thinned by a regular stride to at most :data:`MAX_PROBE_SHARE` of the rows (so
    that the means they are held out of keep most of the data) and at most
    ``limit`` rows (:data:`MAX_PROBE_ROWS`)."""
    rows = torch.arange(num_samples) if subset is None else subset
    limit = max(1, min(int(MAX_PROBE_SHARE * num_samples), limit))
    if rows.numel() > limit:
        rows = rows[::math.ceil(rows.numel() / limit)]
    return rows


@torch.no_grad()
def class_means_init(split: Split, num_classes: int, subset: Tensor | None = None, ctx=None,
                     chunk_rows: int = 8192, device="cpu") -> InitResult:
    """The class-mean weight ``s * m_c / |m_c|`` with ``s`` minimising the full-softmax
    CE of held-out training rows, subject to the dual floor (:func:`scale_class_means_`).

    The probe rows (:func:`probe_rows` of ``subset``) are left out of the class means
    while ``s`` is searched: on their own means, training rows are classified far
    more confidently than new rows (with two rows per class, a row is half its own
    class mean), and the scale that minimises their CE grows without bound. The
    returned weight uses the means of all training rows; ``loss``/``top1``/``top5``
    are the held-out figures at the chosen scale (what to expect on new rows).

    Single process (``ctx`` None): the whole (C, D) weight. Under torchrun (``ctx`` a
    :class:`xcent.distributed.DistContext`): this rank's classes
    (:func:`xcent.distributed.class_range`) only, the CE evaluated class-sharded.
    The probe rows are read into memory once (every rank reads them: they are few).
    The search itself is :func:`scale_class_means_` (shared with
    :meth:`xcent.SparseSoftmaxHead.init_class_means_`)."""
    from . import distributed as xd

    lo, hi = (0, num_classes) if ctx is None else xd.class_range(num_classes, ctx.rank, ctx.world_size)
    sums, counts = class_sums(split, num_classes, (lo, hi), chunk_rows)
    rows = probe_rows(split.num_samples, subset)
    x, y = split.gather(rows)
    x, y = x.to(torch.float32), y.to(torch.long)
    own = (y >= lo) & (y < hi)
    sums.index_add_(0, y[own] - lo, x[own], alpha=-1.0)  # hold the probe rows out
    # NaN/Inf rows (let through by --no-check-features) would poison their class's mean
    # and the search; every rank must stop, so the flag is agreed on before raising
    bad = torch.tensor([0.0 if bool(torch.isfinite(sums).all() and torch.isfinite(x).all()) else 1.0])
    if ctx is not None:
        bad = bad.to(ctx.device)
        torch.distributed.all_reduce(bad, group=ctx.group)
    if float(bad) > 0:
        raise UsageError("--init class-means: the training features hold NaN or Inf (not checked with "
                         "--no-check-features); remove those rows, or pass --init random")
    return scale_class_means_(sums.to(device), counts, x.to(device), y.to(device), lo,
                              None if ctx is None else ctx.group)


@torch.no_grad()
def scale_class_means_(sums: Tensor, counts: Tensor, x: Tensor, y: Tensor, lo: int = 0, group=None
                       ) -> InitResult:
    """Turn ``sums`` into the class-mean weight, in place, choosing the scale on the
    held-out rows ``(x, y)``; returns the :class:`InitResult` (its ``weight`` is ``sums``).

    ``sums`` (C_r, D): the sums of the training rows of the classes ``[lo, lo + C_r)``
    **without** the held-out rows; ``counts`` (C_r,): those classes' row counts, the
    held-out rows included (for ``classes_with_rows``); ``x`` (n, D) and ``y`` (n,):
    the held-out rows, the same on every rank. The scale minimises the full-softmax
    CE of ``x`` under the unit held-out means (:func:`search_scale` over the bracket
    :data:`SCALE_BRACKET` in units of their mean norm); then the held-out
    rows are added back and the weight is ``s`` times the unit means of all rows.
    ``group``: a process group when the classes are sharded over its ranks (every
    rank takes the same decisions: the statistics it all-reduces are identical);
    None: one process, ``sums`` holds every class. On ``sums``' device; the weight and
    the logit GEMMs in its dtype, the per-row statistics in float64 (below).

    **The dual floor.** A scale is admissible only while the held-out rows' mean of
    ``log s_i = log mean_{j != y_i} exp(z_ij)`` (:func:`grid_objective`: the
    quantity each row's dual ``nu_i`` tracks, ``z_ij = (w_j - w_{y_i}) . x_i``) stays
    at or above ``-`` :data:`DUAL_FLOOR`; inadmissible scales score +inf, which keeps
    the search unimodal (the statistic falls as ``s`` grows while the rows are
    classified right). On data the class means separate, the CE keeps falling up to
    the bracket's top and the duals start near ``log s = -30``, where SCENT's dual
    step ``sigmoid(gamma + nu)`` (gamma 12) no longer moves them and ASGD's scheduled
    step reaches 0: the first logits that rise then get weights ``exp(z - nu)`` in
    the thousands, and SCENT and ASGD diverged at their tuned learning rates
    (``xcent demo``'s data, the tests' tiny data).

    **Exactness.** One process and class-sharded runs choose the same scale (the
    tests' bounds: 1e-6 relative with float32 weights, 1e-9 with float64): the
    logits come from GEMMs of the same rows and classes, every sum over classes is float64 (online log-sum-exp, the
    ranks' parts combined at the common maximum), and the search's result moves
    continuously with its statistics (:func:`search_scale`). The golden-section
    search this replaced needed float64 logits: in float32 its comparisons on the
    flat bottom of the CE flipped between the two reductions (0.16% in the scale).
    """
    hi = lo + sums.shape[0]
    x, y = x.to(device=sums.device, dtype=sums.dtype), y.to(device=sums.device, dtype=torch.long)
    num_classes = sums.shape[0]
    if group is not None:
        total = torch.tensor([num_classes], dtype=torch.long, device=sums.device)
        torch.distributed.all_reduce(total, group=group)
        num_classes = int(total.item())
    own = (y >= lo) & (y < hi)
    seen_t = (counts > 0).sum().to(device=sums.device, dtype=torch.long).reshape(1)
    if group is not None:
        torch.distributed.all_reduce(seen_t, group=group)
    seen = int(seen_t.item())
    held_norms = _normalize_rows_(sums)

    def evaluate(scales: Tensor) -> tuple[Tensor, Tensor]:
        return grid_objective(scale_grid_stats(x, y, sums, scales, lo, group)[0], num_classes)

    # the bracket in units of the typical feature norm, so it fits any feature scale
    mean_norm = float(x.double().norm(dim=1).mean()) or 1.0
    scale, probes = search_scale(evaluate, SCALE_BRACKET[0] / mean_norm, SCALE_BRACKET[1] / mean_norm)
    # the figures at the chosen scale: a third pass, one scale (exact, not interpolated)
    log_other, rank = scale_grid_stats(x, y, sums, torch.tensor([scale], dtype=torch.float64), lo, group)
    loss = float(grid_objective(log_other, num_classes)[0][0])
    probes.append((scale, loss))
    top1, top5 = float((rank < 1).double().mean()), float((rank < 5).double().mean())
    # back to the sums of all training rows, then the final directions
    sums.mul_(held_norms).index_add_(0, y[own] - lo, x[own])
    _normalize_rows_(sums)
    sums.mul_(scale)
    return InitResult(sums, scale, loss, top1, top5, seen, probes)



@torch.no_grad()
def class_means_rows(split: Split, classes: Tensor, rows: Tensor, scale: float, chunk_rows: int = 8192) -> Tensor:
    """``scale`` times the unit mean, over the training ``rows`` only, of each class
    of ``classes`` (sorted ids; zero for a class without any of ``rows``): a
    class-mean start for a few classes that leaves other rows out (the ``--lr auto``
    search scores on rows held out of its start this way)."""
    sums = torch.zeros(classes.numel(), split.feature_dim, dtype=torch.float32)
    rows = rows[torch.isin(split.labels.index_select(0, rows), classes)]
    for feats, y in split.chunks(rows, chunk_rows):
        sums.index_add_(0, torch.searchsorted(classes, y.to(torch.long)), feats.to(torch.float32))
    _normalize_rows_(sums)
    return sums.mul_(scale)
