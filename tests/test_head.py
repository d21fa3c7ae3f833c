"""xcent.SparseSoftmaxHead against float64 brute force of the spec and dense torch.optim.SGD."""

import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import AllocationRecorder, sgd_drift

from xcent.classifier import init_weight
from xcent.head import SparseSoftmaxHead
from xcent.losses import build
from xcent.step import LazySGD, train_step
from xcent.train import lr_at

ALGOS = ["scent", "sox", "asgd", "softplus", "umax", "bsgd"]
HP = {"scent": {"gamma": 1.5}, "sox": {"gamma": 0.3}, "asgd": {"gamma": 0.7}, "softplus": {"gamma": 0.7, "rho": 0.5},
      "umax": {"gamma": 0.7, "delta": 0.05}, "bsgd": {}}


def spec_step(name, hp, W, nu, nu_set, x, y, idx, epoch, epochs, lr):
    """One step of ALGORITHMS.md, written out in float64 numpy over the dense weight:
    returns (dL/dx, new W, new nu, new set)."""
    W, x, nu, nu_set = W.copy(), x.copy(), nu.copy(), nu_set.copy()
    B = len(y)
    U = np.unique(y)
    _K, m = len(U), len(U) - 1
    pos = np.searchsorted(U, y)
    z = (x @ W[U].T) - (x * W[y]).sum(1, keepdims=True)
    z[np.arange(B), pos] = -np.inf
    log_s = np.log(np.exp(z).sum(1) / m)
    first = ~nu_set[idx]
    old = np.where(first, 0.0, nu[idx])
    gamma = hp.get("gamma", 0.0)
    asgd_r = gamma * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if name == "bsgd":
        e = np.exp(z - z.max(1, keepdims=True))
        G = e / e.sum(1, keepdims=True) / B
        new = None
    elif name == "softplus":
        rho = hp["rho"]
        q0 = (np.exp(z) / (1 + rho * np.exp(z))).sum(1) / m
        nu_old = np.where(first, np.log(q0), old)
        e = np.exp(z - nu_old[:, None])
        q = (e / (1 + rho * e)).sum(1) / m
        new = np.where(first, np.log(q0), nu_old - asgd_r * (1 - q))
        G = e / (1 + rho * e) / (B * m)
    else:
        nu_old = np.where(first, log_s, old)
        if name == "scent":
            a = math.exp(gamma)
            step = nu_old + np.log1p(a * np.exp(log_s)) - np.log1p(a * np.exp(nu_old))
        elif name == "sox":
            r = gamma + (1 - gamma) * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
            step = np.log((1 - r) * np.exp(nu_old) + r * np.exp(log_s))
        else:
            step = nu_old - asgd_r * (1 - np.exp(log_s - nu_old))
            if name == "umax":
                step = np.where(step < log_s - hp["delta"], log_s, step)
        new = np.where(first, log_s, step)
        used = nu_old if name == "asgd" else new
        G = np.exp(z - used[:, None]) / (B * m)
    G[np.arange(B), pos] = 0.0
    dx = G @ W[U] - G.sum(1, keepdims=True) * W[y]
    grad = np.zeros_like(W)
    np.add.at(grad, U, G.T @ x)
    np.add.at(grad, y, -G.sum(1, keepdims=True) * x)
    W -= lr * grad
    if new is not None:
        nu[idx] = new
        nu_set[idx] = True
    return dx, W, nu, nu_set


