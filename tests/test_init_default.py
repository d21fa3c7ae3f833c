"""`--init class-means` is the default of train, demo and compare; `--init random` (the
reference implementation's start at log C) where the paper's curves are reproduced;
a resumed run keeps the start it had."""

from __future__ import annotations

import math

import pytest
import yaml
from conftest import gamma, mean_ce_tol, read_jsonl

from xcent import cli
from xcent.classifier import init_weight
from xcent.cli import compare as compare_cli
from xcent.compare import plan as compare_plan
from xcent.config import TrainConfig, config_from_argv, train_parser
from xcent.data import load_dataset, synthesize
from xcent.errors import UsageError
from xcent.evaluate import evaluate
from xcent.init import class_means_init
from xcent.modelio import load as load_ckpt
from xcent.train import train


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small"
    synthesize(path, num_classes=30, feature_dim=8, num_samples=480, seed=0, noise=0.5)
    return path


def test_the_default_is_class_means_for_train_and_demo():
    assert TrainConfig.__dataclass_fields__["init"].default == "class-means"
    assert config_from_argv(["--data-dir", "d"]).init == "class-means"
    demo = train_parser(prog="xcent demo", defaults={"data_dir": None, "epochs": 5, "overwrite": True})
    assert demo.get_defaults().init == "class-means"


def _compare(data, out, *extra):
    assert compare_cli.compare_main(["--data-dir", str(data), "--out-dir", str(out), "--algorithms", "scent",
                                     "--epochs", "1", "--batch-size", "32", "--train-eval-size", "0",
                                     *extra]) == 0
    run = out / "scent_seed42"
    return yaml.safe_load((run / "config.yaml").read_text()), read_jsonl(run / "eval_scent_seed42.jsonl")


def test_compare_passes_the_init_to_its_runs(small, tmp_path):
    data = load_dataset(small)
    # the class-mean classifier, computed independently of the trainer (all rows: --train-eval-size 0)
    start = class_means_init(data.train, data.num_classes, None).weight
    val = data.splits["val"]
    want = evaluate(val, start)["loss"]
    # the same computations, perhaps at another thread count: the scale search may land
    # 8 gamma_D apart (test_init's measure of its sensitivity to rounding)
    tol = mean_ce_tol(val.features, start, scale_rel=8 * gamma(val.feature_dim))
    for name, extra in (("default", ()), ("class_means", ("--init", "class-means"))):
        config, records = _compare(small, tmp_path / name, *extra)
        assert config["init"] == "class-means"
        assert records[0]["epoch"] == 0 and records[0]["val_loss"] == pytest.approx(want, rel=0, abs=tol)
        assert records[0]["val_loss"] < 0.5 * math.log(30)
    config, records = _compare(small, tmp_path / "random", "--init", "random")
    assert config["init"] == "random"
    assert records[0]["val_loss"] == pytest.approx(math.log(30), abs=0.05)
    random_start = init_weight(30, 8, 42)
    assert records[0]["val_loss"] == pytest.approx(evaluate(val, random_start)["loss"], rel=0,
                                                   abs=mean_ce_tol(val.features, random_start))
    # a comparison made from another start is another comparison: refused, not mixed
    with pytest.raises(UsageError, match="init 'random' vs 'class-means'"):
        compare_cli.compare_main(["--data-dir", str(small), "--out-dir", str(tmp_path / "random"), "--algorithms",
                                  "scent", "--epochs", "1", "--batch-size", "32", "--train-eval-size", "0"])


def test_compare_demo_draws_the_paper_figure_from_the_random_start(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(compare_plan, "DEMO_DATA", dict(compare_plan.DEMO_DATA, num_classes=20, num_samples=200))
    plan = compare_cli.plan_from_argv(["--demo", "--out-dir", str(tmp_path / "o")])
    assert {r.config["init"] for r in plan.runs} == {"random"}
    plan = compare_cli.plan_from_argv(["--demo", "--out-dir", str(tmp_path / "o"), "--init", "class-means"])
    assert {r.config["init"] for r in plan.runs} == {"class-means"}


def test_a_resumed_run_keeps_its_start(small, tmp_path):
    def args(name, *extra):
        return ["--data-dir", str(small), "--out-dir", str(tmp_path), "--name", name, "--batch-size", "32",
                "--train-eval-size", "0", *extra]

    # begun random (as every run before class-means became the default), resumed under the new default
    train(config_from_argv(args("r", "--epochs", "1", "--init", "random")), echo=lambda *_: None)
    lines = []
    train(config_from_argv(args("r", "--epochs", "2", "--resume", "latest")), echo=lines.append)
    assert any("started from --init random; a resumed run keeps its start" in line for line in lines)
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["init"] == "random"
    assert load_ckpt(tmp_path / "r" / "checkpoints" / "epoch_2.pt")["config"]["init"] == "random"
    # the result is the uninterrupted random-start run's
    train(config_from_argv(args("whole", "--epochs", "2", "--init", "random")), echo=lambda *_: None)
    a = load_ckpt(tmp_path / "r" / "checkpoints" / "epoch_2.pt")["weight"]
    b = load_ckpt(tmp_path / "whole" / "checkpoints" / "epoch_2.pt")["weight"]
    assert a.equal(b)
    # a checkpoint without `init` in its config (written before the flag existed) was random
    ckpt = load_ckpt(tmp_path / "r" / "checkpoints" / "epoch_2.pt")
    del ckpt["config"]["init"]
    from xcent.modelio import save_atomic

    save_atomic(ckpt, tmp_path / "r" / "checkpoints" / "epoch_2.pt")
    assert cli.main(["train", *args("r", "--epochs", "3", "--resume", "latest", "--init", "class-means")]) == 0
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["init"] == "random"


def test_class_means_of_unchecked_non_finite_features_is_one_line_exit_2(tmp_path, capsys):
    import numpy as np

    from xcent.data import write_split

    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 4)).astype(np.float32)
    x[17, 2] = np.nan
    write_split(tmp_path / "d" / "train", x, rng.integers(0, 5, 60))
    write_split(tmp_path / "d" / "val", x[:5] * 0, np.arange(5))
    argv = ["train", "--data-dir", str(tmp_path / "d"), "--out-dir", str(tmp_path), "--no-check-features",
            "--epochs", "1", "--batch-size", "8"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--init class-means: the training features hold NaN or Inf (not checked with "
                            "--no-check-features); remove those rows, or pass --init random")
    assert not list((tmp_path / "scent").glob("checkpoints/*.pt"))
