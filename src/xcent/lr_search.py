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
drawn until its training rows fill the budget; a slice of those rows (at most one
per class, from classes with two rows or more) is held out. Each candidate
``lr_0 * factor^k`` starts from the same initial rows of S, runs the same fixed
sequence of batches drawn from the other rows of S (``passes`` passes over them at
a constant learning rate, with a fresh copy of the algorithm's duals), and is
scored by the exact full-softmax CE (over all C classes) of the held-out rows.
A candidate diverged when a step goes non-finite, or when its CE is not finite or
exceeds the start's by more than ``log C`` (worse than a uniform guess added to
the start: the weights blew up without overflowing); diverged candidates are
dropped, and the best lr is divided by :data:`SAFETY` (one grid step).
Restricting the search to S makes a small budget look like a few epochs of
training to those classes, which is what the learning rate must be good for;
only the weight rows of S change, so they alone are saved and restored between
candidates. Cost: ``len(candidates) * passes * |rows of S|`` training rows, at most
``budget`` of an epoch, plus one scoring evaluation of the held-out rows per
candidate (and one of the start); diverging candidates stop early. Each candidate
runs at least :data:`MIN_STEPS` steps, so on splits under about
``MIN_STEPS * 6 * batch / budget`` rows (245K at batch 128) the search costs more
than ``budget`` of an epoch: shorter runs did not show divergences that a 3-epoch
run hits.

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
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "REFERENCE_MEAN_SQ_NORM",
    "REFERENCE_ROWS_PER_CLASS",
    "LrSearchResult",
    "SearchPlan",
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
#: fewest training steps per candidate: in shorter runs a learning rate that makes
#: a 3-epoch run diverge still looked best (measured on benchmarks/quality.py shapes)
MIN_STEPS = 64
#: the search's best lr is divided by this: a short search favours large steps, and
#: the divergences of a real run appear when rows are revisited an epoch later (from
#: a class-mean start, scent at the search's best lr blew up in epoch 2 on a
#: benchmarks/quality.py shape; one grid step lower trained well)
SAFETY = FACTOR


def lr_guess(tuned_lr: float, mean_sq_norm: float, rows_per_class: float) -> float:
    """The data-scaled starting point of the search (see the module docstring)."""
    norm_factor = REFERENCE_MEAN_SQ_NORM / max(mean_sq_norm, 1e-12)
    rows_factor = (REFERENCE_ROWS_PER_CLASS / max(rows_per_class, 1.0)) ** 0.25
    return tuned_lr * norm_factor * rows_factor


def lr_candidates(guess: float, factor: float = FACTOR, below: int = BELOW, above: int = ABOVE) -> list[float]:
    """``guess * factor^k``, ``k = -below..above``, ascending."""
    return [guess * factor ** k for k in range(-below, above + 1)]


@dataclass
class SearchPlan:
    """What every candidate runs: the search classes S (sorted), the rows of S it
    trains on and the held-out rows it is scored on (sorted global row ids), and the
    fixed batch sequence (each a sorted tensor of row ids)."""

    classes: Tensor
    train_rows: Tensor
    held_rows: Tensor
    batches: list[Tensor]

    @property
    def steps(self) -> int:
        return len(self.batches)

    @property
    def rows_trained(self) -> int:
        return sum(int(b.numel()) for b in self.batches)


