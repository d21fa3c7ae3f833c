"""Class-mean initialisation against brute force (one process and two class-sharded)."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import gamma
from init_brute import dense_search

from xcent.data import load_dataset, write_split
from xcent.init import (
    DUAL_FLOOR,
    MAX_PROBE_ROWS,
    SCALE_BRACKET,
    class_mean_directions,
    class_means_init,
    class_means_rows,
    grid_objective,
    probe_rows,
    scale_grid_stats,
    search_scale,
)


def _brute_directions(x: np.ndarray, y: np.ndarray, num_classes: int, skip=()) -> np.ndarray:
    out = np.zeros((num_classes, x.shape[1]))
    for c in range(num_classes):
        rows = [i for i in range(len(y)) if y[i] == c and i not in skip]
        if rows:
            mean = x[rows].astype(np.float64).mean(axis=0)
            if np.linalg.norm(mean) > 0:
                out[c] = mean / np.linalg.norm(mean)
    return out


def _direction_tol(x: np.ndarray, y: np.ndarray, num_classes: int, extra_adds: int = 2) -> float:
    """How far a float32 unit class mean can be from the float64 one: a class's sum of
    n rows is within gamma_{n + extra} (each held-out probe row is taken out and added
    back: ``extra_adds`` more additions per row) of its magnitudes ``sum |x_i|``
    elementwise, so its direction moves by at most twice that relative to the sum's
    norm; normalising adds gamma_{D + 2}."""
    worst = 0.0
    for c in range(num_classes):
        rows = x[y == c].astype(np.float64)
        if len(rows):
            n = len(rows) * (1 + extra_adds)
            worst = max(worst, 2 * gamma(n) * np.linalg.norm(np.abs(rows).sum(0)) / np.linalg.norm(rows.sum(0)))
    return worst + gamma(x.shape[1] + 2)


def _search_tol(tmp_path, x, y, subset, trials=3) -> tuple[float, float]:
    """How much the chosen scale and its CE may move (relative) with the rounding of the
    float32 logits. A float32 dot product of D terms is, whatever its summation order,
    the exact product of inputs perturbed by at most gamma_D each (Higham, section 3.1:
    backward stability), so the search is rerun on features perturbed by 2 gamma_D (two
    orders) at random; 4 times the largest move it shows (and never below 2 gamma_D)."""
    base = class_means_init(load_dataset(tmp_path / "data", num_classes=13).train, 13, subset)
    eps, moves = 2 * gamma(x.shape[1]), []
    rng = np.random.default_rng(11)
    for t in range(trials):
        xp = (x.astype(np.float64) * (1 + eps * rng.uniform(-1, 1, x.shape))).astype(np.float32)
        write_split(tmp_path / f"perturbed{t}" / "train", xp, y)
        r = class_means_init(load_dataset(tmp_path / f"perturbed{t}", num_classes=13, splits=("train",),
                                          required=("train",)).train, 13, subset)
        moves.append((abs(r.scale / base.scale - 1), abs(r.loss / base.loss - 1)))
    return tuple(4 * max(eps / 2, max(m[k] for m in moves)) for k in (0, 1))


def _brute_ce(x, y, w):
    logits = x.astype(np.float64) @ w.T
    m = logits.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
    return float((lse - logits[np.arange(len(y)), y]).mean())


def _make(tmp_path, num_classes=13, dim=5, n=90, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_classes, dim)) * 2
    # classes 11 and 12 get no training rows (zero weight); class sizes vary
    y = rng.integers(0, num_classes - 2, size=n)
    x = (centers[y] + rng.standard_normal((n, dim))).astype(np.float32) * 3.0
    write_split(tmp_path / "data" / "train", x, y)
    write_split(tmp_path / "data" / "val", x[:5], y[:5])
    return load_dataset(tmp_path / "data", num_classes=num_classes), x, y


def test_directions_equal_brute_force(tmp_path):
    data, x, y = _make(tmp_path)
    directions, counts = class_mean_directions(data.train, data.num_classes, chunk_rows=7)
    np.testing.assert_allclose(directions.numpy(), _brute_directions(x, y, 13), rtol=0,
                               atol=_direction_tol(x, y, 13, extra_adds=0))
    assert counts.tolist() == np.bincount(y, minlength=13).tolist()
    assert counts[11] == counts[12] == 0 and directions[11:].abs().sum() == 0
    # a class range reads the rows of those classes only and gives the same rows
    part, _ = class_mean_directions(data.train, data.num_classes, classes=(4, 12), chunk_rows=5)
    torch.testing.assert_close(part, directions[4:12])


def test_search_finds_closed_form_optimum():
    # two classes with directions +e and -e; a share q of the rows sit at +e (right),
    # the rest at -e (wrong): CE(s) = q log(1 + e^-2s) + (1 - q) log(1 + e^2s), whose
    # minimum is at s* = log(q / (1 - q)) / 2
    q, n = 0.9, 200
    w = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    x = torch.tensor([[1.0, 0.0]] * n)
    y = torch.tensor([0] * int(q * n) + [1] * (n - int(q * n)))
    calls = []

    def evaluate(scales):
        calls.append(scales.numel())
        log_other, rank = scale_grid_stats(x, y, w, scales, class_chunk=1)  # one class per block
        assert rank.tolist() == [0] * int(q * n) + [1] * (n - int(q * n))
        return grid_objective(log_other, 2)

    s, probes = search_scale(evaluate, *SCALE_BRACKET)  # fine lattice step log(400) / 150 = 0.04
    assert s == pytest.approx(math.log(q / (1 - q)) / 2, rel=1e-3)  # the parabola's error at that step
    assert len(calls) == 2 and len(probes) == sum(calls)  # two passes over the data, every scale in one
    # the grid statistics are the closed form, scale by scale
    scales = torch.tensor([0.1, 1.0, 7.0], dtype=torch.float64)
    ce, _ = evaluate(scales)
    want = [q * math.log1p(math.exp(-2 * t)) + (1 - q) * math.log1p(math.exp(2 * t)) for t in scales.tolist()]
    np.testing.assert_allclose(ce.numpy(), want, rtol=1e-12)


def test_grid_stats_chunking_and_dense_equal(tmp_path):
    # row and class chunks (several of each, uneven) give the dense float64 statistics
    rng = np.random.default_rng(5)
    w = torch.nn.functional.normalize(torch.randn(23, 6, dtype=torch.float64), dim=1)
    w[4] = 0  # a class without rows: logit 0
    x, y = torch.tensor(rng.standard_normal((50, 6)) * 2), torch.tensor(rng.integers(0, 23, 50))
    scales = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)
    log_other, rank = scale_grid_stats(x, y, w, scales, row_chunk=7, class_chunk=5)
    full, full_rank = scale_grid_stats(x, y, w, scales)
    torch.testing.assert_close(log_other, full, rtol=1e-13, atol=1e-13)
    assert torch.equal(rank, full_rank)
    z = (x @ w.T).numpy()
    zy = z[np.arange(50), y.numpy()]
    other = z - zy[:, None]
    other[np.arange(50), y.numpy()] = -np.inf
    for k, s in enumerate(scales.tolist()):
        np.testing.assert_allclose(log_other[k].numpy(), np.log(np.exp(s * other).sum(axis=1)), rtol=1e-12)
    assert rank.tolist() == (other >= 0).sum(axis=1).tolist()


@pytest.mark.parametrize("class_chunk, row_chunk", [(7, 256), (16, 5), (1024, 3)])
def test_grid_stats_count_exact_ties_against_the_model(class_chunk, row_chunk):
    """Equal class directions tie exactly with the true class: every other class counts,
    whichever GEMM kernel (chunk width) scored it, as in the evaluation (the rank used
    to depend on the chunk: the target came from a GEMM of another shape)."""
    gen = torch.Generator().manual_seed(3)
    direction = torch.nn.functional.normalize(torch.rand(1, 512, generator=gen) + 0.5, dim=1)
    dirs = direction.expand(40, 512).contiguous()
    x, y = torch.rand(30, 512, generator=gen) + 0.5, torch.randint(0, 40, (30,), generator=gen)
    _, rank = scale_grid_stats(x, y, dirs, torch.tensor([1.0], dtype=torch.float64), row_chunk=row_chunk,
                               class_chunk=class_chunk)
    assert torch.equal(rank, torch.full_like(rank, 39))


def test_grid_stats_rows_with_nan_are_wrong():
    """A held-out row whose logits are NaN has rank C (wrong at every k), not rank 0."""
    gen = torch.Generator().manual_seed(4)
    dirs = torch.nn.functional.normalize(torch.randn(20, 6, generator=gen), dim=1)
    x, y = torch.randn(9, 6, generator=gen), torch.randint(0, 20, (9,), generator=gen)
    _, clean = scale_grid_stats(x, y, dirs, torch.tensor([1.0], dtype=torch.float64), class_chunk=7)
    x[4, 2] = float("nan")
    _, rank = scale_grid_stats(x, y, dirs, torch.tensor([1.0], dtype=torch.float64), class_chunk=7)
    assert int(rank[4]) == 20
    assert torch.equal(rank[torch.arange(9) != 4], clean[torch.arange(9) != 4])


def test_probe_rows_are_capped():
    # a stride over the subset keeps at most 20% of the rows and MAX_PROBE_ROWS (4,096)
    rows = probe_rows(1_000_000, torch.arange(0, 1_000_000, 50))  # 20,000 rows (the --train-eval-size default)
    assert rows.numel() <= MAX_PROBE_ROWS == 4096 and rows.numel() > 3000
    assert torch.equal(rows, torch.arange(0, 1_000_000, 250))
    assert probe_rows(100, None).numel() == 20


def test_scale_search_matches_brute_force_grid(tmp_path):
    data, x, y = _make(tmp_path, n=120)
    subset = torch.arange(0, 120, 3)
    result = class_means_init(data.train, data.num_classes, subset)
    probes = probe_rows(120, subset)
    assert probes.numel() <= 24
    held = set(probes.tolist())
    # the scale is searched on rows held out of the means: brute-force that CE on a grid
    dirs = _brute_directions(x, y, 13, skip=held)
    xp, yp = x[probes.numpy()], y[probes.numpy()]
    grid = np.exp(np.linspace(np.log(1e-3), np.log(1e3), 1001))
    values = [_brute_ce(xp * s, yp, dirs) for s in grid]
    best = int(np.argmin(values))
    assert abs(math.log(result.scale) - math.log(grid[best])) < 0.01
    assert result.loss <= values[best] + 1e-4
    # the search's rule replayed densely (every logit of every grid scale in full, float64)
    mean_norm = float(np.linalg.norm(xp.astype(np.float64), axis=1).mean())
    want = dense_search(xp, yp, dirs, SCALE_BRACKET[0] / mean_norm, SCALE_BRACKET[1] / mean_norm)
    scale_tol, _ = _search_tol(tmp_path, x, y, subset)
    assert result.scale == pytest.approx(want, rel=scale_tol)
    # at one scale the CE moves by at most twice its logits' error (lse - target is
    # 2-Lipschitz): the float32 logits' rounding and the float32 directions'
    dir_tol = _direction_tol(x, y, 13)
    logit_err = result.scale * float(np.linalg.norm(xp.astype(np.float64), axis=1).max()) * (
        gamma(x.shape[1]) + dir_tol)
    assert result.loss == pytest.approx(_brute_ce(xp * result.scale, yp, dirs), rel=0, abs=2 * logit_err)
    # the returned weight: the scale times the means of all training rows
    np.testing.assert_allclose(result.weight.numpy(), result.scale * _brute_directions(x, y, 13), rtol=0,
                               atol=result.scale * (dir_tol + gamma(1)))
    assert result.classes_with_rows == 11


def test_class_means_rows(tmp_path):
    data, x, y = _make(tmp_path)
    classes, rows = torch.tensor([1, 4, 12]), torch.arange(0, 90, 2)
    got = class_means_rows(data.train, classes, rows, 2.5)
    want = 2.5 * _brute_directions(x[::2], y[::2], 13)[[1, 4, 12]]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=2.5 * (_direction_tol(x[::2], y[::2], 13, 0)
                                                                    + gamma(1)))


SCRIPT = """
import sys, torch
from xcent import distributed as xd
from xcent.data import load_dataset
from xcent.init import class_means_init
ctx = xd.init_from_env(torch.device("cpu"), 60)
data = load_dataset(sys.argv[1], num_classes=13)
r = class_means_init(data.train, data.num_classes, torch.arange(0, 120, 3), ctx=ctx)
torch.save({"weight": r.weight, "scale": r.scale, "loss": r.loss, "seen": r.classes_with_rows},
           f"{sys.argv[2]}/rank{ctx.rank}.pt")
