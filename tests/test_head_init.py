"""SparseSoftmaxHead.init_class_means_ against a dense float64 brute force (one process and
two class-sharded gloo processes), and its refusals of bad batches."""

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from init_brute import dense_search

from xcent.head import SparseSoftmaxHead
from xcent.init import DUAL_FLOOR, SCALE_BRACKET

C, D = 13, 5


def _data(n=90, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((C, D)) * 2
    y = rng.integers(0, C - 2, size=n)  # classes 11 and 12 get no rows
    x = (centers[y] + rng.standard_normal((n, D))) * 3.0
    return torch.tensor(x), torch.tensor(y)


def _unit_means(x, y, rows):
    out = np.zeros((C, D))
    for c in range(C):
        mine = [i for i in rows if y[i] == c]
        if mine:
            mean = x[mine].mean(axis=0)
            out[c] = mean / np.linalg.norm(mean)
    return out


def _ce(x, y, w):
    logits = x @ w.T
    m = logits.max(axis=1, keepdims=True)
    return float((m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)) - logits[np.arange(len(y)), y]).mean())


def _objective(x, y, w):
    """The search's objective, densely: the CE, or +inf where the rows' mean
    ``log mean_{j != y} exp(z_j - z_y)`` falls below the dual floor (xcent.init)."""
    logits = x @ w.T
    z = logits - logits[np.arange(len(y)), y][:, None]
    z[np.arange(len(y)), y] = -np.inf
    m = z.max(axis=1, keepdims=True)
    log_s = m[:, 0] + np.log(np.exp(z - m).sum(axis=1)) - math.log(w.shape[0] - 1)
    return _ce(x, y, w) if log_s.mean() >= -DUAL_FLOOR else math.inf


def brute_force(x, y, held):
    """``(weight, scale, loss, top1)``: the scale searched by the same grid rule over the
    CE of the held-out rows under the unit means of the other rows (subject to the dual
    floor), written densely (tests/init_brute.py)."""
    x, y = x.numpy(), y.numpy()
    n = len(y)
    kept = [i for i in range(n) if i not in set(held)]
    dirs = _unit_means(x, y, kept)
    xh, yh = x[held], y[held]
    mean_norm = np.linalg.norm(xh, axis=1).mean()
    scale = dense_search(xh, yh, dirs, SCALE_BRACKET[0] / mean_norm, SCALE_BRACKET[1] / mean_norm)
    loss = _ce(xh * scale, yh, dirs)
    # the search itself, checked against a grid: its scale is the grid's best
    grid = np.exp(np.linspace(np.log(SCALE_BRACKET[0] / mean_norm), np.log(SCALE_BRACKET[1] / mean_norm), 2001))
    best = grid[int(np.argmin([_objective(xh * s, yh, dirs) for s in grid]))]
    assert abs(math.log(scale / best)) < 0.01
    logits = xh @ dirs.T * scale
    target = logits[np.arange(len(yh)), yh]
    top1 = float(((logits >= target[:, None]).sum(axis=1) == 1).mean())  # ties count against
    return scale * _unit_means(x, y, range(n)), scale, loss, top1


@pytest.mark.parametrize("probe_size,stride", [(20000, 5), (7, 13)])
def test_init_class_means_equals_brute_force(probe_size, stride):
    x, y = _data()
    head = SparseSoftmaxHead(C, D, 90, algorithm="scent", lr=0.5, epochs=2, momentum=0.9, dtype=torch.float64)
    head.set_epoch(1)
    head(torch.randn(8, D, dtype=torch.float64, requires_grad=True), y[:8], torch.arange(8)).backward()
    assert bool(head.loss_fn.nu_set.any()) and bool(head.momentum_buffer.abs().sum() > 0)
    sizes = [7, 1, 30, 0, 22, 30]  # uneven, an empty one: the stream position decides
    batches = [(xb.float(), yb.int()) for xb, yb in zip(x.split(sizes), y.split(sizes))]
    result = head.init_class_means_(iter(batches), probe_size=probe_size)
    # held out: every stride-th row of the stream (20% of 90 = every 5th; or 7 rows of 90 = every 13th)
    held = list(range(0, 90, stride))
    want, scale, loss, top1 = brute_force(x.float().double(), y, held)
    assert result.scale == pytest.approx(scale, rel=1e-9)
    assert result.loss == pytest.approx(loss, rel=1e-9) and result.top1 == top1
    assert result.weight is head.weight
    np.testing.assert_allclose(head.weight.numpy(), want, rtol=1e-9, atol=1e-12)
    assert head.weight[11:].abs().sum() == 0 and result.classes_with_rows == 11
    # reset: no dual set, momentum zero, nothing pending
    assert not bool(head.loss_fn.nu_set.any()) and bool(head.loss_fn.nu.isnan().all())
    assert head.momentum_buffer.abs().sum() == 0
    before = head.weight.clone()
    head.flush()
    assert torch.equal(head.weight, before)


