"""The sparse step against the seed's dense formulation, and its memory behaviour."""

import numpy as np
import pytest
import torch
from conftest import AllocationRecorder, gamma

from xcent.classifier import (
    full_softmax_stats,
    in_batch_logits,
    init_weight,
    max_row_norm,
    scan_classes,
    score_error_bound,
    target_logits,
    tie_threshold,
)
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


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Each test using it runs at 1 and at 2 intra-op threads (a GEMM may split its work,
    and so its sums, differently)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def identical_rows(kind, dim, num_classes=100, n=24, seed=0):
    """``(features, labels, weight)`` whose C class rows are all one row: every class
    ties exactly with the true one. ``random``: normal values; ``positive``: all
    products of one sign (nonnegative features and class means), where a summation
    order drifts most; ``constant``: one value repeated (the same, and every partial
    sum rounds alike)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        row, feats = torch.randn(1, dim, generator=gen), torch.randn(n, dim, generator=gen)
    elif kind == "positive":
        row, feats = torch.rand(1, dim, generator=gen) + 0.5, torch.rand(n, dim, generator=gen) + 0.5
    else:
        row, feats = torch.full((1, dim), 0.1), torch.full((n, dim), 0.3) + 1e-3 * torch.rand(n, dim, generator=gen)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    return feats, labels, row.expand(num_classes, dim).contiguous()


@pytest.mark.parametrize("dim", [7, 512, 4096])
@pytest.mark.parametrize("kind", ["random", "positive", "constant"])
def test_identical_rows_tie_in_every_chunk_width(dim, kind, threads):
    """An exact tie counts against the model whichever GEMM kernel scores each class:
    class chunks of every width (1, odd, a power of two, all classes at once) and row
    blocks of every height take different kernel paths, whose sums of the same terms
    differ in the last bits; the rank must not (it did: 95 instead of 99 for the rows
    whose last chunk was 4 classes wide)."""
    feats, labels, weight = identical_rows(kind, dim)
    C = weight.shape[0]
    for class_chunk, row_chunk in ((1, None), (3, 5), (4, None), (16, None), (17, 1), (64, None), (C, 7)):
        _, _, rank = full_softmax_stats(feats, labels, weight, class_chunk=class_chunk, row_chunk=row_chunk)
        assert torch.equal(rank, torch.full_like(rank, C - 1)), (class_chunk, row_chunk)
    # the classes split over shards of unequal widths, as the sharded evaluation does
    target, norm = target_logits(feats, labels, weight), max_row_norm(weight)
    shards = (((0, 37), 5), ((37, 38), 1), ((38, C), 62))
    total = sum(scan_classes(feats, weight[lo:hi], target=target, labels=labels - lo, weight_norm=norm,
                             class_chunk=chunk).rank for (lo, hi), chunk in shards)
    assert torch.equal(total, torch.full_like(total, C - 1))


def exact_scores(x, weight):
    """The exact scores of float32 operands, in float64: a product of two float32 is
    exact in float64 and the sum of D <= 4096 of them is within 4096 * 2^-53 ~ 5e-13 of
    exact (relative to the magnitudes), far below the tie band tested against."""
    return x.double() @ weight.double().T


@pytest.mark.parametrize("dim", [7, 512, 4096])
def test_rank_follows_the_exact_scores_outside_the_rounding_band(dim, threads):
    """The documented rule against a float64 brute force: a class whose exact score is
    at least the true class's is always counted, one more than 2 tau below it never
    is, tau = 2 gamma_D |x| max_c |w_c| (Higham's bound on the rounding of two float32
    dot products, computed here independently of the library). Each row's label has a
    twin (an exact tie) and a near rival planted 3 tau below it; the other classes are
    random."""
    gen = torch.Generator().manual_seed(dim)
    n, C = 40, 160
    weight = torch.randn(C, dim, generator=gen)
    labels = torch.arange(n) * 4  # row i's class 4i, its twin 4i + 1, its rival 4i + 2
    x = weight[labels] + torch.randn(n, dim, generator=gen)  # near its class: the target stands out
    tau = 2 * gamma(dim) * x.double().norm(dim=1) * weight.double().norm(dim=1).max()
    for i in range(n):
        own = weight[labels[i]].double()
        weight[labels[i] + 1] = weight[labels[i]]
        step = x[i].double() / x[i].double().norm() ** 2  # moves the score of x_i by 1 per unit
        weight[labels[i] + 2] = (own - 3 * float(tau[i]) * step).float()
    tau = 2 * gamma(dim) * x.double().norm(dim=1) * weight.double().norm(dim=1).max()
    exact = exact_scores(x, weight)
    t = exact.gather(1, labels[:, None])
    others = torch.ones_like(exact, dtype=torch.bool).scatter_(1, labels[:, None], False)
    lower = ((exact >= t) & others).sum(1)
    upper = ((exact >= t - 2 * tau[:, None]) & others).sum(1)
    rival = exact.gather(1, labels[:, None] + 2).squeeze(1)
    assert bool((rival < t.squeeze(1) - 2 * tau).all())  # the planted rivals are outside the band
    assert bool((lower >= 1).all())  # the twins tie exactly
    for class_chunk in (3, 16, C):
        _, _, rank = full_softmax_stats(x, labels, weight, class_chunk=class_chunk)
        assert bool(((lower <= rank) & (rank <= upper)).all()), class_chunk
    assert float((lower == upper).float().mean()) > 0.5  # the band decides few rows: the test has teeth


def test_tie_threshold_is_target_less_the_bound_rounded_down():
    """``threshold_i`` is the largest float32 at most ``t_i - tau_i``, so comparing a
    float32 score with it is comparing with ``t_i - tau_i`` exactly; eta is Higham's
    gamma_D in float32 and float64, and larger under bf16."""
    gen = torch.Generator().manual_seed(0)
    x, target = torch.randn(500, 33, generator=gen), torch.randn(500, generator=gen) * 10
    norm = torch.tensor([3.7], dtype=torch.float64)
    thr = tie_threshold(x, target, norm)
    exact = target.double() - 2 * gamma(33) * x.double().norm(dim=1) * 3.7
    assert thr.dtype == torch.float32
    assert bool((thr.double() <= exact).all())
    assert bool((torch.nextafter(thr, torch.full_like(thr, float("inf"))).double() > exact).all())
    assert score_error_bound(33) == pytest.approx(gamma(33), rel=1e-12)
    assert score_error_bound(33, torch.float64) == pytest.approx(gamma(33, torch.float64), rel=1e-12)
    assert score_error_bound(33, precision="bf16") > 2.0 ** -9
    assert tie_threshold(x[:1], torch.tensor([float("nan")]), norm).isnan().all()


def test_nan_never_ranks_a_true_class_first():
    """A NaN feature, a NaN class row or an overflowing score leaves a row without a
    ranking: rank C, wrong at every k (NaN compares false, so it used to count as rank 0,
    right at top-1). Rows without NaN keep their rank."""
    x, y, weight = tie_problem(5)
    C = weight.shape[0]
    _, _, clean = full_softmax_stats(x, y, weight, class_chunk=8)
    x_nan = x.clone()
    x_nan[3, 0] = float("nan")
    lse, target, rank = full_softmax_stats(x_nan, y, weight, class_chunk=8)
    assert int(rank[3]) == C and bool(lse[3].isnan()) and bool(target[3].isnan())
    assert torch.equal(rank[torch.arange(len(y)) != 3], clean[torch.arange(len(y)) != 3])
    w_nan = weight.clone()
    w_nan[int(y[0]) + 1 if int(y[0]) + 1 < C else 0, 2] = float("nan")  # a class that is not row 0's
    _, _, rank = full_softmax_stats(x, y, w_nan, class_chunk=8)
    assert torch.equal(rank, torch.full_like(rank, C))
    huge = torch.full((2, 4), 3e38)  # finite features whose scores overflow float32
    _, _, rank = full_softmax_stats(huge, y[:2], weight.abs() + 1, class_chunk=8)
    assert torch.equal(rank, torch.full_like(rank, C))


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
        feats, labels, equal = identical_rows("positive", 512, num_classes=53)
        lo, hi = class_range(53, rank, world)  # 27 and 26 classes: GEMMs of other widths
        results["equal"] = sharded_stats(feats, labels, equal[lo:hi].contiguous(), lo, ctx, class_chunk=5)
        x_nan = x.clone()
        x_nan[[2, 7], 1] = float("nan")
        w_nan = weight.clone()
        w_nan[40, 0] = float("nan")  # in the second shard only
        lo, hi = class_range(53, rank, world)
        results["nan_rows"] = sharded_stats(x_nan, y, weight[lo:hi].contiguous(), lo, ctx, class_chunk=5)
        results["nan_class"] = sharded_stats(x, y, w_nan[lo:hi].contiguous(), lo, ctx, class_chunk=5)
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
        assert torch.equal(got["equal"][2], torch.full_like(got["equal"][2], 52))  # real-valued exact ties
        nan_rank = got["nan_rows"][2]  # NaN rows: rank C, the others unchanged
        assert nan_rank[[2, 7]].tolist() == [53, 53]
        keep = torch.ones_like(r, dtype=torch.bool)
        keep[[2, 7]] = False
        assert torch.equal(nan_rank[keep], r[keep])
        assert torch.equal(got["nan_class"][2], torch.full_like(r, 53))  # a NaN class: no row has a ranking