@pytest.mark.parametrize("name", ALGOS)
def test_step_equals_float64_spec(name):
    C, D, N, B, E = 30, 6, 24, 10, 3
    head = SparseSoftmaxHead(C, D, N, algorithm=name, lr=0.8, epochs=E, dtype=torch.float64, **HP[name])
    with torch.no_grad():
        head.weight.mul_(40)  # logits of order 1
    head.set_epoch(2)
    rng = np.random.default_rng(1)
    batches = [np.arange(0, B), np.r_[np.arange(5, 10), np.arange(15, 20)]]  # first visits, then half revisits
    for idx in batches:
        y = rng.choice([0, 3, 3, 7, 7, 7, 11, 25, 29], size=B)  # repeated labels
        x = rng.normal(size=(B, D))
        nu = head.loss_fn.nu.numpy().copy()
        ref = spec_step(name, HP[name], head.weight.numpy(), nu, head.loss_fn.nu_set.numpy(), x, y, idx, 2, E,
                        lr_at(2, E, 0.8))
        xt = torch.tensor(x, requires_grad=True)
        loss = head(xt, torch.tensor(y), torch.tensor(idx))
        loss.backward()
        np.testing.assert_allclose(xt.grad.numpy(), ref[0], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(head.weight.numpy(), ref[1], rtol=1e-6, atol=1e-12)
        if name != "bsgd":
            np.testing.assert_allclose(head.loss_fn.nu.numpy(), ref[2], rtol=1e-6, atol=1e-12)
            assert np.array_equal(head.loss_fn.nu_set.numpy(), ref[3])


@pytest.mark.parametrize("name", ["asgd", "sox", "softplus", "umax"])
def test_schedule_dependent_algorithms_need_an_epoch(name):
    head = SparseSoftmaxHead(10, 4, 8, algorithm=name, epochs=3)
    with pytest.raises(RuntimeError, match="set_epoch"):
        head(torch.randn(4, 4), torch.tensor([0, 1, 2, 3]), torch.arange(4))


def snapshot(head):
    return {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in head.state_dict().items()}


def test_forward_without_backward_changes_nothing():
    head = SparseSoftmaxHead(20, 4, 16, algorithm="scent", epochs=2, momentum=0.5, weight_decay=0.1)
    head.set_epoch(1)
    x, y, idx = torch.randn(8, 4, requires_grad=True), torch.tensor([0, 1, 1, 2, 5, 5, 9, 3]), torch.arange(8)
    head(x, y, idx).backward()  # some state to preserve
    before = snapshot(head)
    with torch.no_grad():
        head(x, y, idx + 8)
    head.eval()
    head(x, y, idx + 8)
    head.train()
    after = snapshot(head)
    for k, v in before.items():
        if torch.is_tensor(v):
            assert torch.equal(v, after[k]) or torch.allclose(v, after[k], equal_nan=True), k


def dense_reference(name, C, D, N, lr, momentum, weight_decay, W0, **hparams):
    """The reference implementation's formulation: nn.Linear, in-batch logits by
    indexing, autograd to a dense (C, D) gradient, torch.optim.SGD over all rows."""
    linear = torch.nn.Linear(D, C, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(W0)
    opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = build(name, N, dtype=torch.float64, **hparams)

    def step(x, y, idx):
        opt.zero_grad()
        x = x.clone().requires_grad_(True)
        scores = linear(x)
        U = torch.unique(y)
        z = scores[:, U] - scores[torch.arange(len(y)), y][:, None]
        z = z.masked_fill(U[None, :] == y[:, None], float("-inf"))
        loss_fn(z, idx).backward()
        opt.step()
        return x.grad

    return linear, opt, loss_fn, step


@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 0.05), (0.0, 0.05), (0.9, 0.0)])
def test_momentum_and_weight_decay_equal_dense_sgd(momentum, weight_decay):
    C, D, N, B, E, lr = 40, 5, 60, 12, 3, 0.5
    head = SparseSoftmaxHead(C, D, N, algorithm="sox", lr=lr, epochs=E, momentum=momentum,
                             weight_decay=weight_decay, dtype=torch.float64, gamma=0.5)
    with torch.no_grad():
        head.weight.mul_(30)
    linear, opt, loss_fn, dense_step = dense_reference("sox", C, D, N, lr, momentum, weight_decay, head.weight,
                                                        gamma=0.5)
    gen = torch.Generator().manual_seed(3)
    for epoch in range(1, E + 1):
        head.set_epoch(epoch)
        loss_fn.set_epoch(epoch, E)
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, E, lr)
        order = torch.randperm(N, generator=gen)
        for s in range(0, N, B):
            idx = order[s:s + B]
            # classes 0..24 only (rows 25..39 never touched), epoch 2 only 0..9: untouched rows
            # must still decay and move by their momentum
            y = torch.randint(0, 10 if epoch == 2 else 25, (len(idx),), generator=gen)
            x = torch.randn(len(idx), D, generator=gen, dtype=torch.float64)
            xt = x.clone().requires_grad_(True)
            head(xt, y, idx).backward()
            dense_dx = dense_step(x, y, idx)
            torch.testing.assert_close(xt.grad, dense_dx, rtol=1e-9, atol=1e-12)
        head.flush()  # lazily caught-up rows, here explicitly, to compare every row
        torch.testing.assert_close(head.weight, linear.weight.detach(), rtol=1e-9, atol=1e-12)
        if momentum:
            torch.testing.assert_close(head.momentum_buffer, opt.state[linear.weight]["momentum_buffer"],
                                       rtol=1e-9, atol=1e-12)


