"""The six algorithms against brute-force float64 re-computations of ALGORITHMS.md."""

import math

import numpy as np
import pytest
import torch

from xcent import losses
from xcent.losses import build

ALGOS = ["scent", "sox", "asgd", "softplus", "umax", "bsgd"]


def random_logits(rng, B, K, scale=2.0, dtype=torch.float64):
    z = torch.tensor(rng.normal(0, scale, size=(B, K)), dtype=dtype)
    own = torch.tensor(rng.integers(0, K, size=B))
    z[torch.arange(B), own] = float("-inf")
    return z


# ---------------------------------------------------------------- brute force, row by row


class BruteForce:
    """The spec's formulas, literally, in float64 numpy, one row at a time."""

    def __init__(self, name, num_samples, gamma=None, rho=None, delta=None):
        d = losses.DEFAULTS[name]
        self.name = name
        self.gamma = d.get("gamma") if gamma is None else gamma
        self.rho = d.get("rho") if rho is None else rho
        self.delta = d.get("delta") if delta is None else delta
        self.nu = {}
        self.epoch, self.epochs = 1, 1

    def rate(self):
        e, E, g = self.epoch, self.epochs, self.gamma
        if self.name == "sox":
            if g == 0:
                g = 4.177 * E ** -0.7265
            return g + (1 - g) * 0.5 * (1 + math.cos(math.pi * e / E))
        return g * 0.5 * (1 + math.cos(math.pi * e / E))

    def step(self, logits, index):
        z = logits.numpy()
        B, K = z.shape
        m = K - 1
        G = np.zeros_like(z)
        for i in range(B):
            valid = np.isfinite(z[i])
            zi = z[i][valid]
            assert len(zi) == m
            s = np.exp(zi).mean()
            row = int(index[i])
            first = row not in self.nu
            if self.name == "bsgd":
                p = np.exp(zi) / np.exp(zi).sum()
                G[i, valid] = p / B
                continue
            if self.name == "softplus":
                rho = self.rho
                if first:
                    e0 = np.exp(zi)
                    self.nu[row] = math.log((e0 / (1 + rho * e0)).mean())
                    nu_old = self.nu[row]
                else:
                    nu_old = self.nu[row]
                    e = np.exp(zi - nu_old)
                    q = (e / (1 + rho * e)).mean()
                    self.nu[row] = nu_old - self.rate() * (1 - q)
                e = np.exp(zi - nu_old)
                G[i, valid] = e / (1 + rho * e) / (B * m)
                continue
            if first:
                nu_old = nu_new = math.log(s)
            else:
                nu_old = self.nu[row]
                if self.name == "scent":
                    alpha = math.exp(self.gamma)
                    nu_new = nu_old + math.log(1 + alpha * s) - math.log(1 + alpha * math.exp(nu_old))
                elif self.name == "sox":
                    r = self.rate()
                    nu_new = math.log((1 - r) * math.exp(nu_old) + r * s)
                else:  # asgd, umax
                    nu_new = nu_old - self.rate() * (1 - s * math.exp(-nu_old))
                    if self.name == "umax" and nu_new < math.log(s) - self.delta:
                        nu_new = math.log(s)
            self.nu[row] = nu_new
            use_new = self.name in ("scent", "sox") or (self.name == "umax" and not math.isinf(self.delta))
            nu_g = nu_new if use_new else nu_old
            G[i, valid] = np.exp(zi - nu_g) / (B * m)
        return G


