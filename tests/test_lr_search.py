"""--lr auto: the search plan, determinism, and a safe pick where the tuned lr diverges."""

import pytest
import torch

from xcent.classifier import init_weight
from xcent.data import load_dataset, synthesize
from xcent.evaluate import evaluate
from xcent.losses import DEFAULTS, build
from xcent.lr_search import (
    MIN_CLASSES,
    SAFETY,
    floor_classes,
    floor_rows,
    halving_schedule,
    lr_candidates,
    lr_guess,
    make_plan,
    search_lr,
    search_lr_local,
)
from xcent.step import train_step


@pytest.fixture(scope="module")
def norm8(tmp_path_factory):
    # features of norm 8: a step moves logits 16x further than on unit-norm data
    path = tmp_path_factory.mktemp("norm8") / "data"
    synthesize(path, num_classes=100, feature_dim=16, num_samples=4000, feature_norm=8.0, noise=1.0, seed=2)
    return load_dataset(path)


def test_plan_budget_held_out_and_batches():
    labels = torch.randint(0, 5000, (400_000,), generator=torch.Generator().manual_seed(0))
    plan = make_plan(labels, 5000, batch_size=128, num_candidates=6, seed=1, budget=0.2, passes=3)
    assert plan.classes.numel() >= MIN_CLASSES
    assert plan.schedule == halving_schedule(6, 3) == [6, 3, 2]
    # the whole search (11 candidate-passes) trains on at most 20% of an epoch, exactly
    assert plan.max_rows == 11 * plan.train_rows.numel() <= 0.2 * 400_000 == plan.budget_rows
    assert not plan.over_budget and plan.max_rows > 0.2 * 400_000 - 11 * 128  # and fills it
    in_s = torch.isin(labels, plan.classes)
    assert in_s[plan.train_rows].all() and in_s[plan.held_rows].all()
    assert not torch.isin(plan.held_rows, plan.train_rows).any()  # held out: never trained on
    assert torch.unique(labels[plan.held_rows]).numel() == plan.held_rows.numel()  # one per class
    for batches in plan.passes:  # each pass trains every row of S once
        assert torch.equal(torch.cat(batches).sort().values, plan.train_rows)
        assert all(b.numel() <= 128 and torch.equal(b, b.sort().values) for b in batches)
    assert plan.rows_trained == 3 * plan.train_rows.numel()


def test_plan_floor_below_floor_rows():
    assert floor_rows(6, 128, 0.2) == 7040  # 11 candidate-passes of one batch
    assert floor_classes(6, 0.2) == 1320  # 11 candidate-passes of 24 classes
    labels = torch.arange(7040) % 2000  # 3.5 rows per class: one batch is more than 24 classes
    at = make_plan(labels, 2000, 128, 6, seed=3, budget=0.2)
    assert not at.over_budget and at.max_rows <= 0.2 * 7040
    small = make_plan(torch.arange(5000) % 20, 20, 128, 6, seed=3, budget=0.2, min_classes=0)
    # the rows floor alone: S still holds one batch of rows (one class, in part; one row held out)
    assert small.over_budget and small.train_rows.numel() == 127 and small.held_rows.numel() == 1
    assert small.max_rows == 11 * 127 > small.budget_rows == 1000
    # few classes: S holds MIN_CLASSES classes' worth of rows, over the budget
    few = make_plan(torch.arange(100_000) % 300, 300, 128, 6, seed=3, budget=0.2)
    assert few.classes.numel() >= MIN_CLASSES and few.over_budget
    assert few.train_rows.numel() + few.held_rows.numel() == 8000  # 24 x 100,000 / 300
    # a long tail: one class of half the rows does not force the floor (2,000 classes > 1,320)
    tail = torch.cat([torch.zeros(50_000, dtype=torch.long), torch.arange(50_000) % 2000])
    for seed in range(5):
        plan = make_plan(tail, 2000, 128, 6, seed=seed, budget=0.2)
        assert not plan.over_budget and plan.max_rows <= 20_000


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    # 2,000 classes: the budget (not the floor) sizes the search
    path = tmp_path_factory.mktemp("wide") / "data"
    synthesize(path, num_classes=2000, feature_dim=16, num_samples=24_000, feature_norm=8.0, noise=1.0, seed=4)
    return load_dataset(path)