def test_momentum_float32_equals_dense_sgd_to_rounding():
    C, D, N, B, E, lr = 200, 16, 64, 16, 2, 0.5
    head = SparseSoftmaxHead(C, D, N, algorithm="scent", lr=lr, epochs=E, momentum=0.9, weight_decay=1e-3)
    linear = torch.nn.Linear(D, C, bias=False)
    with torch.no_grad():
        linear.weight.copy_(head.weight)
    opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
    loss_fn = build("scent", N)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(1, E + 1):
        head.set_epoch(epoch)
        opt.param_groups[0]["lr"] = lr_at(epoch, E, lr)
        for s in range(0, N, B):
            idx = torch.arange(s, s + B)
            y, x = torch.randint(0, 50, (B,), generator=gen), torch.randn(B, D, generator=gen)
            head(x.clone().requires_grad_(True), y, idx).backward()
            opt.zero_grad()
            scores = linear(x.detach())
            U = torch.unique(y)
            z = scores[:, U] - scores[torch.arange(B), y][:, None]
            loss_fn(z.masked_fill(U[None, :] == y[:, None], float("-inf")), idx).backward()
            opt.step()
    head.flush()
    bound = sgd_drift(E * N // B, B + D, momentum=0.9) * float(linear.weight.detach().abs().max())
    torch.testing.assert_close(head.weight, linear.weight.detach(), rtol=0, atol=bound)


def run_steps(head, steps, seed, C, D, N, B):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(N, generator=gen)[:B]
        y, x = torch.randint(0, C, (B,), generator=gen), torch.randn(B, D, generator=gen, requires_grad=True)
        head(x, y, idx).backward()


@pytest.mark.parametrize("name", ["scent", "asgd"])
def test_exact_resume_mid_epoch(name):
    C, D, N, B = 50, 6, 40, 8
    kw = {"algorithm": name, "lr": 0.5, "epochs": 3, "momentum": 0.9, "weight_decay": 0.01}
    a = SparseSoftmaxHead(C, D, N, **kw)
    a.set_epoch(1)
    run_steps(a, 6, 0, C, D, N, B)
    a.set_epoch(2)
    run_steps(a, 3, 1, C, D, N, B)
    saved = snapshot(a)  # mid-epoch 2
    run_steps(a, 4, 2, C, D, N, B)
    a.set_epoch(3)
    run_steps(a, 2, 3, C, D, N, B)
    b = SparseSoftmaxHead(C, D, N, **kw)
    b.set_epoch(1)
    run_steps(b, 3, 9, C, D, N, B)  # its own pending lazy rows must not leak into the loaded state
    b.load_state_dict(saved)
    assert b.epoch == 2
    run_steps(b, 4, 2, C, D, N, B)
    b.set_epoch(3)
    run_steps(b, 2, 3, C, D, N, B)
    for k, v in a.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, b.state_dict()[k]) or torch.allclose(v, b.state_dict()[k], rtol=0, atol=0,
                                                                        equal_nan=True), k


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_no_allocation_scales_with_classes(momentum):
    D, N, B = 4, 64, 32
    peaks = {}
    for C in (20_000, 2_000_000):
        head = SparseSoftmaxHead(C, D, N, algorithm="scent", epochs=2, momentum=momentum, weight_decay=0.01)
        head.set_epoch(1)
        run_steps(head, 2, 0, C, D, N, B)  # warm: momentum rows with history
        rec = AllocationRecorder()
        with rec:
            run_steps(head, 2, 1, C, D, N, B)
        peaks[C] = rec.max_numel
    assert peaks[20_000] == peaks[2_000_000]
    assert peaks[2_000_000] <= 4 * B * B  # a (B, K) block at most, never C-sized


