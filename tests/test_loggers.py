"""Metric loggers: the step log (the reference implementation's `loss` and dual
statistics, checked against its formulas), TensorBoard read back, JSONL formats."""

import math

import numpy as np
import pytest
import torch
from conftest import read_jsonl

from xcent import cli, losses
from xcent.config import config_from_argv
from xcent.loggers import JsonlLogger, TensorBoardLogger
from xcent.train import TIMING_KEYS, train

BUILTIN = ["bsgd", "asgd", "softplus", "umax", "sox", "scent"]


def random_logits(rng, B, K):
    z = torch.tensor(rng.normal(0, 2.0, size=(B, K)), dtype=torch.float64)
    z[torch.arange(B), torch.tensor(rng.integers(0, K, size=B))] = float("-inf")
    return z


def reference_loss(name, algo, z):
    """`loss` as xc/loss.py computes it, written out in float64 from the duals the step's
    gradient used (``grad_nu``)."""
    K = z.shape[1]
    if name == "bsgd":
        return torch.logsumexp(z, dim=1).mean()
    nu = algo.grad_nu[:, None]
    if name == "softplus":
        return (torch.log1p(algo.rho * torch.exp(z - nu)) / algo.rho).mean()  # over all B x K entries
    return (torch.exp(z - nu).sum(dim=1) / (K - 1)).mean()


@pytest.mark.parametrize("name", BUILTIN)
def test_reference_loss_and_dual_rate_match_the_reference_formulas(name):
    rng = np.random.default_rng(3)
    algo = losses.build(name, 6, dtype=torch.float64, epochs=4)
    algo.set_epoch(2)
    for rows in ([0, 1, 2, 3], [2, 3, 4, 0], [5, 1, 1, 2]):
        z = random_logits(rng, 4, 5)
        index = torch.tensor(rows)
        nu_old, first = algo.nu[index].clone(), ~algo.nu_set[index]
        algo.weights(z.clone(), index)
        torch.testing.assert_close(algo.reference_loss(5), reference_loss(name, algo, z), rtol=1e-12, atol=1e-12)
        rate = algo.dual_rate(nu_old[~first])
        if name == "bsgd":
            assert rate is None
        elif name == "scent":  # xc/loss.py: gamma = 1 - 1 / (1 + exp(gamma + nu)) of the old duals
            torch.testing.assert_close(rate, 1 - 1 / (1 + torch.exp(algo.gamma + nu_old[~first])))
        else:
            assert rate == algo.rate and 0 < rate <= 1


def run(tiny_data, tmp_path, name, *extra):
    argv = ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", name, "--batch-size", "64",
            "--train-eval-size", "200", *map(str, extra)]
    return train(config_from_argv(argv), echo=lambda *_: None)


def test_step_log_fields_steps_and_closed_form_first_step(tiny_data, tmp_path):
    run(tiny_data, tmp_path, "s", "--epochs", 2, "--log-every-steps", 5, "--train-loss", "running")
    steps = read_jsonl(tmp_path / "s" / "steps_s.jsonl")
    per_epoch = math.ceil(960 / 64)  # 15 steps: batches 0, 5, 10 are logged, as the reference's 0, 100, ...
    assert [(r["epoch"], r["batch"]) for r in steps] == [(e, b) for e in (1, 2) for b in (0, 5, 10)]
    assert [r["step"] for r in steps] == [(r["epoch"] - 1) * per_epoch + r["batch"] + 1 for r in steps]
    first = steps[0]
    # the first step sets every dual to log s and uses it in the gradient: the reference's
    # loss mean_i s_i e^{-nu_i} is exactly 1 and the surrogate is the mean of the new duals
    assert first["loss"] == pytest.approx(1.0, abs=1e-6)
    assert first["surrogate_loss"] == pytest.approx(first["nu/mean"], abs=1e-6)
    assert "gamma/mean" not in first  # no row of the first batch had a dual step
    for r in steps:
        assert r["nu/min"] <= r["nu/median"] <= r["nu/max"] and r["nu/min"] <= r["nu/mean"] <= r["nu/max"]
        assert r["train_loss"] > 0 and r["lr"] > 0
    revisited = [r for r in steps if r["epoch"] == 2]
    assert all(0 < r["gamma/min"] <= r["gamma/median"] <= r["gamma/max"] <= 1 for r in revisited)
    assert all(abs(r["loss"] - 1.0) < 0.5 for r in revisited)  # duals near log s: loss near 1