def test_search_counts_training_rows_exactly(wide):
    counted = []

    def step(loss_fn, index, local, lr):
        counted.append(int(index.numel()))
        feats, labels = wide.train.gather(index)
        return train_step(weight, loss_fn, feats, labels, local, lr)

    def make_loss(num_samples):
        loss_fn = build("scent", num_samples, epochs=3)
        loss_fn.set_epoch(1)
        return loss_fn

    weight = init_weight(2000, 16, seed=0)
    candidates = lr_candidates(0.05)
    plan = make_plan(wide.train.labels, 2000, 64, len(candidates), seed=5, budget=0.2)
    assert not plan.over_budget
    result = search_lr(plan, candidates, 2000, weight, 0, make_loss, step,
                       lambda: evaluate(wide.train, weight, rows=plan.held_rows), batch_size=64)
    # every row of every step counted: at most 20% of an epoch's rows
    assert result.rows_trained == sum(counted) == sum(c["rows"] for c in result.candidates)
    assert result.rows_trained <= int(0.2 * wide.train.num_samples) == result.budget_rows
    assert result.epoch_share == pytest.approx(sum(counted) / wide.train.num_samples)
    # successive halving: at most schedule[p] candidates scored after pass p + 1
    for p, k in enumerate(plan.schedule):
        assert sum(c["passes"] > p for c in result.candidates) <= k
    assert "search cost" in result.cost_line() and "data under" not in result.cost_line()


def test_guess_scales_with_norm_and_rows():
    base = lr_guess(5.0, 4.0, 47.0)
    assert base == pytest.approx(5.0)
    assert lr_guess(5.0, 400.0, 47.0) == pytest.approx(base / 100)  # 1 / |x|^2
    assert lr_guess(5.0, 4.0, 47.0 / 16) == pytest.approx(2 * base)  # (rows ratio)^(1/4)
    c = lr_candidates(1.0)
    assert c[0] < 1.0 < c[-1] and all(b / a == pytest.approx(4.0) for a, b in zip(c, c[1:], strict=False))


def test_auto_lr_avoids_the_diverging_default_and_is_deterministic(norm8):
    tuned = DEFAULTS["scent"]["lr"]
    candidates = [tuned * 4.0 ** -k for k in range(5)]  # 5, 1.25, ..., 0.02

    def run():
        weight = init_weight(100, 16, seed=0)
        before = weight.clone()
        result = search_lr_local(norm8.train, weight, "scent", {}, 3, 64, 42, candidates)
        assert torch.equal(weight, before)  # the search leaves the weight as it found it
        return result

    first, second = run(), run()
    by_lr = {c["lr"]: c for c in first.candidates}
    assert by_lr[tuned]["diverged"]  # the tuned default diverges on this data
    kept = [c for c in first.candidates if not c["diverged"]]
    most = max(c["passes"] for c in kept)
    scored_best = min((c for c in kept if c["passes"] == most), key=lambda c: c["loss"])
    assert scored_best["loss"] < first.start["loss"]  # it learned something
    # the choice: one grid step (SAFETY = 4) below the best score of the longest survivors
    assert first.best_lr == pytest.approx(scored_best["lr"] / SAFETY) and first.best_lr < tuned
    # same seed: the same plan, batches and scores
    assert first.best_lr == second.best_lr
    assert [(c["lr"], c["loss"]) for c in first.candidates] == [(c["lr"], c["loss"]) for c in second.candidates]
    records = first.as_records()
    assert records[-1]["lr_search"] == "chosen" and records[-1]["lr"] == first.best_lr