def test_autocast_bfloat16():
    torch.manual_seed(0)
    C, D, N, B = 30, 8, 20, 12
    backbone = torch.nn.Linear(5, D)
    head = SparseSoftmaxHead(C, D, N, algorithm="scent", epochs=1)
    twin = copy.deepcopy(head)
    head.set_epoch(1)
    twin.set_epoch(1)
    x, y, idx = torch.randn(B, 5), torch.randint(0, C, (B,)), torch.arange(B)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = backbone(x)
        assert emb.dtype == torch.bfloat16
        emb.retain_grad()
        loss = head(emb, y, idx)
    assert loss.dtype == torch.float32
    loss.backward()
    assert emb.grad.dtype == torch.bfloat16
    ref = emb.detach().float().requires_grad_(True)
    twin(ref, y, idx).backward()
    torch.testing.assert_close(emb.grad.float(), ref.grad, rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(head.weight, twin.weight)  # head arithmetic in float32 on the same values


def test_logits_and_topk():
    head = SparseSoftmaxHead(100, 8, 10, algorithm="bsgd", epochs=1)
    x = torch.randn(5, 8)
    full = x @ head.weight.T
    torch.testing.assert_close(head.logits(x), full)
    top = head.topk(x, 3)
    assert torch.equal(top.ids, full.topk(3, dim=1).indices)
    torch.testing.assert_close(top.probs, torch.softmax(full, 1).topk(3, dim=1).values)


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for name, mom in (("scent", 0.0), ("sox", 0.9)):
        head = SparseSoftmaxHead(45, 6, 40, algorithm=name, lr=0.7, epochs=2, momentum=mom, weight_decay=0.01,
                                 process_group=dist.group.WORLD, init_seed=3, dtype=torch.float64)
        head.set_epoch(1)
        losses, grads = [], []
        for step, (x, y, idx) in enumerate(_batches()):
            if step == 2:
                head.set_epoch(2)
            part = slice(rank * 6, (rank + 1) * 6) if step != 1 else (slice(0, 7) if rank == 0 else slice(7, 12))
            xl = x[part].clone().requires_grad_(True)
            loss = head(xl, y[part], idx[part])
            loss.backward()
            losses.append(loss.item())
            grads.append(xl.grad)
        head.flush()
        results[name] = {"losses": losses, "grads": grads, "weight": head.weight.clone(), "nu": head.loss_fn.nu.clone(),
                         "lo": head.lo, "topk": head.topk(_batches()[0][0][rank * 6:(rank + 1) * 6], 4),
                         "logits": head.logits(_batches()[1][0][rank * 5:(rank + 1) * 5 + rank])}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _batches():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(12, 6, generator=gen, dtype=torch.float64) * 5, torch.randint(0, 45, (12,), generator=gen),
             torch.randperm(40, generator=gen)[:12]) for _ in range(4)]


