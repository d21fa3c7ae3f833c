"""Class-mean initialisation: a training-free classifier to start from.

The nearest-class-mean classifier is strong on data with few rows per class, where
a randomly initialised linear model learns little in a few epochs. Its weight is

    w_c = s * m_c / |m_c|,    m_c = mean of the training rows of class c

(``w_c = 0`` for a class without training rows), with one scale ``s`` shared by all
classes and chosen to minimise the full-softmax cross-entropy on a fixed subset of
training rows. That CE is convex in ``s`` (a log-sum-exp of functions linear in
``s``, minus a linear one), hence unimodal in ``log s``, so a golden-section search
over ``log s`` finds its minimum; the logits of ``s W`` on ``x`` are those of ``W`` on
``s x``, so each probe scales the (small, in-memory) subset, never the weight.

Cost: one streaming pass over the memory-mapped training split (chunked
``index_add_`` into the (C, D) weight itself: no N x D copy, no second C x D buffer)
and about :data:`GOLDEN_STEPS` full-softmax evaluations of the subset. Under
torchrun every rank sums only the rows of its own classes (selected from the
in-memory labels, so each rank reads about 1/P of the file) and the probes use the
class-sharded evaluation of :mod:`xcent.distributed`; every rank then takes the same
search decisions, since the all-gathered statistics are identical on every rank.
:meth:`xcent.SparseSoftmaxHead.init_class_means_` streams a user's ``(embeddings,
labels)`` batches into the same search (:func:`scale_class_means_`).
Hand-written because the search is ten lines and no library offers a chunked,
class-sharded evaluation to plug into (scipy's ``minimize_scalar`` would add a
dependency for the same golden-section loop).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .classifier import full_softmax_stats
from .data import Split
from .errors import UsageError
from .evaluate import summarize

__all__ = [
    "InitResult",
    "class_mean_directions",
    "class_means_init",
    "class_means_rows",
    "class_sums",
    "golden_section_log",
    "mean_log_row_stat",
    "probe_rows",
    "scale_class_means_",
]

#: golden-section probes of the scale search: the bracket shrinks by 0.618 each
GOLDEN_STEPS = 20
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


def golden_section_log(f: Callable[[float], float], lo: float, hi: float, steps: int = GOLDEN_STEPS
                       ) -> tuple[float, float, list[tuple[float, float]]]:
    """Minimise ``f`` over ``[lo, hi]`` (``0 < lo < hi``) by golden-section search on
    ``log s``; exact for functions unimodal in ``s`` (the bracket keeps the minimum).
    Returns ``(argmin, min, probes)``, ``probes`` the [(s, f(s))] evaluated, in order.
    ``steps + 2`` evaluations; a non-finite value counts as +inf."""
    probes: list[tuple[float, float]] = []

    def g(u: float) -> float:
        s = math.exp(u)
        value = float(f(s))
        probes.append((s, value))
        return value if math.isfinite(value) else math.inf

    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = math.log(lo), math.log(hi)
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = g(c), g(d)
    for _ in range(steps):
        if fc <= fd:  # the minimum is in [a, d]
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = g(c)
        else:  # in [c, b]
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = g(d)
    best = min(probes, key=lambda p: p[1] if math.isfinite(p[1]) else math.inf)
    return best[0], best[1], probes


#: at most this share of the training rows is held out of the means to probe the scale
MAX_PROBE_SHARE = 0.2


def probe_rows(num_samples: int, subset: Tensor | None) -> Tensor:
    """The rows that choose the scale: ``subset`` (sorted ids; None = all rows),
    thinned by a regular stride to at most :data:`MAX_PROBE_SHARE` of the rows, so
    that the means they are held out of keep most of the data."""
    rows = torch.arange(num_samples) if subset is None else subset
    limit = max(1, int(MAX_PROBE_SHARE * num_samples))
    if rows.numel() > limit:
        rows = rows[::math.ceil(rows.numel() / limit)]
    return rows


@torch.no_grad()
def class_means_init(split: Split, num_classes: int, subset: Tensor | None = None, ctx=None,
                     chunk_rows: int = 8192, steps: int = GOLDEN_STEPS, device="cpu") -> InitResult:
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
                              None if ctx is None else ctx.group, steps)


@torch.no_grad()
def scale_class_means_(sums: Tensor, counts: Tensor, x: Tensor, y: Tensor, lo: int = 0, group=None,
                       steps: int = GOLDEN_STEPS) -> InitResult:
    """Turn ``sums`` into the class-mean weight, in place, choosing the scale on the
    held-out rows ``(x, y)``; returns the :class:`InitResult` (its ``weight`` is ``sums``).

    ``sums`` (C_r, D): the sums of the training rows of the classes ``[lo, lo + C_r)``
    **without** the held-out rows; ``counts`` (C_r,): those classes' row counts, the
    held-out rows included (for ``classes_with_rows``); ``x`` (n, D) and ``y`` (n,):
    the held-out rows, the same on every rank. The scale minimises the full-softmax
    CE of ``x`` under the unit held-out means (golden section over ``log s``, the
    bracket :data:`SCALE_BRACKET` in units of their mean norm); then the held-out
    rows are added back and the weight is ``s`` times the unit means of all rows.
    ``group``: a process group when the classes are sharded over its ranks (every
    rank takes the same decisions: the statistics it all-reduces are identical);
    None: one process, ``sums`` holds every class. On ``sums``' device; the weight in
    its dtype, the probes in float64 (below).

    **The dual floor.** A scale is admissible only while the held-out rows' mean of
    ``log s_i = log mean_{j != y_i} exp(z_ij)`` (:func:`mean_log_row_stat`: the
    quantity each row's dual ``nu_i`` tracks, ``z_ij = (w_j - w_{y_i}) . x_i``) stays
    at or above ``-`` :data:`DUAL_FLOOR`; inadmissible scales score +inf, which keeps
    the search unimodal (the statistic falls as ``s`` grows while the rows are
    classified right). On data the class means separate, the CE keeps falling up to
    the bracket's top and the duals start near ``log s = -30``, where SCENT's dual
    step ``sigmoid(gamma + nu)`` (gamma 12) no longer moves them and ASGD's scheduled
    step reaches 0: the first logits that rise then get weights ``exp(z - nu)`` in
    the thousands, and SCENT and ASGD diverged at their tuned learning rates
    (``xcent demo``'s data, the tests' tiny data).

    **Exactness.** The probes are evaluated in float64 (a float64 copy of the unit
    held-out means, twice the weight's memory while searching; the scaled rows,
    logits and log-sum-exp), in one process and class-sharded alike: in float32 the
    CE differed between the two reductions by ~1e-7 relative, which on the flat
    bottom of the CE flipped golden-section comparisons and moved the chosen scale
    by 0.16%; in float64 the differences (~1e-16) stay far below those between
    probes."""
    from . import distributed as xd

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
    directions, x64 = sums.to(torch.float64), x.to(torch.float64)

    def stats(scale: float, eval_rows: int = 4096):
        for start in range(0, x64.shape[0], eval_rows):
            xs, ys = x64[start:start + eval_rows] * scale, y[start:start + eval_rows]
            if group is None:
                yield full_softmax_stats(xs, ys, directions)
            else:
                yield xd.sharded_stats(xs, ys, directions, lo, None, group=group)

    results: dict[float, dict] = {}

    def ce(scale: float) -> float:
        chunks = list(stats(scale))
        results[scale] = summarize(chunks)
        results[scale]["mean_log_row_stat"] = mean_log_row_stat(chunks, num_classes)
        if results[scale]["mean_log_row_stat"] < -DUAL_FLOOR:
            return math.inf  # beyond the dual floor
        return results[scale]["loss"]

    # the bracket in units of the typical feature norm, so it fits any feature scale
    mean_norm = float(x64.norm(dim=1).mean()) or 1.0
    scale, _, probes = golden_section_log(ce, SCALE_BRACKET[0] / mean_norm, SCALE_BRACKET[1] / mean_norm, steps)
    held = results[scale]
    directions = x64 = None  # free the float64 copies before the weight is finished
    # back to the sums of all training rows, then the final directions
    sums.mul_(held_norms).index_add_(0, y[own] - lo, x[own])
    _normalize_rows_(sums)
    sums.mul_(scale)
    return InitResult(sums, scale, held["loss"], held["top1"], held["top5"], seen, probes)


def mean_log_row_stat(chunk_stats: list[tuple[Tensor, Tensor, Tensor]], num_classes: int) -> float:
    """The mean over rows of ``log s_i = log mean_{j != y_i} exp(z_ij)``, from the
    ``(lse, target, rank)`` of :func:`xcent.classifier.full_softmax_stats`:
    ``sum_{j != y} exp(z_ij) = exp(CE_i) - 1``, so ``log s_i = log expm1(CE_i) -
    log(C - 1)``. ``CE_i`` is floored at 1e-15 (below it the float64 difference
    ``lse - target`` is rounding), i.e. ``log s_i`` at about ``-34.5 - log(C - 1)``."""
    total, count = 0.0, 0
    for lse, target, _ in chunk_stats:
        row_ce = (lse.double() - target.double()).clamp_min(1e-15)
        total += float(torch.log(torch.expm1(row_ce)).sum())
        count += row_ce.numel()
    return total / max(count, 1) - math.log(max(num_classes - 1, 1))


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