def _bad(head, batches, match):
    with pytest.raises(ValueError, match=match):
        head.init_class_means_(batches)


def test_bad_batches_raise_value_error():
    head = SparseSoftmaxHead(C, D, 40)
    x, y = torch.randn(6, D), torch.tensor([0, 1, 2, 3, 4, 5])
    _bad(head, [(x, y), (x, torch.tensor([0, 1, 2, 3, 4, 13]))], r"labels must be class ids in \[0, 13\)")
    _bad(head, [(x, torch.tensor([0, -1, 2, 3, 4, 5]))], r"class ids in \[0, 13\)")
    _bad(head, [(x, y[:5])], r"labels must be \(6,\)")
    _bad(head, [(torch.randn(6, D + 1), y)], rf"embeddings must be \(B, {D}\)")
    _bad(head, [(x, y.float())], "integer class ids")
    x_nan = x.clone()
    x_nan[2, 1] = float("inf")
    _bad(head, [(x, y), (x_nan, y)], "finite")
    _bad(head, [], "no rows")
    _bad(head, [(x, y, torch.arange(6))], r"\(embeddings, labels\) pairs")
    with pytest.raises(ValueError, match="probe_size"):
        head.init_class_means_([(x, y)], probe_size=0)


def _rank_batches(rank):
    """Rank 0: three batches, rank 1: two (of other sizes): the union is the data."""
    x, y = _data(n=90, seed=1)
    cuts = {0: [(0, 20), (35, 45), (60, 80)], 1: [(20, 35), (45, 60)]}
    return [(x[a:b].float(), y[a:b]) for a, b in cuts[rank]]


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    head = SparseSoftmaxHead(C, D, 90, algorithm="scent", dtype=torch.float64, process_group=dist.group.WORLD)
    r = head.init_class_means_(_rank_batches(rank), probe_size=10)
    out = {"weight": head.weight.clone(), "scale": r.scale, "loss": r.loss, "top1": r.top1,
           "seen": r.classes_with_rows, "lo": head.lo}
    bad = _rank_batches(rank)
    if rank == 1:
        bad[1] = (bad[1][0], torch.full_like(bad[1][1], C))  # only rank 1 errs, at its second batch
    try:
        head.init_class_means_(bad)
    except ValueError as e:
        out["error"] = str(e)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_class_sharded_equal_one(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # one process on the same stream in gathered order: step by step, rank 0's batch then rank 1's
    b0, b1 = _rank_batches(0), _rank_batches(1)
    stream = [b0[0], b1[0], b0[1], b1[1], b0[2]]
    head = SparseSoftmaxHead(C, D, 90, algorithm="scent", dtype=torch.float64)
    one = head.init_class_means_(stream, probe_size=10)
    assert r1["lo"] == 7 and r0["weight"].shape == (7, D) and r1["weight"].shape == (6, D)
    for r in (r0, r1):
        assert r["scale"] == pytest.approx(one.scale, rel=1e-9) and r["loss"] == pytest.approx(one.loss, rel=1e-9)
        assert r["top1"] == one.top1 and r["seen"] == one.classes_with_rows == 11
    torch.testing.assert_close(torch.cat([r0["weight"], r1["weight"]]), head.weight, rtol=1e-9, atol=1e-12)
    # the bad batch of rank 1 stops both ranks with a ValueError (no hang)
    assert "class ids in [0, 13)" in r1["error"] and "(rank 1)" in r1["error"]
    assert "rank 1 passed a bad batch" in r0["error"]