def test_two_gloo_processes_equal_one(tmp_path):
    """The sharded head computes what one process computes. In float64, so that what is
    compared is the arithmetic and not the rounding: the two process counts sum in other
    orders (GEMMs of other shapes), which moves each float64 result by at most
    2 gamma_n (n <= 60 terms per sum: gamma_n = n 2^-53 ~ 7e-15) relative to the sum of
    its terms' magnitudes per operation; 4 steps, even amplified a thousandfold by the
    exponentials of the loss, stay below 1e-10, while a real fault (a row of the wrong
    shard, a step lost or applied twice) moves the weights by lr * gradient ~ 1e-2.
    In float32 the same bound is ~1e-4 and a fixed 1e-5 failed on some CPUs."""
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, mom in (("scent", 0.0), ("sox", 0.9)):
        head = SparseSoftmaxHead(45, 6, 40, algorithm=name, lr=0.7, epochs=2, momentum=mom, weight_decay=0.01,
                                 init_seed=3, dtype=torch.float64)
        head.set_epoch(1)
        for step, (x, y, idx) in enumerate(_batches()):
            if step == 2:
                head.set_epoch(2)
            xg = x.clone().requires_grad_(True)
            loss = head(xg, y, idx)
            loss.backward()
            split = 7 if step == 1 else 6
            for r, part in enumerate((slice(0, split), slice(split, 12))):
                assert ranks[r][name]["losses"][step] == pytest.approx(loss.item(), rel=1e-10, abs=1e-12)
                torch.testing.assert_close(ranks[r][name]["grads"][step], xg.grad[part], rtol=1e-10, atol=1e-12)
        head.flush()
        assert ranks[1][name]["lo"] == 23
        torch.testing.assert_close(torch.cat([ranks[0][name]["weight"], ranks[1][name]["weight"]]), head.weight,
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ranks[0][name]["nu"], head.loss_fn.nu, rtol=1e-10, atol=1e-12, equal_nan=True)
        x0 = _batches()[0][0]
        for r in range(2):
            top = head.topk(x0[r * 6:(r + 1) * 6], 4)
            assert torch.equal(ranks[r][name]["topk"].ids, top.ids)
            rows = _batches()[1][0][r * 5:(r + 1) * 5 + r]  # 5 and 6 rows: unequal batches
            torch.testing.assert_close(ranks[r][name]["logits"], head.logits(rows), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(ranks[r][name]["topk"].probs, top.probs, rtol=1e-10, atol=1e-12)


def test_train_step_with_lazy_sgd_equals_dense_sgd():
    """The linear trainer's step (``xcent train --momentum/--weight-decay``) is the same update."""
    C, D, N, B, E, lr = 30, 5, 36, 9, 2, 0.4
    weight = init_weight(C, D, seed=2, dtype=torch.float64) * 30
    linear, opt, dense_loss, dense_step = dense_reference("scent", C, D, N, lr, 0.8, 0.02, weight)
    loss_fn = build("scent", N, dtype=torch.float64)
    optimizer = LazySGD(C, D, momentum=0.8, weight_decay=0.02, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    for epoch in range(1, E + 1):
        opt.param_groups[0]["lr"] = lr_at(epoch, E, lr)
        optimizer.flush(weight)
        for s in range(0, N, B):
            idx = torch.arange(s, s + B)
            y, x = torch.randint(0, 12, (B,), generator=gen), torch.randn(B, D, generator=gen, dtype=torch.float64)
            train_step(weight, loss_fn, x, y, idx, lr_at(epoch, E, lr), optimizer=optimizer)
            dense_step(x, y, idx)
    optimizer.flush(weight)
    torch.testing.assert_close(weight, linear.weight.detach(), rtol=1e-9, atol=1e-12)


def test_xcent_train_momentum_weight_decay(tiny_data, tmp_path):
    """``xcent train --momentum --weight-decay``: the epoch-end weight equals dense
    torch.optim.SGD on the same batches (the trainer's own step, replayed), the momentum
    buffer is checkpointed, and a resumed run continues exactly."""
    from xcent.config import config_from_argv
    from xcent.data import load_dataset
    from xcent.modelio import load as load_ckpt
    from xcent.train import epoch_permutation
    from xcent.train import train as run_train

    def args(name, *extra):
        return ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", name, "--epochs", "2",
                "--batch-size", "50", "--train-eval-size", "100", "--lr", "2.0", "--momentum", "0.9",
                "--weight-decay", "0.01", "--init", "random", *extra]  # the replay starts from init_weight

    run_train(config_from_argv(args("full")), echo=lambda *_: None)
    ckpt = load_ckpt(tmp_path / "full" / "checkpoints" / "epoch_2.pt")
    assert ckpt["momentum_buffer"].shape == ckpt["weight"].shape
    # dense replay: nn.Linear + autograd + torch.optim.SGD over every row, same batches
    data = load_dataset(tiny_data)
    c = config_from_argv(args("replay"))
    C, D, N = data.num_classes, data.feature_dim, data.train.num_samples
    linear = torch.nn.Linear(D, C, bias=False)
    with torch.no_grad():
        linear.weight.copy_(init_weight(C, D, c.seed))
    opt = torch.optim.SGD(linear.parameters(), lr=2.0, momentum=0.9, weight_decay=0.01)
    loss_fn = build("scent", N)
    for epoch in (1, 2):
        opt.param_groups[0]["lr"] = lr_at(epoch, 2, 2.0)
        order = epoch_permutation(N, c.seed, epoch)
        for s in range(0, N, 50):
            index = order[s:s + 50].sort().values
            x, y = data.train.gather(index)
            opt.zero_grad()
            scores = linear(x.float())
            U = torch.unique(y)
            z = scores[:, U] - scores[torch.arange(len(y)), y][:, None]
            loss_fn(z.masked_fill(U[None, :] == y[:, None], float("-inf")), index).backward()
            opt.step()
    bound = sgd_drift(2 * -(-N // 50), 50 + D, momentum=0.9) * float(linear.weight.detach().abs().max())
    torch.testing.assert_close(ckpt["weight"], linear.weight.detach(), rtol=0, atol=bound)
    # resume from epoch 1 continues exactly
    run_train(config_from_argv(args("resumed", "--resume", str(tmp_path / "full" / "checkpoints" / "epoch_1.pt"))),
              echo=lambda *_: None)
    again = load_ckpt(tmp_path / "resumed" / "checkpoints" / "epoch_2.pt")
    assert torch.equal(again["weight"], ckpt["weight"])
    assert torch.equal(again["momentum_buffer"], ckpt["momentum_buffer"])


def test_nan_weight_is_refused_by_load_state_dict_and_never_ranked_by_topk():
    """A state whose weight holds NaN (a diverged head's) is refused before anything is
    copied; a head whose weight went NaN refuses topk instead of ranking NaN first."""
    head = SparseSoftmaxHead(30, 4, 10, algorithm="bsgd", epochs=1)
    bad = {k: v.clone() if torch.is_tensor(v) else v for k, v in head.state_dict().items()}
    bad["weight"][3, 1] = float("nan")
    other = SparseSoftmaxHead(30, 4, 10, algorithm="bsgd", epochs=1, init_seed=1)
    before = other.weight.clone()
    with pytest.raises(ValueError, match="'weight' holds a value that is not finite.*row 3"):
        other.load_state_dict(bad)
    assert torch.equal(other.weight, before)
    with torch.no_grad():
        head.weight[3, 1] = float("nan")
    with pytest.raises(RuntimeError, match="scores of embedding row 0 are not finite"):
        head.topk(torch.randn(2, 4), 3)