xd.shutdown()
"""


def test_two_process_class_sharded_equals_one_and_brute_force(tmp_path):
    data, x, y = _make(tmp_path, n=120)
    one = class_means_init(data.train, data.num_classes, torch.arange(0, 120, 3))
    script = tmp_path / "shard_init.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(29700 + os.getpid() % 200), str(script), str(tmp_path / "data"), str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["weight"].shape == (7, 5) and r1["weight"].shape == (6, 5)  # each rank: its own classes
    assert r0["scale"] == r1["scale"] and r0["seen"] == r1["seen"] == 11
    # float64 sums over classes in both paths and a search continuous in them: the same
    # scale and held-out CE up to the rounding of the logits (their GEMMs have other shapes)
    scale_tol, loss_tol = _search_tol(tmp_path, x, y, torch.arange(0, 120, 3))
    assert r0["scale"] == pytest.approx(one.scale, rel=scale_tol) and r0["loss"] == pytest.approx(one.loss,
                                                                                                  rel=loss_tol)
    sharded = torch.cat([r0["weight"], r1["weight"]])
    # the same unit means (bit for bit: the same rows summed in the same order) times the scale
    torch.testing.assert_close(sharded, one.weight, rtol=scale_tol + gamma(1), atol=0)
    # both equal a brute-force dense float64 computation: the unit means of all rows times the scale
    np.testing.assert_allclose(sharded.numpy(), one.scale * _brute_directions(x, y, 13), rtol=0,
                               atol=one.scale * (_direction_tol(x, y, 13) + scale_tol + gamma(1)))


def test_dual_floor_bounds_the_scale_on_separable_data(tmp_path):
    # well-separated classes: the held-out CE keeps falling with the scale, and the
    # search stops where the probe rows' mean log s_i = log mean_{j != y} exp(z_ij)
    # (brute force, float64) reaches -DUAL_FLOOR
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((8, 6))
    y = np.repeat(np.arange(8), 20)
    x = (centers[y] + 0.05 * rng.standard_normal((160, 6))).astype(np.float32)
    write_split(tmp_path / "sep" / "train", x, y)
    write_split(tmp_path / "sep" / "val", x[:4], y[:4])
    data = load_dataset(tmp_path / "sep")
    result = class_means_init(data.train, 8, None)
    probes = probe_rows(160, None).numpy()
    dirs = _brute_directions(x, y, 8, skip=set(probes.tolist()))

    def mean_log_s(scale):
        z = (x[probes].astype(np.float64) * scale) @ dirs.T
        z = z - z[np.arange(len(probes)), y[probes]][:, None]
        z[np.arange(len(probes)), y[probes]] = -np.inf
        return float(np.mean(np.log(np.exp(z).sum(axis=1) / 7)))

    mean_norm = float(np.linalg.norm(x[probes], axis=1).mean())
    assert result.scale < SCALE_BRACKET[1] / mean_norm / 2  # the floor binds, not the bracket
    assert mean_log_s(result.scale) == pytest.approx(-DUAL_FLOOR, abs=0.05)
    assert mean_log_s(result.scale * 1.01) < -DUAL_FLOOR < mean_log_s(result.scale / 1.01)
