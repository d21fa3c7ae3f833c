"""The sparse step against the seed's dense formulation, and its memory behaviour."""

import numpy as np
import pytest
import torch
from conftest import AllocationRecorder

from xcent.classifier import full_softmax_stats, in_batch_logits, init_weight, scan_classes
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


def brute_rank(scores, y):
    """Other classes scoring at least as high as the true one (ties count against)."""
    own = scores.gather(1, y[:, None])
    return (scores >= own).sum(dim=1) - 1


def tie_problem(seed, n=41, num_classes=53, dim=4):
    """Integer weights and features in {-1, 0, 1}: every score is an exact small
    integer whatever the summation order, so ties are plentiful and exact."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randint(-1, 2, (num_classes, dim), generator=gen).float()
    x = torch.randint(-1, 2, (n, dim), generator=gen).float()
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return x, y, weight


@pytest.mark.parametrize("class_chunk,row_chunk", [(5, 7), (53, None), (16, 1), (4096, 100)])
def test_scan_classes_equals_dense_with_ties(class_chunk, row_chunk):
    x, y, weight = tie_problem(0)
    scores = x @ weight.T
    assert (brute_rank(scores, y) > 0).float().mean() > 0.5  # the ties are really there
    out = torch.empty_like(scores)
    target = scores.gather(1, y[:, None]).squeeze(1)
    scan = scan_classes(x, weight, target=target, labels=y, k=6, scores_out=out, class_chunk=class_chunk,
                        row_chunk=row_chunk)
    assert torch.equal(scan.rank, brute_rank(scores, y))
    assert torch.equal(out, scores)
    torch.testing.assert_close(scan.lse, torch.logsumexp(scores, dim=1))
    want = torch.sort(scores, dim=1, descending=True).values[:, :6]
    assert torch.equal(scan.top_scores, want)
    # ids are any of the tied classes: their scores are the top scores, each id once
    assert torch.equal(scores.gather(1, scan.top_ids), want)
    assert all(len(set(r)) == 6 for r in scan.top_ids.tolist())


def test_full_softmax_stats_counts_ties_against_the_model():
    x, y, weight = tie_problem(1)
    lse, target, rank = full_softmax_stats(x, y, weight, class_chunk=8)
    assert torch.equal(rank, brute_rank(x @ weight.T, y))
    # all-zero weight: every class ties with the true one, nothing is right at top-5
    C = weight.shape[0]
    _, _, rank = full_softmax_stats(x, y, torch.zeros_like(weight), class_chunk=8)
    assert torch.equal(rank, torch.full_like(rank, C - 1))
    # all-equal rows with real values and real features: the scores tie exactly only
    # if the target is computed with the GEMM's arithmetic (a product-sum differs in
    # the last bit for about half of the rows)
    gen = torch.Generator().manual_seed(2)
    for dim in (7, 512):
        row = torch.randn(1, dim, generator=gen)
        feats = torch.randn(300, dim, generator=gen)
        labels = torch.randint(0, 100, (300,), generator=gen)
        _, _, rank = full_softmax_stats(feats, labels, row.expand(100, dim).contiguous(), class_chunk=16)
        assert torch.equal(rank, torch.full_like(rank, 99))


def test_class_shards_sum_to_the_full_rank_and_lse():
    """What the class-sharded evaluation does across ranks, on one process: each
    shard scans its classes with the global target; ranks add, lses combine."""
    x, y, weight = tie_problem(3)
    lse, target, rank = full_softmax_stats(x, y, weight)
    parts = [(0, 20), (20, 21), (21, 53)]
    ranks, lses, targets = [], [], []
    for lo, hi in parts:
        shard_lse, shard_target, shard_rank = full_softmax_stats(x, y, weight[lo:hi], class_offset=lo, class_chunk=6)
        ranks.append(shard_rank), lses.append(shard_lse), targets.append(shard_target)
    assert torch.equal(sum(targets), target)  # each target comes from exactly one shard
    g = sum(targets)
    total = sum(scan_classes(x, weight[lo:hi], target=g, labels=y - lo, class_chunk=6).rank for lo, hi in parts)
    assert torch.equal(total, rank) and torch.equal(rank, brute_rank(x @ weight.T, y))
    torch.testing.assert_close(torch.logsumexp(torch.stack(lses), 0), lse)
    scan = scan_classes(x, weight[21:], k=3, class_offset=21)
    assert bool((scan.top_ids >= 21).all())


def _sharded_stats_worker(rank, world, store_path, out_dir):
    import torch.distributed as dist

    from xcent.distributed import DistContext, class_range, sharded_stats

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        ctx = DistContext(rank, world, torch.device("cpu"))
        x, y, weight = tie_problem(4)
        results = {}
        for name, w in (("ties", weight), ("zero", torch.zeros_like(weight))):
            lo, hi = class_range(w.shape[0], rank, world)
            results[name] = sharded_stats(x, y, w[lo:hi].contiguous(), lo, ctx, class_chunk=5)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_stats_count_ties_like_one_process(tmp_path):
    """The distributed evaluation (gloo, 2 processes) applies the same tie rule."""
    import torch.multiprocessing as mp

    mp.spawn(_sharded_stats_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    x, y, weight = tie_problem(4)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        lse, target, r = got["ties"]
        assert torch.equal(r, brute_rank(x @ weight.T, y))
        torch.testing.assert_close(lse, torch.logsumexp(x @ weight.T, dim=1))
        assert torch.equal(got["zero"][2], torch.full_like(r, weight.shape[0] - 1))
