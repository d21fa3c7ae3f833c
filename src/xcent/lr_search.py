"""``--lr auto``: a short, bounded learning-rate search before training.

Why a data-scaled guess. One visit of a row moves its logits by about
``lr * |x|^2 / B`` (the sparse step adds ``lr / B`` times a weighted sum of feature
rows to the touched weight rows), so a learning rate tuned on one feature scale is
``|x|^2``-times too large or small on another; and a class with few rows gets few
positive updates per epoch, so it can take larger steps. The guess is

    lr_0 = tuned_lr * (REFERENCE_MEAN_SQ_NORM / mean |x|^2)
                    * (REFERENCE_ROWS_PER_CLASS / rows per class) ** 0.25

The norm factor is the physics above, its constant measured (the best lr of a
3-epoch run scaled as ``1 / |x|^2`` between norms 1 and 25 on the synthetic shapes
of ``benchmarks/quality.py``, and the tuned lr fitted mean ``|x|^2`` near 4 there).
The rows factor is damped to a fourth root: on those shapes the best lr moved
little between 2.5 and 50 rows per class; the grid, not the guess, has to find the
rest. Candidates are ``lr_0 * 4^k`` for ``k = -3..2``: a class-mean start wants
steps about ten times smaller than a random one.

The search (:func:`make_plan`, :func:`search_lr`). A random set of classes S is
drawn until its training rows fill the budget (the last class drawn only in part);
one row of each class of S with two rows or more is held out (at most
``max_held``). Every candidate starts from the same initial rows of S and runs the
same fixed batches drawn from the other rows of S, at a constant learning rate,
with its own duals; it is scored by the exact full-softmax CE (over all C classes)
of the held-out rows after each pass over S. Restricting the search to S makes a
small budget look like a few epochs of training to those classes: between two
visits of a row, its class has moved by a whole pass, as in an epoch of the real
run, which is when the divergences of a real run show (a row's dual is an epoch
stale). Only the weight rows of S change, so they alone are kept per candidate
and restored at the end.

Successive halving (:func:`halving_schedule`): all candidates run the first pass;
after each pass only the better half (rounded up) of the candidates still running
go on, the others keep their last score. With six candidates and three passes
that is 6 + 3 + 2 = 11 candidate-passes instead of 18, so the same budget buys a
larger S (better fidelity). A candidate diverged when a step goes non-finite, or
when its CE is not finite or exceeds the start's by more than ``log C`` (worse
than a uniform guess added to the start); it stops at once. The best is the
candidate that ran the most passes without diverging, the lowest CE among those;
the rate used is the best divided by a safety factor: :data:`SAFETY` (one grid
step) from a random start, :data:`SAFETY_CLASS_MEANS` (two) from a class-mean
start. A short search favours large steps, and a class-mean start is more fragile:
its logits spread over a wide range from the first step, so a batch of new
negatives moves a row's softmax far from its stale dual (measured: 1,500 classes,
36 rows per class, unit norm, scent from class means at the search's best / 4
diverged in epoch 2 of 3; at the best / 16 it trained; measured before the
class-mean dual floor of :mod:`xcent.init`). When no candidate improves
on the start's CE (the start is already as good as the search can tell, e.g. a
class-mean start at CE 0 on separable data), the rate is the smallest candidate
divided by :data:`NO_GAIN_DIVISOR`: training cannot gain much, so it should
above all not move the model.

Cost, counted exactly in training rows: ``sum(schedule) * |rows of S|`` with
``|rows of S| = budget * num_samples // sum(schedule)``, i.e. at most ``budget``
of an epoch (diverged candidates stop early and cost less), plus one scoring
evaluation of the held-out rows per candidate-pass and one of the start, reported
separately. The floor: S holds at least one batch of rows and the rows of
:data:`MIN_CLASSES` (24) classes of mean size, because a search on fewer classes
misses divergences; so the search costs more than ``budget`` of an epoch on splits
under :func:`floor_rows` (``11 * batch / budget``: 7,040 rows at batch 128 and
budget 0.2) or, whatever their size, on data with fewer than :func:`floor_classes`
classes (``24 * 11 / budget``: 1,320 at budget 0.2; exact for each plan:
``SearchPlan.over_budget``); the result and the console say so. Training time
follows rows, since the search's steps are the trainer's.

Gamma is not searched jointly: a joint grid multiplies the cost by the number of
gamma values (three would already break the budget at the same fidelity), and
gamma sets the step of the per-row duals, which act on logit statistics, not on
the weight, so the feature-scale argument above does not apply to it. The search
runs the algorithm with the gamma it is given (the tuned default unless
``--gamma``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import UsageError

__all__ = [
    "REFERENCE_MEAN_SQ_NORM",
    "REFERENCE_ROWS_PER_CLASS",
    "LrSearchResult",
    "SearchPlan",
    "floor_classes",
    "floor_rows",
    "halving_schedule",
    "lr_candidates",
    "lr_guess",
    "make_plan",
    "search_lr",
    "search_lr_local",
]

#: the mean squared feature norm the tuned learning rates fit. Calibrated on the
#: synthetic shapes of ``benchmarks/quality.py`` (scent's lr 5 is best, from a random
#: start, near mean |x|^2 = 4; the best lr scaled as 1 / |x|^2 between norms 1 and 25)
REFERENCE_MEAN_SQ_NORM = 4.0
#: training rows per class of that data (17.1M rows, 360K classes)
REFERENCE_ROWS_PER_CLASS = 47.0
#: candidates: lr_0 * FACTOR^k for k in -BELOW..ABOVE (a class-mean start wants
#: about ten times smaller steps than a random one: the grid reaches further down)
FACTOR, BELOW, ABOVE = 4.0, 3, 2
#: passes over the search classes' rows (the leading candidates revisit each row
#: PASSES - 1 times, where stale duals show)
PASSES = 3
#: fewest classes in S (in rows: this many times the mean rows per class): with
#: fewer, a batch's negatives are nearly the same few
#: classes every step and the search misses divergences of the real run (measured:
#: 300 classes of 36 rows, S of 5 classes picked a rate that diverged in epoch 2
#: from a random start; with 24 or more classes, 24-76 measured, it did not)
MIN_CLASSES = 24
#: the best lr from a random start is divided by this: a short search favours large
#: steps, and the divergences of a real run appear when rows are revisited an epoch
#: later
SAFETY = FACTOR
#: the same from a class-mean start (see the module docstring for the measurement)
SAFETY_CLASS_MEANS = FACTOR**2
#: no candidate improved on the start: the smallest candidate divided by this
NO_GAIN_DIVISOR = FACTOR**3


def lr_guess(tuned_lr: float, mean_sq_norm: float, rows_per_class: float) -> float:
    """The data-scaled starting point of the search (see the module docstring)."""
    norm_factor = REFERENCE_MEAN_SQ_NORM / max(mean_sq_norm, 1e-12)
    rows_factor = (REFERENCE_ROWS_PER_CLASS / max(rows_per_class, 1.0)) ** 0.25
    return tuned_lr * norm_factor * rows_factor


def lr_candidates(guess: float, factor: float = FACTOR, below: int = BELOW, above: int = ABOVE) -> list[float]:
    """``guess * factor^k``, ``k = -below..above``, ascending."""
    return [guess * factor ** k for k in range(-below, above + 1)]


def halving_schedule(num_candidates: int, passes: int = PASSES) -> list[int]:
    """How many candidates run each pass: all in the first, then half (rounded up)
    of the previous pass's (6 candidates, 3 passes: ``[6, 3, 2]``)."""
    out, k = [], int(num_candidates)
    for _ in range(passes):
        out.append(k)
        k = max(1, (k + 1) // 2)
    return out


def floor_rows(num_candidates: int, batch_size: int, budget: float, passes: int = PASSES) -> int:
    """The fewest training rows on which the search can keep to ``budget`` of an
    epoch: S holds at least one batch of rows, so below this the search costs
    ``sum(schedule) * batch_size`` rows, more than ``budget`` of an epoch."""
    return math.ceil(sum(halving_schedule(num_candidates, passes)) * batch_size / budget)


def floor_classes(num_candidates: int, budget: float, passes: int = PASSES) -> int:
    """The fewest classes (with training rows) on which the search keeps to
    ``budget``: S holds at least :data:`MIN_CLASSES` times the mean rows per class,
    ``MIN_CLASSES / num_classes`` of the split, in each of ``sum(schedule)``
    candidate-passes (up to rounding; the plan's ``over_budget`` is exact)."""
    return math.ceil(MIN_CLASSES * sum(halving_schedule(num_candidates, passes)) / budget)


@dataclass
class SearchPlan:
    """What every candidate runs: the search classes S (sorted), the rows of S it
    trains on and the held-out rows it is scored on (sorted global row ids), and,
    per pass, the fixed batch sequence (each a sorted tensor of row ids).
    ``schedule[p]``: how many candidates run pass ``p``; ``budget_rows``: the
    training rows all candidates together may use (``budget`` of an epoch)."""

    classes: Tensor
    train_rows: Tensor
    held_rows: Tensor
    passes: list[list[Tensor]]
    schedule: list[int] = field(default_factory=list)
    budget_rows: int = 0
    num_samples: int = 0

    @property
    def batches(self) -> list[Tensor]:
        """All passes' batches in order (what a candidate that runs every pass trains on)."""
        return [b for batches in self.passes for b in batches]

    @property
    def steps(self) -> int:
        return len(self.batches)

    @property
    def rows_per_pass(self) -> int:
        return int(self.train_rows.numel())

    @property
    def rows_trained(self) -> int:
        """Training rows of one candidate that runs every pass."""
        return sum(int(b.numel()) for b in self.batches)

    @property
    def max_rows(self) -> int:
        """Training rows of the whole search when no candidate diverges."""
        return sum(self.schedule) * self.rows_per_pass

    @property
    def over_budget(self) -> bool:
        """True when the one-batch-a-pass floor, not the budget, sized S."""
        return self.max_rows > self.budget_rows


def check_searchable(counts: Tensor) -> None:
    """``--lr auto`` scores its candidates on training rows held out of the search, one
    of each class with two rows or more: refuse data (per-class row ``counts``) where
    no class has two."""
    if int(counts.max()) < 2:
        raise UsageError(f"--lr auto: no class has two training rows ({int(counts.sum())} rows, one per class), so "
                         f"none can be held out to score the candidate rates; pass a number to --lr")


def make_plan(labels: Tensor, num_classes: int, batch_size: int, num_candidates: int, seed: int,
              budget: float = 0.2, passes: int = PASSES, max_held: int = 2000,
              min_classes: int | None = None) -> SearchPlan:
    """A seeded search plan whose training over all candidates uses at most
    ``budget * num_samples`` training rows (exactly counted: ``plan.max_rows``),
    unless the split is under :func:`floor_rows`.

    Classes are taken in a seeded random order until their rows reach the target
    ``budget * num_samples // sum(schedule)`` (the floor: at least one batch and
    ``min_classes`` (default :data:`MIN_CLASSES`) times the mean rows per class), the
    last class only with as many of its rows (a seeded choice) as fill it; then one
    row of each class of S that has two or more rows in S is held out (up to
    ``max_held``); the other rows of S are shuffled anew for each of the ``passes``
    passes and cut into batches of ``batch_size``."""
    num_samples = labels.numel()
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + 424_242)
    schedule = halving_schedule(num_candidates, passes)
    budget_rows = int(budget * num_samples)
    counts = torch.bincount(labels, minlength=num_classes)
    min_classes = MIN_CLASSES if min_classes is None else min_classes
    # the floor: one batch, and min_classes classes' worth of rows at the mean class size
    # (the rows of the first min_classes drawn would let one large class of a long tail
    # force the floor on data with plenty of classes)
    worth = math.ceil(min_classes * num_samples / max(int((counts > 0).sum()), 1))
    target = min(max(budget_rows // sum(schedule), batch_size, worth), num_samples)
    order = torch.randperm(num_classes, generator=gen)
    order = order[counts[order] > 0]
    cumulative = counts[order].cumsum(0)
    take = min(int(torch.searchsorted(cumulative, torch.tensor(target))) + 1, order.numel())
    in_s = torch.zeros(num_classes, dtype=torch.bool)
    in_s[order[:take]] = True
    rows = torch.nonzero(in_s[labels]).squeeze(1)
    shuffled = rows[torch.randperm(rows.numel(), generator=gen)]
    y = labels[shuffled]
    # the last class drawn fills S only up to the target (its first rows in the seeded order)
    last = order[take - 1]
    room = target - (int(cumulative[take - 2]) if take > 1 else 0)
    is_last = y == last
    keep = ~is_last | (torch.cumsum(is_last, 0) <= room)
    shuffled, y = shuffled[keep], y[keep]
    classes = torch.unique(y)
    in_s_counts = torch.bincount(y, minlength=num_classes)
    # hold out the first row (in the seeded order) of each class with >= 2 rows in S
    sorted_y, perm = torch.sort(y, stable=True)
    first_sorted = torch.ones_like(sorted_y, dtype=torch.bool)
    first_sorted[1:] = sorted_y[1:] != sorted_y[:-1]
    first = torch.zeros_like(first_sorted)
    first[perm] = first_sorted
    held_mask = first & (in_s_counts[y] >= 2)
    held_idx = torch.nonzero(held_mask).squeeze(1)[:max_held]
    held = torch.zeros_like(held_mask)
    held[held_idx] = True
    held_rows, train_rows = shuffled[held].sort().values, shuffled[~held].sort().values
    if held_rows.numel() == 0:  # nothing to score the candidates on
        check_searchable(counts)
        raise UsageError(f"--lr auto: the search's sample ({y.numel()} rows of {classes.numel()} classes) has no "
                         f"class with two rows to hold one out for scoring; raise --lr-search-budget or pass a "
                         f"number to --lr")
    pass_batches = []
    for _ in range(passes):
        perm_rows = train_rows[torch.randperm(train_rows.numel(), generator=gen)]
        pass_batches.append([b.sort().values for b in perm_rows.split(batch_size)])
    return SearchPlan(classes, train_rows, held_rows, pass_batches, schedule, budget_rows, num_samples)


@dataclass
class LrSearchResult:
    """``best_lr`` and, per candidate, ``{"lr", "loss", "top1", "diverged", "passes",
    "rows", "seconds"}`` (``loss``/``top1``: its last score); ``start`` the held-out
    figures of the initial weight; ``seconds`` the training time (all candidates),
    ``eval_seconds`` the scoring time; ``rows_trained`` the training rows of all
    candidates together, ``budget_rows`` what the budget allowed, ``num_samples``
    an epoch's rows; ``rule`` how the rate was derived from the best candidate."""

    best_lr: float
    guess: float
    candidates: list[dict]
    start: dict
    steps_per_candidate: int
    rows_per_candidate: int
    seconds: float = 0.0
    eval_seconds: float = 0.0
    rows_trained: int = 0
    budget_rows: int = 0
    num_samples: int = 0
    floor_rows: int = 0
    floor_classes: int = 0
    rule: str = ""

    @property
    def epoch_share(self) -> float:
        """The search's training rows as a share of one epoch's."""
        return self.rows_trained / max(self.num_samples, 1)

    def cost_line(self) -> str:
        """One line for the console: the cost in epochs, and why when over budget."""
        share = self.budget_rows / max(self.num_samples, 1)
        line = (f"search cost {self.epoch_share:.3g} epoch ({self.rows_trained:,} training rows; budget "
                f"{share:.3g} epoch), {self.seconds:.2f}s training + {self.eval_seconds:.2f}s scoring")
        if self.rows_trained > self.budget_rows:
            line += (f"; over the budget because the search trains at least {MIN_CLASSES} classes and one batch "
                     f"a pass: data with fewer than {self.floor_classes:,} classes or {self.floor_rows:,} rows")
        return line

    def as_records(self) -> list[dict]:
        """JSON-ready lines: one per candidate, then the choice."""
        lines = [{"lr_search": "candidate", **c} for c in self.candidates]
        lines.append({"lr_search": "chosen", "lr": self.best_lr, "guess": self.guess, "rule": self.rule,
                      "start_loss": self.start["loss"], "steps_per_candidate": self.steps_per_candidate,
                      "rows_per_candidate": self.rows_per_candidate, "rows_trained": self.rows_trained,
                      "budget_rows": self.budget_rows, "num_samples": self.num_samples,
                      "epoch_share": self.epoch_share, "floor_rows": self.floor_rows,
                      "floor_classes": self.floor_classes,
                      "train_seconds": self.seconds, "eval_seconds": self.eval_seconds})
        return lines


@torch.no_grad()
def search_lr(plan: SearchPlan, candidates: list[float], num_classes: int, weight: Tensor, lo: int, make_loss: Callable,
              step: Callable, score: Callable[[], dict], start_rows: Tensor | None = None,
              clock: Callable[[], float] | None = None, guess: float | None = None,
              safety: float = SAFETY, batch_size: int | None = None) -> LrSearchResult:
    """Run the candidates of ``plan`` by successive halving and keep the best.

    ``weight``: this process's weight rows (classes ``[lo, lo + len)``), changed in
    place during the search and restored at the end. ``start_rows``: the rows of
    the search classes to start each candidate from (this process's share of
    ``plan.classes``, in order; default: their current values; a class-mean start
    passes the means without the held-out rows, so that scoring is honest).
    ``make_loss(num_samples)`` builds a fresh algorithm with that many duals (one
    per row of ``plan.train_rows``); ``step(loss_fn, index, local, lr)`` applies one
    training step to ``weight`` on the global training rows ``index``, whose duals
    are ``local`` (their positions in ``plan.train_rows``), and returns a
    :class:`xcent.step.StepResult`; ``score()`` evaluates ``weight`` on
    ``plan.held_rows`` and returns ``{"loss", "top1", ...}``. ``safety``: the best
    candidate's rate is divided by it. ``batch_size``: for the floor in the report."""
    import time

    clock = clock or time.perf_counter
    hi = lo + weight.shape[0]
    mine = plan.classes[(plan.classes >= lo) & (plan.classes < hi)].to(weight.device) - lo
    saved = weight.index_select(0, mine)
    start = saved if start_rows is None else start_rows.to(weight.device, weight.dtype)
    weight.index_copy_(0, mine, start)
    t0 = clock()
    start_score = score()
    eval_s, train_s, rows_trained = clock() - t0, 0.0, 0
    records = {lr: {"lr": lr, "loss": None, "top1": None, "diverged": False, "passes": 0, "rows": 0, "seconds": 0.0}
               for lr in candidates}
    state = {lr: [start.clone(), None] for lr in candidates}
    alive = list(candidates)
    for p, batches in enumerate(plan.passes):
        if p:  # successive halving: the better candidates go on
            alive = sorted(alive, key=lambda lr: records[lr]["loss"])[:plan.schedule[p]]
        for lr in alive:
            record = records[lr]
            rows, loss_fn = state[lr]
            loss_fn = loss_fn if loss_fn is not None else make_loss(plan.train_rows.numel())
            weight.index_copy_(0, mine, rows)
            t0 = clock()
            for index in batches:
                result = step(loss_fn, index, torch.searchsorted(plan.train_rows, index), lr)
                record["rows"] += int(index.numel())
                rows_trained += int(index.numel())
                if not result.skipped and not result.finite:
                    record["diverged"] = True
                    break
            t1 = clock()
            train_s += t1 - t0
            if not record["diverged"]:
                metrics = score()
                record.update(loss=metrics["loss"], top1=metrics["top1"], passes=p + 1)
                record["diverged"] = not metrics["loss"] <= start_score["loss"] + math.log(num_classes)
            state[lr] = [weight.index_select(0, mine), loss_fn] if not record["diverged"] else None
            eval_s += clock() - t1
            record["seconds"] += clock() - t0
        alive = [lr for lr in alive if not records[lr]["diverged"]]
        if not alive:
            break
    weight.index_copy_(0, mine, saved)
    results = [records[lr] for lr in candidates]
    kept = [r for r in results if not r["diverged"] and r["passes"] > 0]
    if not kept:  # nothing usable: the smallest candidate is the safest fallback
        best_lr, rule = min(candidates) / safety, f"every candidate diverged: the smallest / {safety:g}"
    else:
        most = max(r["passes"] for r in kept)
        best = min((r for r in kept if r["passes"] == most), key=lambda r: r["loss"])
        if best["loss"] < start_score["loss"]:
            best_lr, rule = best["lr"] / safety, f"the best / {safety:g}"
        else:
            best_lr = min(candidates) / NO_GAIN_DIVISOR
            rule = f"no candidate improved on the start: the smallest / {NO_GAIN_DIVISOR:g}"
    num_samples, share = plan.num_samples, plan.budget_rows / max(plan.num_samples, 1)
    floors = (floor_rows(len(candidates), batch_size, share, len(plan.passes)) if batch_size and share else 0,
              floor_classes(len(candidates), share, len(plan.passes)) if share else 0)
    return LrSearchResult(best_lr, guess if guess is not None else math.nan, results, start_score, plan.steps,
                          plan.rows_trained, train_s, eval_s, rows_trained, plan.budget_rows, num_samples, *floors,
                          rule)


def search_lr_local(split, weight: Tensor, algorithm: str, hparams: dict, epochs: int, batch_size: int, seed: int,
                    candidates: list[float], start_rows: Tensor | None = None, budget: float = 0.2,
                    eval_chunk_rows: int = 4096, guess: float | None = None, safety: float = SAFETY) -> LrSearchResult:
    """:func:`search_lr` in one process holding the whole ``weight``, with
    :func:`xcent.step.train_step` and :func:`xcent.evaluate.evaluate`.
    ``start_rows``: a callable ``plan -> rows`` (see :func:`search_lr`) or None."""
    from .evaluate import evaluate
    from .losses import build
    from .step import train_step

    num_classes = weight.shape[0]
    plan = make_plan(split.labels, num_classes, batch_size, len(candidates), seed, budget)

    def make_loss(num_samples):
        loss_fn = build(algorithm, num_samples, epochs=epochs, **hparams).to(weight.device)
        loss_fn.set_epoch(1)
        return loss_fn

    def step(loss_fn, index, local, lr):
        feats, labels = split.gather(index)
        # labels stay on the host, where the step takes the batch's distinct labels (no device read)
        return train_step(weight, loss_fn, feats.to(weight.device), labels, local, lr)

    def score():
        return evaluate(split, weight, rows=plan.held_rows, chunk_rows=eval_chunk_rows)

    start = start_rows(plan) if start_rows is not None else None
    return search_lr(plan, candidates, num_classes, weight, 0, make_loss, step, score, start, guess=guess,
                     safety=safety, batch_size=batch_size)
