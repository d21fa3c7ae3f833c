"""The algorithm registry: one parametrized test over whatever is registered, the
hyper-parameter ranges, the schedule trap, and a toy seventh algorithm added with one
class and one `register` call (inside the test only)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import read_jsonl

from xcent import cli, compare, losses
from xcent.classifier import init_weight
from xcent.cli import compare as compare_cli
from xcent.losses import AlgorithmSpec, HParam, build
from xcent.step import train_step

REGISTERED = list(losses.REGISTRY)


def random_logits(rng, B, K, scale=2.0):
    z = torch.tensor(rng.normal(0, scale, size=(B, K)), dtype=torch.float64)
    z[torch.arange(B), torch.tensor(rng.integers(0, K, size=B))] = float("-inf")
    return z


def ready(name, num_samples, **hp):
    algo = build(name, num_samples, dtype=torch.float64, epochs=3, **hp)
    algo.set_epoch(2)
    return algo


# ----------------------------------------------------------------------------- checks any algorithm must pass


def check_gradient_is_surrogate_gradient(name):
    """G of every step (first visits, revisits, repeated rows) equals autograd of the
    algorithm's surrogate at the duals the step used, and ``value`` is that surrogate."""
    rng = np.random.default_rng(0)
    algo = ready(name, 8)
    for rows in ([0, 1, 2, 3], [2, 3, 4, 4], [0, 5, 6, 2], [1, 1, 3, 7]):
        z = random_logits(rng, 4, 5)
        G = algo.weights(z.clone(), torch.tensor(rows))
        zz = z.clone().requires_grad_(True)
        value = algo.surrogate(zz, algo.grad_nu)
        value.backward()
        assert torch.isfinite(G).all() and (G[torch.isinf(z)] == 0).all()
        torch.testing.assert_close(G, zz.grad, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(algo.value, value.detach(), rtol=1e-12, atol=1e-12)


def check_state_dict_round_trip(name):
    """A copy restored from state_dict() takes bit-identical next steps."""
    rng = np.random.default_rng(1)
    a = ready(name, 6)
    for rows in ([0, 1, 2], [2, 3, 0]):
        a.weights(random_logits(rng, 3, 4), torch.tensor(rows))
    b = ready(name, 6)
    b.load_state_dict(a.state_dict())
    z, index = random_logits(rng, 3, 4), torch.tensor([0, 3, 5])
    assert torch.equal(a.weights(z.clone(), index), b.weights(z.clone(), index))
    assert torch.equal(a.nu_set, b.nu_set)
    assert torch.equal(torch.nan_to_num(a.nu, nan=-7.0), torch.nan_to_num(b.nu, nan=-7.0))


def check_spec(name):
    """Defaults inside their ranges; each range refuses NaN, -inf and the values just
    outside it, naming the flag."""
    spec = losses.get(name)
    assert spec.parameters[0].name == "lr" and spec.keys[0] == "lr"
    assert spec.label and spec.color and spec.marker
    assert set(losses.resolve_hparams(name, {})) == set(spec.keys)
    for p in spec.parameters:
        assert p.contains(p.default), (name, p.name)
        outside = [math.nan, -math.inf]
        if p.low > -math.inf:
            outside.append(p.low if p.low_open else p.low - 1e-9 * max(1.0, abs(p.low)))
        if p.high < math.inf:
            outside.append(p.high if p.high_open else p.high + 1e-9 * max(1.0, abs(p.high)))
        if not p.inf_ok:
            outside.append(math.inf)
        for bad in outside:
            with pytest.raises(ValueError, match=f"^{p.flag} "):
                losses.validate(name, {p.key: bad})
        assert losses.validate(name, {p.name: p.default}) == {p.key: p.default}


def check_schedule_needs_epoch(name):
    algo = build(name, 4, dtype=torch.float64)
    z, index = random_logits(np.random.default_rng(2), 2, 3), torch.tensor([0, 1])
    if algo.scheduled:
        with pytest.raises(RuntimeError, match="set_epoch"):
            algo.weights(z, index)
        assert not algo.nu_set.any()  # nothing changed
        with pytest.raises(ValueError, match="epochs"):
            algo.set_epoch(1)  # the total is unknown: not given to build
        algo.set_epoch(1, 2)
    algo.weights(z, index)


@pytest.mark.parametrize("name", REGISTERED)
def test_every_registered_algorithm(name):
    check_spec(name)
    check_gradient_is_surrogate_gradient(name)
    check_state_dict_round_trip(name)
    check_schedule_needs_epoch(name)


def test_views_follow_the_registry():
    assert list(losses.ALGORITHMS) == list(losses.REGISTRY) == ["bsgd", "asgd", "softplus", "umax", "sox", "scent"]
    assert losses.DEFAULTS["scent"] == {"lr": 5.0, "gamma": 12.0}
    assert losses.DEFAULTS["softplus"] == {"lr": 0.5, "gamma": 1.0, "rho": 1e-3}
    assert losses.DEFAULTS["umax"] == {"lr": 0.5, "gamma": 1.0, "delta": 1.0}
    assert losses.ALGORITHMS["umax"] is losses.UMax
    flags = {f.key: f for f in losses.hyperparameters()}
    assert [f.flag for f in flags.values()] == ["--lr", "--gamma", "--softplus-rho", "--umax-delta"]
    assert set(flags["gamma"].per_algorithm) == {"asgd", "softplus", "umax", "sox", "scent"}
    assert flags["umax_delta"].inf_ok and not flags["gamma"].inf_ok


# ----------------------------------------------------------------------------- ranges of ALGORITHMS.md


@pytest.mark.parametrize("name, key, bad, good", [
    ("asgd", "gamma", -1.0, 0.0), ("softplus", "gamma", -0.5, 3.0), ("umax", "gamma", -1e-3, 2.0),
    ("sox", "gamma", -0.1, 0.0), ("sox", "gamma", 1.5, 1.0),  # r_e is a weight in (0, 1]
    ("scent", "gamma", math.inf, -30.0),  # alpha = e^gamma: any finite real
    ("softplus", "softplus_rho", 0.0, 1e-9), ("softplus", "softplus_rho", math.inf, 10.0),
    ("umax", "umax_delta", -1.0, math.inf), ("umax", "umax_delta", math.nan, 0.0),
    ("bsgd", "lr", 0.0, 1e-6), ("scent", "lr", math.inf, 100.0),
])
def test_ranges(name, key, bad, good):
    flag = "--" + key.replace("_", "-")
    with pytest.raises(ValueError, match=f"^{flag} .*: must be .* for {name}$"):
        build(name, 2, **{key: bad})
    assert losses.validate(name, {key: good}) == {key: good}


def test_other_algorithms_hparams_are_ignored_unknown_ones_refused():
    assert losses.validate("bsgd", {"gamma": -5.0, "umax_delta": None}) == {}  # not bsgd's: ignored
    with pytest.raises(ValueError, match="unknown hyper-parameter 'tau'"):
        build("scent", 2, tau=1.0)
    with pytest.raises(ValueError, match="unknown algorithm 'adam'"):
        build("adam", 2)


def test_train_refuses_out_of_range_flags(tiny_data, tmp_path, capsys):
    for argv, needle in ((["--algorithm", "asgd", "--gamma", "-1"], "--gamma -1: must be >= 0 and finite for asgd"),
                         (["--algorithm", "umax", "--umax-delta", "nan"], "--umax-delta nan: must be >= 0 or inf"),
                         (["--algorithm", "sox", "--gamma", "2"], "--gamma 2: must be in [0, 1] for sox"),
                         (["--algorithm", "softplus", "--softplus-rho", "0"], "--softplus-rho 0: must be > 0"),
                         (["--lr", "-3"], "--lr -3: must be > 0")):
        rc = cli.main(["train", "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), *argv])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and needle in err, (argv, err)
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_step_before_set_epoch_raises_in_the_trainers_step():
    weight = init_weight(10, 4, seed=0)
    before = weight.clone()
    algo = build("asgd", 8)
    assert algo.epoch is None
    with pytest.raises(RuntimeError, match="asgd: the dual step size follows the epoch schedule"):
        _ = algo.rate
    with pytest.raises(RuntimeError, match="set_epoch"):
        train_step(weight, algo, torch.randn(4, 4), torch.tensor([0, 1, 2, 3]), torch.arange(4), 1.0)
    assert torch.equal(weight, before)
    algo = build("asgd", 8, epochs=4)
    algo.set_epoch(4)
    assert algo.rate == 0.0 and (algo.epoch, algo.epochs) == (4, 4)
    algo.set_epoch(1)
    assert algo.rate == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError, match="epoch must be in"):
        algo.set_epoch(5)


# ----------------------------------------------------------------------------- a seventh algorithm


class Damped(losses.Algorithm):
    """Toy: the dual moves a fixed fraction tau of the way to log s each visit
    (``e^nu`` would be SOX; this is linear in nu); gradient with the new dual."""

    name = "toy"

    def __init__(self, num_samples, *, tau, dtype=torch.float32, epochs=None):
        super().__init__(num_samples, dtype, epochs)
        self.tau = tau

    def dual_step(self, nu, log_s):
        nu_new = nu + self.tau * (log_s - nu)
        return nu_new, nu_new


@pytest.fixture
def toy():
    spec = losses.register(AlgorithmSpec(
        "toy", Damped, lr=2.0, label="Toy (damped)", marker="P",
        hparams=(HParam("tau", 0.5, "fraction of the way to log s", key="toy_tau", low=0.0, high=1.0,
                        low_open=True),)))
    try:
        yield spec
    finally:
        losses.unregister("toy")
    assert "toy" not in losses.ALGORITHMS


def test_a_seventh_algorithm_is_one_class_and_one_entry(toy, tiny_data, tmp_path, capsys):
    assert list(losses.ALGORITHMS)[-1] == "toy" and losses.DEFAULTS["toy"] == {"lr": 2.0, "tau": 0.5}
    assert toy.color not in {s.color for s in losses.REGISTRY.values() if s is not toy}  # a spare colour
    check_spec("toy")
    check_gradient_is_surrogate_gradient("toy")
    check_state_dict_round_trip("toy")
    check_schedule_needs_epoch("toy")

    # the rule, by hand: second visit of row 0 moves nu 30% of the way to log s
    algo = build("toy", 2, dtype=torch.float64, toy_tau=0.3)
    z1 = torch.tensor([[float("-inf"), 0.0, math.log(3.0)]], dtype=torch.float64)  # log s = log 2
    z2 = torch.tensor([[float("-inf"), math.log(4.0), math.log(6.0)]], dtype=torch.float64)  # log s = log 5
    algo.weights(z1, torch.tensor([0]))
    G = algo.weights(z2, torch.tensor([0]))
    nu = math.log(2.0) + 0.3 * (math.log(5.0) - math.log(2.0))
    assert algo.nu[0].item() == pytest.approx(nu, rel=1e-14)
    torch.testing.assert_close(G[0, 1:], torch.exp(z2[0, 1:] - nu) / 2, rtol=1e-13, atol=0)

    # the trainer: its flag comes from the registry, its range is checked, it trains
    base = ["train", "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--algorithm", "toy",
            "--epochs", "2", "--batch-size", "64", "--train-eval-size", "0",
            "--init", "random"]  # from the untrained model, so that learning shows
    assert cli.main(base + ["--toy-tau", "1.5"]) == 2
    assert "--toy-tau 1.5: must be in (0, 1] for toy" in capsys.readouterr().err
    assert cli.main(base + ["--toy-tau", "0.25"]) == 0
    records = read_jsonl(tmp_path / "toy" / "eval_toy.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.1  # it learns
    assert records[1]["lr"] == 2.0  # its tuned lr
    import yaml

    saved = yaml.safe_load((tmp_path / "toy" / "config.yaml").read_text())
    assert saved["toy_tau"] == 0.25 and saved["gamma"] is None

    # xcent compare: runs it by default, reports its hyper-parameters, draws its entry
    out = tmp_path / "cmp"
    argv = ["--data-dir", str(tiny_data), "--out-dir", str(out), "--epochs", "1", "--batch-size", "64",
            "--train-eval-size", "0"]
    plan = compare_cli.plan_from_argv(argv)
    assert plan.algorithms == list(losses.REGISTRY) and plan.algorithms[-1] == "toy"
    assert compare_cli.compare_main(argv + ["--algorithms", "toy,bsgd"]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["results"]["toy"]["label"] == "Toy (damped)"
    assert summary["results"]["toy"]["hparams"] == {"lr": 2.0, "toy_tau": 0.5}
    fig = compare.make_figure(compare.compare_curves(summary))
    # legend order, then the shared start's reference line
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["BSGD", "Toy (damped)", "start (epoch 0)"]
    line = next(ln for ln in fig.get_axes()[0].get_lines() if ln.get_label() == "Toy (damped)")
    assert line.get_color() == toy.color and line.get_marker() == "P"
    assert "Toy (damped)" in (out / "compare.md").read_text()
