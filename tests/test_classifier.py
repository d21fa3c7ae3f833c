"""The sparse step against the seed's dense formulation, and its memory behaviour."""

import numpy as np
import pytest
import torch
from conftest import AllocationRecorder

from xcent.classifier import full_softmax_stats, in_batch_logits, init_weight
from xcent.losses import build
from xcent.step import train_step

ALGOS = ["scent", "sox", "asgd", "softplus", "umax", "bsgd"]


def dense_step(linear, optimizer, loss_fn, x, y, idx):
    """The seed's formulation: full (B, C) scores, autograd through indexing, SGD on all rows."""
    optimizer.zero_grad()
    scores = linear(x)
    U = torch.unique(y)
    z = scores[:, U] - scores[torch.arange(len(y)), y][:, None]
    own = (U[None, :] == y[:, None])
    z = z.masked_fill(own, float("-inf"))
    loss = loss_fn(z, idx)
    loss.backward()
    optimizer.step()
    return loss


@pytest.mark.parametrize("name", ALGOS)
def test_sparse_step_equals_dense_sgd(name):
    torch.manual_seed(0)
    C, D, B, lr = 40, 8, 12, 0.7
    weight = init_weight(C, D, seed=1, dtype=torch.float64) * 30  # logits of order 1
    linear = torch.nn.Linear(D, C, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(weight)
    opt = torch.optim.SGD(linear.parameters(), lr=lr)
    sparse_algo, dense_algo = build(name, 30, dtype=torch.float64), build(name, 30, dtype=torch.float64)
    rng = np.random.default_rng(0)
    for step in range(4):
        for a in (sparse_algo, dense_algo):
            a.set_epoch(1 + step, 4)
        x = torch.randn(B, D, dtype=torch.float64)
        y = torch.tensor(rng.choice([0, 3, 3, 7, 7, 7, 11, 25, 39], size=B))  # repeated labels
        idx = torch.tensor(rng.choice(30, size=B, replace=False))
        result = train_step(weight, sparse_algo, x, y, idx, lr)
        assert not result.skipped and result.finite
        dense_step(linear, opt, dense_algo, x, y, idx)
        torch.testing.assert_close(weight, linear.weight.detach(), rtol=1e-6, atol=1e-9)
        if name != "bsgd":
            torch.testing.assert_close(sparse_algo.nu, dense_algo.nu, rtol=1e-6, atol=1e-9, equal_nan=True)


def test_in_batch_logits_layout():
    weight = torch.randn(10, 4, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([7, 2, 7, 9, 2])
    b = in_batch_logits(x, y, weight)
    assert b.classes.tolist() == [2, 7, 9]
    assert b.label_pos.tolist() == [1, 0, 1, 2, 0]
    for i in range(5):
        for j, c in enumerate(b.classes.tolist()):
            expected = float("-inf") if c == y[i] else float((weight[c] - weight[y[i]]) @ x[i])
            assert b.logits[i, j].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_single_label_batch_is_skipped():
    weight = torch.randn(6, 3)
    before = weight.clone()
    algo = build("scent", 4)
    r = train_step(weight, algo, torch.randn(4, 3), torch.tensor([2, 2, 2, 2]), torch.arange(4), 1.0)
    assert r.skipped
    assert torch.equal(weight, before)
    assert not algo.nu_set.any()


@pytest.mark.parametrize("name", ["scent", "bsgd", "softplus"])
def test_sparse_step_touches_only_batch_rows_and_memory_is_independent_of_C(name):
    D, B = 16, 32
    max_alloc = {}
    for C in (20_000, 2_000_000):
        weight = init_weight(C, D, seed=0)
        before = weight.clone()
        algo = build(name, 1000, epochs=1)
        algo.set_epoch(1)
        y = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(1))
        x = torch.randn(B, D)
        with AllocationRecorder() as rec:
            train_step(weight, algo, x, y, torch.arange(B), 1.0)
        max_alloc[C] = rec.max_numel
        touched = torch.zeros(C, dtype=torch.bool)
        touched[y] = True
        assert torch.equal(weight[~touched], before[~touched])  # bit for bit
        assert not torch.equal(weight[touched], before[touched])
    assert max_alloc[2_000_000] == max_alloc[20_000]
    assert max_alloc[2_000_000] < 20_000


def test_full_softmax_stats_equal_dense():
    torch.manual_seed(3)
    C, D, n = 37, 5, 23
    weight, x = torch.randn(C, D, dtype=torch.float64), torch.randn(n, D, dtype=torch.float64)
    y = torch.randint(0, C, (n,))
    lse, target, rank = full_softmax_stats(x, y, weight, class_chunk=8)
    scores = x @ weight.T
    torch.testing.assert_close(lse, torch.logsumexp(scores, 1))
    torch.testing.assert_close(target, scores[torch.arange(n), y])
    order = scores.argsort(dim=1, descending=True)
    true_rank = (order == y[:, None]).float().argmax(dim=1)
    assert torch.equal(rank, true_rank)
