"""Every run is measured against its start (epoch 0): the epoch records' `start_val_loss`,
`start_val_acc` and `improved_over_start`, the run's last console line, `best.pt` when
training did not help, and the start as a reference line in `xcent compare`/`xcent plot`."""

import pytest
from conftest import read_jsonl

from xcent import compare, losses, modelio
from xcent.cli import main as xcent_main
from xcent.compare.report import plot_curves
from xcent.config import config_from_argv
from xcent.train import train


def _train(data, out, name, *extra):
    argv = ["--data-dir", str(data), "--out-dir", str(out), "--name", name, "--batch-size", "64",
            "--train-eval-size", "300", *extra]
    lines = []
    last = train(config_from_argv(argv), echo=lines.append)
    return out / name, lines, last


def _check_records(records):
    start = records[0]
    assert start["epoch"] == 0 and "improved_over_start" not in start
    for r in records[1:]:
        assert r["start_val_loss"] == start["val_loss"] and r["start_val_acc"] == start["val_acc"]
        assert r["improved_over_start"] is (r["val_loss"] < start["val_loss"])


def test_a_run_that_loses_to_its_start_says_so_and_keeps_the_start(tiny_data, tmp_path):
    # bsgd at lr 20 from the class-mean start of this separable data: val CE rises (0.15 -> 0.57)
    run, lines, last = _train(tiny_data, tmp_path, "worse", "--algorithm", "bsgd", "--lr", "20", "--epochs", "2")
    records = read_jsonl(run / "eval_worse.jsonl")
    _check_records(records)
    assert last == records[-1] and last["improved_over_start"] is False
    assert last["val_loss"] > last["start_val_loss"]
    assert lines[-1] == (f"result: NOT improved over the start: val CE {records[0]['val_loss']:.4f} at the start -> "
                         f"{last['val_loss']:.4f} at epoch 2, val top-1 {records[0]['val_acc']:.4f} -> "
                         f"{last['val_acc']:.4f}; checkpoints/best is the start")
    best = modelio.load(run / "checkpoints" / "best.pt")
    assert best["epoch"] == 0 and best["best"]["start_val_loss"] == records[0]["val_loss"]


def test_a_run_that_improves_says_so(tiny_data, tmp_path):
    run, lines, last = _train(tiny_data, tmp_path, "better", "--algorithm", "bsgd", "--lr", "0.5", "--epochs", "2")
    records = read_jsonl(run / "eval_better.jsonl")
    _check_records(records)
    assert last["improved_over_start"] is True and last["val_loss"] < records[0]["val_loss"]
    assert lines[-1].startswith(f"result: improved over the start: val CE {records[0]['val_loss']:.4f} at the start")


def test_resume_compares_with_the_start_of_the_run(tiny_data, tmp_path):
    _train(tiny_data, tmp_path, "r", "--algorithm", "bsgd", "--lr", "0.5", "--epochs", "1")
    run, _, last = _train(tiny_data, tmp_path, "r", "--algorithm", "bsgd", "--lr", "0.5", "--epochs", "2",
                          "--resume", "latest")
    records = read_jsonl(run / "eval_r.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2]
    _check_records(records)
    # a checkpoint written before the start was kept in it: the start comes from the epoch-0 record
    ckpt = modelio.load(run / "checkpoints" / "epoch_2.pt")
    del ckpt["best"]["start_val_loss"], ckpt["best"]["start_val_acc"]
    modelio.save_atomic(ckpt, run / "checkpoints" / "epoch_2.pt")
    run, _, last = _train(tiny_data, tmp_path, "r", "--algorithm", "bsgd", "--lr", "0.5", "--epochs", "3",
                          "--resume", "latest")
    _check_records(read_jsonl(run / "eval_r.jsonl"))
    assert last["start_val_loss"] == records[0]["val_loss"]


def _records(start_val, start_train, epochs=2):
    out = [{"epoch": 0, "train_loss": start_train, "val_loss": start_val, "val_acc": 0.5}]
    out += [{"epoch": e, "train_loss": start_train - e * 0.1, "val_loss": start_val - e * 0.1, "val_acc": 0.6}
            for e in range(1, epochs + 1)]
    return out


def _start_lines(fig):
    """(axis index, label, y, colour) of the dotted horizontal lines of the figure."""
    found = []
    for i, ax in enumerate(fig.get_axes()):
        for line in ax.get_lines():
            x, y = line.get_data()
            if line.get_linestyle() == ":":
                assert y[0] == y[1]  # horizontal
                found.append((i, line.get_label(), float(y[0]), line.get_color()))
    return found


def test_figure_draws_a_shared_start_once_and_separate_starts_per_curve():
    shared = plot_curves({"scent": [_records(2.0, 1.9)], "bsgd": [_records(2.0, 1.9)]})
    lines = _start_lines(compare.make_figure(shared))
    assert lines == [(0, "start (epoch 0)", 1.9, "0.35"), (1, "start (epoch 0)", 2.0, "0.35")]
    apart = plot_curves({"scent": [_records(2.0, 1.9)], "bsgd": [_records(3.0, 2.5)]})
    lines = _start_lines(compare.make_figure(apart))
    # the registry's legend order: bsgd before scent
    bsgd, scent = losses.get("bsgd").color, losses.get("scent").color
    assert lines == [(0, "BSGD start", 2.5, bsgd), (0, "SCENT start", 1.9, scent),
                     (1, "BSGD start", 3.0, bsgd), (1, "SCENT start", 2.0, scent)]
    # records that do not begin at epoch 0 (a run's later part) have no start to draw
    assert _start_lines(compare.make_figure(plot_curves({"scent": [_records(2.0, 1.9)[1:]]}))) == []


def test_plot_of_run_directories_draws_their_start(tiny_data, tmp_path, monkeypatch):
    run, _, _ = _train(tiny_data, tmp_path, "scent_run", "--lr", "0.1", "--epochs", "1")
    records = read_jsonl(run / "eval_scent_run.jsonl")
    import xcent.cli.compare as compare_cli

    figures = []
    monkeypatch.setattr(compare_cli, "save_figure", lambda fig, path: figures.append(fig))
    assert xcent_main(["plot", str(run), "--out", str(tmp_path / "f.png")]) == 0
    assert [(i, y) for i, _, y, _ in _start_lines(figures[0])] == [
        (0, pytest.approx(records[0]["train_loss"], rel=1e-12)), (1, pytest.approx(records[0]["val_loss"], rel=1e-12))]