def test_step_log_off_and_bsgd_fields(tiny_data, tmp_path):
    run(tiny_data, tmp_path, "off", "--epochs", 1, "--log-every-steps", 0)
    assert not (tmp_path / "off" / "steps_off.jsonl").exists()
    run(tiny_data, tmp_path, "b", "--epochs", 1, "--algorithm", "bsgd", "--log-every-steps", 7)
    steps = read_jsonl(tmp_path / "b" / "steps_b.jsonl")
    assert [r["batch"] for r in steps] == [0, 7, 14]
    assert all(set(r) == {"step", "epoch", "batch", "lr", "loss", "surrogate_loss"} for r in steps)
    assert all(r["loss"] == r["surrogate_loss"] for r in steps)  # the reference logs BSGD's surrogate itself


def test_tensorboard_event_file_holds_the_jsonl_values(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tiny_data, tmp_path, "tb", "--epochs", 2, "--log-every-steps", 5, "--logger", "jsonl,tensorboard")
    out = tmp_path / "tb"
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    epochs, steps = read_jsonl(out / "eval_tb.jsonl"), read_jsonl(out / "steps_tb.jsonl")
    val = acc.Scalars("epoch/val_loss")
    assert [e.step for e in val] == [r["epoch"] * 15 for r in epochs]  # against the global step
    assert [e.value for e in val] == pytest.approx([r["val_loss"] for r in epochs], rel=1e-6)
    for tag in ("loss", "surrogate_loss", "nu/median"):
        events = acc.Scalars(f"step/{tag}")
        assert [e.step for e in events] == [r["step"] for r in steps]
        assert [e.value for e in events] == pytest.approx([r[tag] for r in steps], rel=1e-6)


def test_logger_flag_errors(tiny_data, tmp_path, capsys, monkeypatch):
    base = ["train", "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "1"]
    assert cli.main(base + ["--logger", "wandb"]) == 2
    assert capsys.readouterr().err.strip() == ("xcent train: error: --logger wandb: unknown logger; "
                                               "choose from jsonl, tensorboard")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real(n, *a))
    assert cli.main(base + ["--logger", "tensorboard"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "xcent[tensorboard]" in err[0]
    assert cli.main(base + ["--log-every-steps", "-1"]) == 2
    assert not any(tmp_path.iterdir())


def test_metric_logger_interface(tmp_path):
    jl = JsonlLogger(tmp_path / "m.jsonl", step_key="step")
    jl.log("a", 1.5, 3)
    jl.log_dict({"b": 2, "c": None}, 4)
    jl.close()
    assert read_jsonl(tmp_path / "m.jsonl") == [{"step": 3, "a": 1.5}, {"step": 4, "b": 2, "c": None}]
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(tmp_path / "tb", prefix="x/", step_scale=10)
    tb.log("a", 1.5, 3)
    tb.log_dict({"a": 2.5, "skip": None, "nan": float("nan")}, 4)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["x/a"]
    assert [(e.step, e.value) for e in acc.Scalars("x/a")] == [(30, 1.5), (40, 2.5)]


def test_resume_from_an_earlier_checkpoint_rewrites_the_logs_once(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = ("--epochs", 2, "--log-every-steps", 5, "--logger", "tensorboard")
    run(tiny_data, tmp_path, "r", *extra)
    out = tmp_path / "r"
    steps, epochs = read_jsonl(out / "steps_r.jsonl"), read_jsonl(out / "eval_r.jsonl")
    run(tiny_data, tmp_path, "r", *extra, "--resume", out / "checkpoints" / "epoch_1.pt")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]  # noqa: E731
    assert read_jsonl(out / "steps_r.jsonl") == steps  # epoch 2's records replaced, not repeated
    assert strip(read_jsonl(out / "eval_r.jsonl")) == strip(epochs)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("step/loss")] == [r["step"] for r in steps]  # purged, then rewritten
    assert [e.step for e in acc.Scalars("epoch/val_loss")] == [0, 15, 30]
