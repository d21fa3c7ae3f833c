"""When is a training run diverged, even though every number is still finite?

A step whose loss or weights are non-finite is caught by the step itself
(:func:`xcent.step.train_step`). A learning rate far too large can instead blow the
weights up to a finite but enormous scale: at ``--lr 1e6`` SOX, BSGD, softplus and
UMAX end with a validation cross-entropy of 1.7e4 to 3.3e5 where the untrained model
has ``log C`` = 7.6, and every number stays finite.

The rule, checked after every epoch on the exact full-softmax cross-entropy of the
training rows that the trainer already computes (``train_loss``: the fixed train
subset, or the running mean of ``--train-loss running``), before the epoch is logged
or saved:

    diverged  <=>  train CE > DIVERGENCE_FACTOR * max(log C, 1)   (or not finite)

The untrained model (small random weights) scores ``log C``, and the train CE is what
every algorithm minimises: a working optimiser lowers it. A blown-up weight scales
every logit, so its CE grows like the weight norm: orders of magnitude, not a
factor. ``max(log C, 1)`` keeps the bound meaningful for two or three classes (10
nats: the true class at probability e^-10 on average). The val CE is not used: it
can rise well above ``log C`` by overfitting (12 x log C on a small random-label
set) while training is sound. Measured margins are in docs/reliability.md.

The training head (:class:`xcent.SparseSoftmaxHead`) never computes a full-softmax CE
(that would cost a pass over C classes). It applies the same bound to what each step
already has, the (B, K) relative in-batch logits ``z_ij = (w_{U_j} - w_{y_i}) . x_i``:
:func:`batch_ce_lower_bound`, the mean over the batch's rows of
``log(1 + exp(max_j z_ij))``, each row's cross-entropy against its own class and its
strongest in-batch rival alone. Every softmax normaliser the row belongs to has at
least these two terms, so this is a lower bound of the row's full-softmax CE (and of
its in-batch CE, within ``log(K - 1)`` of it): when the batch's mean exceeds the
bound, so does the full-softmax CE of those rows, i.e. the head's rule fires only
where the trainer's would on the same rows. A max over the (B, K) block costs a
fraction of the log-sum-exp (no exp; 0.14 ms against 3.6 ms at B = 1,024, K = 1,000
on one CPU thread). It is a mean over B rows rather than an epoch's training subset,
so one hard batch weighs more; the factor 10 leaves room for that (docs/head.md
gives the margins measured on healthy runs).

A weight-norm rule was rejected: healthy training legitimately grows row norms by
orders of magnitude from the small initial weights, so a norm threshold would need
per-algorithm tuning that the cross-entropy rule does not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: a run is diverged when a full-softmax CE exceeds this many times max(log C, 1)
DIVERGENCE_FACTOR = 10.0


def divergence_bound(num_classes: int) -> float:
    """The largest full-softmax cross-entropy a healthy run may report."""
    return DIVERGENCE_FACTOR * max(math.log(num_classes), 1.0)


def check_divergence(metrics: dict, num_classes: int, keys=("train_loss",)) -> str | None:
    """None if the epoch's ``metrics`` pass the rule, else why not (one phrase, e.g.
    ``train CE 3.3e+05 > 76 (10 x max(log C, 1), log C = 7.6)``). Missing or None
    entries are skipped; a non-finite value fails."""
    bound = divergence_bound(num_classes)
    for key in keys:
        value = metrics.get(key)
        if value is None:
            continue
        value = float(value)
        if not math.isfinite(value) or value > bound:
            label = key.replace("_loss", "")
            return (f"{label} CE {value:.3g} > {bound:.3g} "
                    f"({DIVERGENCE_FACTOR:g} x max(log C, 1), log C = {math.log(num_classes):.3g})")
    return None


def batch_ce_lower_bound(logits: Tensor) -> Tensor:
    """A lower bound of the mean full-softmax cross-entropy of a batch's rows, from its
    (B, K) relative in-batch logits (``-inf`` at the own class): ``mean_i log(1 +
    exp(max_j z_ij))``, each row's CE against its strongest in-batch rival alone. A
    0-dim float64 device value (no sync); NaN when a logit is. The training head
    compares it with :func:`divergence_bound`."""
    return F.softplus(logits.amax(dim=1)).mean(dtype=torch.float64)
