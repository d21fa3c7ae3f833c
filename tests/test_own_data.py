"""xcent train --init class-means / --lr auto / --keep-best, and `best` / `latest` checkpoint names."""

import json

import pytest
import torch
from conftest import gamma, mean_ce_tol, read_jsonl

from xcent import modelio
from xcent import train as xcent_train
from xcent.cli import main as xcent_main
from xcent.config import config_from_argv
from xcent.data import load_dataset
from xcent.errors import UsageError
from xcent.evaluate import evaluate
from xcent.init import class_means_init
from xcent.train import train, train_subset


def _train(data, out, name, *extra):
    argv = ["--data-dir", str(data), "--out-dir", str(out), "--name", name, "--batch-size", "64",
            "--train-eval-size", "300", *extra]
    lines = []
    train(config_from_argv(argv), echo=lines.append)
    return out / name, lines


def test_class_means_init_is_epoch_zero_and_best_is_kept(tiny_data, tmp_path):
    run, lines = _train(tiny_data, tmp_path, "cm", "--epochs", "2", "--init", "class-means", "--lr", "1e-6")
    records = read_jsonl(run / "eval_cm.jsonl")
    data = load_dataset(tiny_data)
    init = class_means_init(data.train, data.num_classes, train_subset(data.train.num_samples, 300, 42))
    # epoch 0 is the class-mean model: its val CE is that of the library's weight
    # the same computation, perhaps at another thread count: the scale search may land
    # 8 gamma_D apart (test_init's measure of its sensitivity to rounding)
    val = data.splits["val"]
    tol = mean_ce_tol(val.features, init.weight, scale_rel=8 * gamma(val.feature_dim))
    assert records[0]["val_loss"] == pytest.approx(evaluate(val, init.weight)["loss"], rel=0, abs=tol)
    assert any(line.startswith("init: class means x ") for line in lines)
    assert any("suggestions:" in line for line in lines)  # the data report
    assert json.loads((run / "data_report.json").read_text())["num_classes"] == 60
    # keep-best: best.pt holds the epoch of the lowest val CE, and `best` resolves to it
    best_epoch = min(records, key=lambda r: r["val_loss"])["epoch"]
    best = modelio.load(run / "checkpoints" / "best.pt")
    assert best["epoch"] == best_epoch
    assert best["best"]["kept_value"] == pytest.approx(min(r["val_loss"] for r in records))
    for spec in (run / "best", run / "checkpoints" / "best"):
        assert modelio.resolve_checkpoint(spec) == run / "checkpoints" / "best.pt"
    assert modelio.resolve_checkpoint(run / "latest") == run / "checkpoints" / "epoch_2.pt"
    weight, meta = modelio.load_model(run / "best")
    assert torch.equal(weight, best["weight"]) and meta["epoch"] == best_epoch
    with pytest.raises(UsageError, match="no best checkpoint"):
        modelio.resolve_checkpoint(tmp_path / "best")
    # eval accepts it like a path
    assert xcent_main(["eval", "--checkpoint", str(run / "best"), "--data-dir", str(tiny_data)]) == 0


def test_best_by_accuracy(tiny_data, tmp_path):
    run, _ = _train(tiny_data, tmp_path, "acc", "--epochs", "2", "--best-by", "val_acc")
    records = read_jsonl(run / "eval_acc.jsonl")
    best = modelio.load(run / "checkpoints" / "best.pt")
    top = max(r["val_acc"] for r in records)
    assert best["epoch"] == min(r["epoch"] for r in records if r["val_acc"] == top)  # first to reach it
    run, _ = _train(tiny_data, tmp_path, "nokeep", "--epochs", "1", "--keep-best", "false")
    assert not (run / "checkpoints" / "best.pt").exists()


def test_lr_auto_in_train_is_logged_and_deterministic(tiny_data, tmp_path, monkeypatch):
    run1, lines = _train(tiny_data, tmp_path, "auto1", "--epochs", "1", "--lr", "auto")
    # the second run reads the search's rows per step instead of once: the same search
    monkeypatch.setattr(xcent_train, "SEARCH_CACHE_FLOATS", 0)
    run2, _ = _train(tiny_data, tmp_path, "auto2", "--epochs", "1", "--lr", "auto")
    search1 = read_jsonl(run1 / "lr_search.jsonl")
    search2 = read_jsonl(run2 / "lr_search.jsonl")
    assert [r.get("loss") for r in search1] == [r.get("loss") for r in search2]
    chosen = search1[-1]
    assert chosen["lr_search"] == "chosen" and len(search1) == 7  # six candidates, then the choice
    assert read_jsonl(run1 / "eval_auto1.jsonl")[1]["lr"] == pytest.approx(chosen["lr"])
    assert any(line.startswith("lr auto: ") for line in lines)
    # the cost is counted and reported; 60 classes are under the floor of 24 search classes x 11, and it says so
    assert chosen["rows_trained"] == sum(r["rows"] for r in search1[:-1]) > chosen["budget_rows"]
    assert chosen["epoch_share"] == pytest.approx(chosen["rows_trained"] / chosen["num_samples"])
    assert any("search cost" in line and "over the budget" in line for line in lines)
    with pytest.raises(UsageError, match="--init"):
        config_from_argv(["--data-dir", str(tiny_data), "--init", "zeros"])