@pytest.mark.parametrize("name", ALGOS)
@pytest.mark.parametrize("hp", [{}, {"gamma": 0.3}])
def test_matches_bruteforce_over_steps(name, hp, device):
    if name == "bsgd":
        hp = {}
    rng = np.random.default_rng(0)
    num_samples, epochs = 12, 4
    algo = build(name, num_samples, dtype=torch.float64, **hp).to(device)
    ref = BruteForce(name, num_samples, **hp)
    # first visits, revisits, and every epoch of the schedule
    batches = [[0, 1, 2, 3], [4, 5, 0, 1], [2, 6, 7, 0], [1, 3, 5, 7], [8, 0, 2, 4], [9, 10, 1, 0]]
    for step, rows in enumerate(batches):
        epoch = min(1 + step // 2, epochs)
        algo.set_epoch(epoch, epochs)
        ref.epoch, ref.epochs = epoch, epochs
        K = 5 + step % 3
        logits = random_logits(rng, len(rows), K).to(device).requires_grad_(True)
        index = torch.tensor(rows, device=device)
        loss = algo(logits, index)
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        G_ref = ref.step(logits.detach().cpu(), rows)
        np.testing.assert_allclose(logits.grad.cpu().numpy(), G_ref, rtol=1e-6, atol=1e-300)
        if name != "bsgd":
            for row, value in ref.nu.items():
                assert algo.nu_set[row]
                np.testing.assert_allclose(algo.nu[row].item(), value, rtol=1e-6, atol=1e-12)
            unvisited = [r for r in range(num_samples) if r not in ref.nu]
            assert not algo.nu_set[unvisited].any()


def test_weights_equal_autograd_of_forward():
    """The fast path (weights, used by the trainer) equals autograd of forward."""
    rng = np.random.default_rng(1)
    for name in ALGOS:
        a, b = build(name, 6, dtype=torch.float64), build(name, 6, dtype=torch.float64)
        a.set_epoch(1, 1), b.set_epoch(1, 1)
        for rows in ([0, 1, 2], [2, 3, 0]):
            z = random_logits(rng, 3, 4)
            G_fast = a.weights(z.clone(), torch.tensor(rows))
            zz = z.clone().requires_grad_(True)
            b(zz, torch.tensor(rows)).backward()
            torch.testing.assert_close(G_fast, zz.grad, rtol=1e-12, atol=0)


def test_scent_is_the_proximal_minimiser():
    """nu_new = argmin_v alpha (v + s e^-v) + D_phi(v, nu), phi = exp(-v), found by bisection."""
    gamma = 1.5
    alpha = math.exp(gamma)
    for nu, s in [(0.3, 2.0), (-1.0, 0.05), (2.0, 30.0), (0.0, 1.0)]:
        def dobj(v, nu=nu, s=s):  # derivative of the (convex) proximal objective
            return alpha * (1 - s * math.exp(-v)) - math.exp(-v) + math.exp(-nu)
        lo, hi = -50.0, 50.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if dobj(mid) < 0 else (lo, mid)
        got = losses.scent_dual_step(torch.tensor(nu, dtype=torch.float64),
                                     torch.tensor(math.log(s), dtype=torch.float64), gamma)
        assert abs(got.item() - 0.5 * (lo + hi)) < 1e-9


def test_sox_weight_one_gives_log_s():
    rng = np.random.default_rng(2)
    algo = build("sox", 4, dtype=torch.float64, gamma=1.0)  # r_e = 1 at every epoch
    algo.set_epoch(3, 5)
    algo.weights(random_logits(rng, 4, 5), torch.arange(4))
    z = random_logits(rng, 4, 5)
    algo.weights(z, torch.arange(4))
    torch.testing.assert_close(algo.nu, losses.log_row_stat(z), rtol=1e-14, atol=0)


def test_sox_default_gamma_when_zero():
    assert losses.sox_rate(0.0, 10, 10) == pytest.approx(4.177 * 10 ** -0.7265)
    assert losses.sox_rate(1e-5, 1, 50) == pytest.approx(1.0, abs=1e-2)


def test_umax_infinite_delta_is_asgd():
    rng = np.random.default_rng(3)
    a, u = build("asgd", 8, gamma=0.7), build("umax", 8, gamma=0.7, delta=float("inf"))
    for step in range(6):
        a.set_epoch(1 + step % 3, 3), u.set_epoch(1 + step % 3, 3)
        z = random_logits(rng, 4, 6, scale=3.0, dtype=torch.float32)
        idx = torch.tensor(rng.choice(8, 4, replace=False))
        assert torch.equal(a.weights(z, idx), u.weights(z, idx))
        assert torch.equal(a.nu, u.nu) or torch.equal(torch.nan_to_num(a.nu), torch.nan_to_num(u.nu))


def test_umax_reset_fires():
    algo = build("umax", 1, dtype=torch.float64, gamma=0.01, delta=1.0)
    algo.set_epoch(1, 1)
    algo.weights(torch.tensor([[float("-inf"), 0.0, 0.0]], dtype=torch.float64), torch.tensor([0]))
    z = torch.tensor([[float("-inf"), 5.0, 5.0]], dtype=torch.float64)  # log s jumps by 5 > delta
    algo.weights(z, torch.tensor([0]))
    assert algo.nu[0].item() == pytest.approx(5.0)


@pytest.mark.parametrize("name", ["scent", "sox"])
def test_convex_combination_bounds(name):
    rng = np.random.default_rng(4)
    algo = build(name, 3, dtype=torch.float64, gamma=2.0 if name == "scent" else 0.3)
    seen = {r: [] for r in range(3)}
    for step in range(10):
        algo.set_epoch(1 + step % 5, 5)
        z = random_logits(rng, 3, 5, scale=1 + step)
        log_s = losses.log_row_stat(z)
        algo.weights(z, torch.arange(3))
        for r in range(3):
            seen[r].append(log_s[r].item())
            assert min(seen[r]) - 1e-12 <= algo.nu[r].item() <= max(seen[r]) + 1e-12


@pytest.mark.parametrize("name", ALGOS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_at_extreme_logits(name, dtype):
    rng = np.random.default_rng(5)
    algo = build(name, 4)
    for step, scale in enumerate([1e4, -1e4, 1e4, 3e3, -1e4]):
        algo.set_epoch(1 + step % 2, 2)
        z = torch.tensor(rng.uniform(-1, 1, size=(4, 6)) * abs(scale), dtype=dtype)
        if scale < 0:
            z = z - 1e4
        z = z.clamp(-1e4, 1e4)
        z[torch.arange(4), torch.tensor([0, 1, 2, 3])] = float("-inf")
        z.requires_grad_(True)
        loss = algo(z, torch.arange(4))
        loss.backward()
        assert torch.isfinite(loss), (name, step)
        assert torch.isfinite(z.grad).all(), (name, step)
        if name != "bsgd":
            assert torch.isfinite(algo.nu).all()


def test_state_dict_carries_nu_and_mask():
    algo = build("scent", 5)
    algo.weights(random_logits(np.random.default_rng(6), 2, 3, dtype=torch.float32), torch.tensor([1, 3]))
    sd = algo.state_dict()
    assert set(sd) == {"nu", "nu_set"}
    other = build("scent", 5)
    other.load_state_dict(sd)
    assert torch.equal(other.nu_set, algo.nu_set)
    assert torch.equal(other.nu[algo.nu_set], algo.nu[algo.nu_set])
    assert other.nu_set.tolist() == [False, True, False, True, False]


def test_zero_nu_is_not_unset():
    """The seed's `nu == 0` marker would re-initialise this row; the mask does not."""
    algo = build("asgd", 1, dtype=torch.float64, gamma=1.0)
    algo.set_epoch(1, 1)
    z0 = torch.tensor([[float("-inf"), 0.0, 0.0]], dtype=torch.float64)  # log s = 0
    algo.weights(z0, torch.tensor([0]))
    assert algo.nu[0].item() == 0.0 and algo.nu_set[0]
    z1 = torch.tensor([[float("-inf"), 1.0, 1.0]], dtype=torch.float64)
    G = algo.weights(z1, torch.tensor([0]))
    # second visit: old nu = 0 in the gradient (a re-initialisation would use 1.0)
    torch.testing.assert_close(G[0, 1:], torch.full((2,), math.e / 2, dtype=torch.float64))


def test_build_rejects_unknown():
    with pytest.raises(ValueError, match="unknown algorithm"):
        build("adam", 3)
    with pytest.raises(ValueError, match="rho"):
        build("softplus", 3, rho=0.0)
