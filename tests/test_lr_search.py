"""--lr auto: the search plan, determinism, and a safe pick where the tuned lr diverges."""

import pytest
import torch

from xcent.classifier import init_weight
from xcent.data import load_dataset, synthesize
from xcent.losses import DEFAULTS
from xcent.lr_search import SAFETY, lr_candidates, lr_guess, make_plan, search_lr_local


@pytest.fixture(scope="module")
def norm8(tmp_path_factory):
    # features of norm 8: a step moves logits 16x further than on unit-norm data
    path = tmp_path_factory.mktemp("norm8") / "data"
    synthesize(path, num_classes=100, feature_dim=16, num_samples=4000, feature_norm=8.0, noise=1.0, seed=2)
    return load_dataset(path)


def test_plan_budget_held_out_and_batches():
    labels = torch.randint(0, 500, (400_000,), generator=torch.Generator().manual_seed(0))
    plan = make_plan(labels, 500, batch_size=128, num_candidates=6, seed=1, budget=0.2, passes=3)
    # all candidates together train on at most 20% of an epoch (plus one class's rows)
    assert 6 * plan.rows_trained <= 0.2 * 400_000 + 6 * 3 * int(torch.bincount(labels).max())
    in_s = torch.isin(labels, plan.classes)
    assert in_s[plan.train_rows].all() and in_s[plan.held_rows].all()
    assert not torch.isin(plan.held_rows, plan.train_rows).any()  # held out: never trained on
    assert torch.unique(labels[plan.held_rows]).numel() == plan.held_rows.numel()  # one per class
    trained = torch.cat(plan.batches)
    assert torch.equal(trained.sort().values, plan.train_rows.repeat(3).sort().values)  # 3 passes
    assert all(b.numel() <= 128 and torch.equal(b, b.sort().values) for b in plan.batches)
    # a small split: the floor of MIN_STEPS steps per candidate holds
    small = make_plan(labels[:5000], 500, 128, 6, seed=1)
    assert small.steps >= 60


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
    scored_best = min(kept, key=lambda c: c["loss"])
    assert scored_best["loss"] < first.start["loss"]  # it learned something
    # the choice: one grid step (SAFETY = 4) below the best score, never a diverged one
    assert first.best_lr == pytest.approx(max(scored_best["lr"] / SAFETY, min(candidates)))
    assert not by_lr[first.best_lr]["diverged"] and first.best_lr < tuned
    # same seed: the same plan, batches and scores
    assert first.best_lr == second.best_lr
    assert [(c["lr"], c["loss"]) for c in first.candidates] == [(c["lr"], c["loss"]) for c in second.candidates]
    records = first.as_records()
    assert records[-1]["lr_search"] == "chosen" and records[-1]["lr"] == first.best_lr