def make_plan(labels: Tensor, num_classes: int, batch_size: int, num_candidates: int, seed: int,
              budget: float = 0.2, passes: int = 3, max_held: int = 2000, min_steps: int = MIN_STEPS) -> SearchPlan:
    """A seeded search plan whose training over all candidates costs at most
    ``budget`` of an epoch (``budget * num_samples`` training rows).

    Classes are taken in a seeded random order until their rows reach
    ``budget * num_samples / (num_candidates * passes)``, but at least
    ``min_steps * batch_size / passes`` (the floor: on a split of fewer than about
    ``min_steps * num_candidates * batch_size / budget`` rows the search costs more
    than ``budget`` of an epoch); then one row of each of
    those classes having at least two rows is held out (up to ``max_held``); the
    other rows of S are shuffled anew for each of the ``passes`` passes and cut into
    batches of ``batch_size``."""
    num_samples = labels.numel()
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + 424_242)
    counts = torch.bincount(labels, minlength=num_classes)
    target = max(min_steps * batch_size // passes, int(budget * num_samples / (num_candidates * passes)))
    order = torch.randperm(num_classes, generator=gen)
    order = order[counts[order] > 0]
    cumulative = counts[order].cumsum(0)
    take = int(torch.searchsorted(cumulative, torch.tensor(target))) + 1
    classes = order[:take].sort().values
    in_s = torch.zeros(num_classes, dtype=torch.bool)
    in_s[classes] = True
    rows = torch.nonzero(in_s[labels]).squeeze(1)
    # hold out the first row (in a seeded order) of each class with >= 2 rows
    shuffled = rows[torch.randperm(rows.numel(), generator=gen)]
    y = labels[shuffled]
    first = torch.ones_like(y, dtype=torch.bool)
    sorted_y, perm = torch.sort(y, stable=True)
    first_sorted = torch.ones_like(sorted_y, dtype=torch.bool)
    first_sorted[1:] = sorted_y[1:] != sorted_y[:-1]
    first[perm] = first_sorted
    held_mask = first & (counts[y] >= 2)
    held_idx = torch.nonzero(held_mask).squeeze(1)[:max_held]
    held = torch.zeros_like(held_mask)
    held[held_idx] = True
    held_rows, train_rows = shuffled[held].sort().values, shuffled[~held].sort().values
    batches = []
    for _ in range(passes):
        perm_rows = train_rows[torch.randperm(train_rows.numel(), generator=gen)]
        batches += [b.sort().values for b in perm_rows.split(batch_size)]
    return SearchPlan(classes, train_rows, held_rows, batches)


@dataclass
class LrSearchResult:
    """``best_lr`` and, per candidate, ``{"lr", "loss", "top1", "diverged", "seconds"}``;
    ``start`` the held-out figures of the initial weight; ``seconds`` the training
    time (all candidates) and ``eval_seconds`` the scoring time."""

    best_lr: float
    guess: float
    candidates: list[dict]
    start: dict
    steps_per_candidate: int
    rows_per_candidate: int
    seconds: float = 0.0
    eval_seconds: float = 0.0

    def as_records(self) -> list[dict]:
        """JSON-ready lines: one per candidate, then the choice."""
        lines = [{"lr_search": "candidate", **c} for c in self.candidates]
        lines.append({"lr_search": "chosen", "lr": self.best_lr, "guess": self.guess, "start_loss": self.start["loss"],
                      "steps_per_candidate": self.steps_per_candidate, "rows_per_candidate": self.rows_per_candidate,
                      "train_seconds": self.seconds, "eval_seconds": self.eval_seconds})
        return lines


@torch.no_grad()
def search_lr(plan: SearchPlan, candidates: list[float], num_classes: int, weight: Tensor, lo: int, make_loss: Callable,
              step: Callable, score: Callable[[], dict], start_rows: Tensor | None = None,
              clock: Callable[[], float] | None = None, guess: float | None = None) -> LrSearchResult:
    """Run every candidate of ``plan`` and keep the best.

    ``weight``: this process's weight rows (classes ``[lo, lo + len)``), changed in
    place during the search and restored at the end. ``start_rows``: the rows of
    the search classes to start each candidate from (this process's share of
    ``plan.classes``, in order; default: their current values; a class-mean start
    passes the means without the held-out rows, so that scoring is honest).
    ``make_loss()`` builds a fresh algorithm (duals unset); ``step(loss_fn, index,
    lr)`` applies one training step to ``weight`` and returns a
    :class:`xcent.step.StepResult`; ``score()`` evaluates ``weight`` on
    ``plan.held_rows`` and returns ``{"loss", "top1", ...}``."""
    import time

    clock = clock or time.perf_counter
    hi = lo + weight.shape[0]
    mine = plan.classes[(plan.classes >= lo) & (plan.classes < hi)].to(weight.device) - lo
    saved = weight.index_select(0, mine)
    start = saved if start_rows is None else start_rows.to(weight.device, weight.dtype)
    weight.index_copy_(0, mine, start)
    t0 = clock()
    start_score = score()
    eval_s, train_s = clock() - t0, 0.0
    results = []
    for lr in candidates:
        weight.index_copy_(0, mine, start)
        loss_fn = make_loss()
        t0 = clock()
        diverged = False
        for index in plan.batches:
            result = step(loss_fn, index, lr)
            if not result.skipped and not result.finite:
                diverged = True
                break
        t1 = clock()
        train_s += t1 - t0
        record = {"lr": lr, "loss": None, "top1": None, "diverged": diverged}
        if not diverged:
            metrics = score()
            record.update(loss=metrics["loss"], top1=metrics["top1"])
            record["diverged"] = not metrics["loss"] <= start_score["loss"] + math.log(num_classes)
        eval_s += clock() - t1
        record["seconds"] = clock() - t0
        results.append(record)
    weight.index_copy_(0, mine, saved)
    kept = [r for r in results if not r["diverged"]]
    # nothing usable: the smallest candidate is the safest fallback
    best = min(kept, key=lambda r: r["loss"])["lr"] if kept else min(candidates)
    best = max(best / SAFETY, min(candidates))
    return LrSearchResult(best, guess if guess is not None else math.nan, results, start_score, plan.steps,
                          plan.rows_trained, train_s, eval_s)


def search_lr_local(split, weight: Tensor, algorithm: str, hparams: dict, epochs: int, batch_size: int, seed: int,
                    candidates: list[float], start_rows: Tensor | None = None, budget: float = 0.2,
                    eval_chunk_rows: int = 4096, guess: float | None = None) -> LrSearchResult:
    """:func:`search_lr` in one process holding the whole ``weight``, with
    :func:`xcent.step.train_step` and :func:`xcent.evaluate.evaluate`.
    ``start_rows``: a callable ``plan -> rows`` (see :func:`search_lr`) or None."""
    from .evaluate import evaluate
    from .losses import build
    from .step import train_step

    num_classes = weight.shape[0]
    plan = make_plan(split.labels, num_classes, batch_size, len(candidates), seed, budget)

    def make_loss():
        loss_fn = build(algorithm, split.num_samples, epochs=epochs, **hparams).to(weight.device)
        loss_fn.set_epoch(1)
        return loss_fn

    def step(loss_fn, index, lr):
        feats, labels = split.gather(index)
        return train_step(weight, loss_fn, feats.to(weight.device), labels.to(weight.device), index, lr)

    def score():
        return evaluate(split, weight, rows=plan.held_rows, chunk_rows=eval_chunk_rows)

    start = start_rows(plan) if start_rows is not None else None
    return search_lr(plan, candidates, num_classes, weight, 0, make_loss, step, score, start, guess=guess)
