"""The trainer: outputs, metrics, exact resume, schedules, divergence, data formats."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import gamma, mean_ce_tol, read_jsonl

from xcent import cli
from xcent import train as train_mod
from xcent.classifier import init_weight
from xcent.config import config_from_argv
from xcent.data import load_dataset, synthesize, write_split
from xcent.evaluate import evaluate
from xcent.init import class_means_init
from xcent.modelio import load as load_ckpt
from xcent.train import lr_at, train

TIMING = set(train_mod.TIMING_KEYS)


def run_args(data, out, name, *extra):
    return ["--data-dir", str(data), "--out-dir", str(out), "--name", name, *map(str, extra)]


def config(data, out, name, *extra):
    return config_from_argv(run_args(data, out, name, *extra))


def test_lr_schedule_closed_form():
    E = 10
    assert lr_at(1, E, 2.0) == 2.0
    assert lr_at(6, E, 2.0) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert lr_at(E, E, 2.0) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
    # warmup: linear ramp 0.1 lr .. then cosine over the remaining epochs, starting at lr
    assert [lr_at(e, E, 1.0, 4) for e in (1, 2, 3, 4)] == pytest.approx([0.1, 0.325, 0.55, 0.775])
    assert lr_at(5, E, 1.0, 4) == 1.0
    assert lr_at(7, E, 1.0, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 6)))


def test_cli_run_writes_outputs_and_curves_start_at_log_c(tiny_data, tmp_path, capsys):
    code = cli.main(["train", *run_args(tiny_data, tmp_path, "r", "--epochs", 3, "--batch-size", 32,
                                        "--algorithm", "scent", "--lr", 2.0, "--init", "random")])
    assert code == 0
    out = tmp_path / "r"
    records = read_jsonl(out / "eval_r.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    required = {"epoch", "train_loss", "val_loss", "val_acc", "best_val_acc", "best_test_acc", "best_test_loss",
                "val_top5", "lr", "epoch_seconds", "samples_per_second", "skipped_steps"}
    assert all(required <= set(r) for r in records)
    assert records[0]["val_loss"] == pytest.approx(math.log(60), abs=0.05)
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.5
    assert records[-1]["best_val_acc"] == max(r["val_acc"] for r in records)
    assert [r["lr"] for r in records[1:]] == pytest.approx([lr_at(e, 3, 2.0) for e in (1, 2, 3)])
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "best.pt"}
    assert (out / "config.yaml").exists() and (out / "out.log").read_text()
    # the reported val metrics are the exact full-softmax metrics of the saved model
    ckpt = load_ckpt(out / "checkpoints" / "epoch_3.pt")
    data = load_dataset(tiny_data)
    val = evaluate(data.splits["val"], ckpt["weight"])
    assert val["loss"] == pytest.approx(records[-1]["val_loss"], rel=1e-9)
    assert val["top1"] == records[-1]["val_acc"]
    # xcent eval prints the same numbers
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoints" / "epoch_3.pt"), "--data-dir", str(tiny_data),
                     "--split", "val", "--json", "true"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["loss"] == pytest.approx(val["loss"]) and printed["top1"] == val["top1"]
    assert 0 <= printed["top1"] <= printed["top5"] <= 1


def test_saved_config_is_a_valid_config_file(tiny_data, tmp_path):
    train(config(tiny_data, tmp_path, "orig", "--epochs", 1, "--lr", 3.0, "--batch-size", 64), echo=lambda *_: None)
    assert cli.main(["train", "--config", str(tmp_path / "orig" / "config.yaml"), "--name", "again"]) == 0
    again = (tmp_path / "again" / "config.yaml").read_text()
    assert again == (tmp_path / "orig" / "config.yaml").read_text().replace("name: orig", "name: again")
    a = load_ckpt(tmp_path / "orig" / "checkpoints" / "epoch_1.pt")["weight"]
    assert torch.equal(a, load_ckpt(tmp_path / "again" / "checkpoints" / "epoch_1.pt")["weight"])


def test_low_memory_gives_identical_results(tiny_data, tmp_path):
    train(config(tiny_data, tmp_path, "a", "--epochs", 1, "--batch-size", 64), echo=lambda *_: None)
    train(config(tiny_data, tmp_path, "b", "--epochs", 1, "--batch-size", 64, "--low-memory", "true"),
          echo=lambda *_: None)
    a = load_ckpt(tmp_path / "a" / "checkpoints" / "epoch_1.pt")
    b = load_ckpt(tmp_path / "b" / "checkpoints" / "epoch_1.pt")
    assert torch.equal(a["weight"], b["weight"]) and torch.equal(a["nu"], b["nu"])


def test_python_m_xcent_runs(tiny_data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "xcent", "train", *run_args(tiny_data, tmp_path, "m", "--epochs", 1,
                                                                             "--batch-size", 64)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "checkpoints" / "epoch_1.pt").exists()


@pytest.mark.parametrize("algorithm", ["scent", "asgd"])
def test_resume_is_exact(tiny_data, tmp_path, monkeypatch, algorithm):
    extra = ("--epochs", 3, "--batch-size", 40, "--algorithm", algorithm, "--train-eval-size", 300,
             "--log-every-steps", 7)
    train(config(tiny_data, tmp_path, "full", *extra), echo=lambda *_: None)

    real_save = train_mod._save

    def crash_after_first(run, weight, loss_fn, epoch, *rest):
        path = real_save(run, weight, loss_fn, epoch, *rest)
        if epoch == 1:
            raise KeyboardInterrupt("simulated kill")
        return path

    monkeypatch.setattr(train_mod, "_save", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_data, tmp_path, "cut", *extra), echo=lambda *_: None)
    monkeypatch.setattr(train_mod, "_save", real_save)
    train(config(tiny_data, tmp_path, "cut", *extra, "--resume", "latest"), echo=lambda *_: None)

    a = load_ckpt(tmp_path / "full" / "checkpoints" / "epoch_3.pt")
    b = load_ckpt(tmp_path / "cut" / "checkpoints" / "epoch_3.pt")
    assert torch.equal(a["weight"], b["weight"])
    assert torch.equal(a["nu_set"], b["nu_set"]) and a["nu_set"].all()
    assert torch.equal(a["nu"], b["nu"])
    def strip(rs):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rs]

    assert strip(read_jsonl(tmp_path / "full" / "eval_full.jsonl")) == strip(
        read_jsonl(tmp_path / "cut" / "eval_cut.jsonl")
    )
    # the step log too: the resumed run drops nothing and repeats nothing
    steps_full = read_jsonl(tmp_path / "full" / "steps_full.jsonl")
    assert steps_full and steps_full == read_jsonl(tmp_path / "cut" / "steps_cut.jsonl")


def test_running_train_loss_is_the_seed_mean_full_ce(tiny_data, tmp_path):
    """With a vanishing lr the model does not move, so the running mean of each batch's
    full CE equals the full CE of the initial model over the whole train split: the
    reference implementation's random start, and the default class-mean start."""
    data = load_dataset(tiny_data)
    starts = {"random": init_weight(data.num_classes, data.feature_dim, 42),
              "class-means": class_means_init(data.train, data.num_classes, None).weight}  # 20,000 > N: all rows
    for init, weight in starts.items():
        last = train(config(tiny_data, tmp_path, init, "--epochs", 1, "--lr", 1e-12, "--train-loss", "running",
                            "--batch-size", 50, "--init", init), echo=lambda *_: None)
        # batches of 50 rows against chunks of 4096: GEMMs of other shapes; the class-mean
        # scale may land 8 gamma_D apart (test_init's measure of the search's sensitivity)
        tol = mean_ce_tol(data.train.features, weight, scale_rel=8 * gamma(data.feature_dim))
        assert last["train_loss"] == pytest.approx(evaluate(data.train, weight)["loss"], rel=0, abs=tol)


def test_subset_train_loss_all_rows(tiny_data, tmp_path):
    last = train(config(tiny_data, tmp_path, "sub", "--epochs", 1, "--train-eval-size", 0), echo=lambda *_: None)
    ckpt = load_ckpt(tmp_path / "sub" / "checkpoints" / "epoch_1.pt")
    train_split = load_dataset(tiny_data).train
    expected = evaluate(train_split, ckpt["weight"])
    # the same evaluation, perhaps at another thread count (the trainer's thread policy)
    assert last["train_loss"] == pytest.approx(expected["loss"], rel=0, abs=mean_ce_tol(train_split.features,
                                                                                      ckpt["weight"]))


def test_single_label_batches_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "d"
    write_split(data / "train", rng.standard_normal((10, 4)).astype(np.float32), np.zeros(10, dtype=np.int64))
    write_split(data / "val", rng.standard_normal((4, 4)).astype(np.float32), np.array([0, 1, 0, 1]))
    last = train(config(data, tmp_path, "k1", "--epochs", 1, "--batch-size", 4), echo=lambda *_: None)
    assert last["skipped_steps"] == 3
    ckpt = load_ckpt(tmp_path / "k1" / "checkpoints" / "epoch_1.pt")
    # no step taken: the weight is the start (class means; class 1 has no training rows: zero)
    start = class_means_init(load_dataset(data).train, 2, None).weight
    assert torch.equal(ckpt["weight"], start) and not start[1].any()
    assert math.isfinite(last["val_loss"])


@pytest.mark.parametrize("fmt,dtype", [("pt", torch.bfloat16), ("pt", torch.float16), ("npy", np.float16)])
def test_formats_and_dtypes(tmp_path, fmt, dtype):
    rng = np.random.default_rng(1)
    data = tmp_path / "d"
    for split, n in (("train", 200), ("val", 40)):
        x = rng.standard_normal((n, 8)).astype(np.float32)
        y = rng.integers(0, 10, n)
        if fmt == "pt":
            write_split(data / split, torch.from_numpy(x).to(dtype), torch.from_numpy(y), fmt="pt")
        else:
            write_split(data / split, x.astype(dtype), y)
    last = train(config(data, tmp_path, "f", "--epochs", 2, "--batch-size", 16), echo=lambda *_: None)
    assert math.isfinite(last["val_loss"]) and last["epoch"] == 2


def test_divergence_stops_with_exit_3_and_keeps_last_good_checkpoint(tmp_path, capsys):
    rng = np.random.default_rng(2)
    data = tmp_path / "d"
    for split, n in (("train", 400), ("val", 40)):
        write_split(data / split, (rng.standard_normal((n, 8)) * 1e3).astype(np.float32), rng.integers(0, 20, n))
    args = ["train", *run_args(data, tmp_path, "div", "--algorithm", "asgd", "--lr", 1e6, "--epochs", 3,
                               "--batch-size", 16)]
    code = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert len(err) >= 1 and "diverged" in err[-1] and "--lr" in err[-1] and "asgd" in err[-1]
    records = read_jsonl(tmp_path / "div" / "eval_div.jsonl")
    assert records and all(math.isfinite(r["val_loss"]) for r in records)
    assert len(records) <= 3  # stopped before the end
    saved = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "div" / "checkpoints").glob("epoch_*.pt"))
    assert saved == list(range(1, len(records)))  # the last good epoch is the latest checkpoint
    for e in saved:
        assert torch.isfinite(load_ckpt(tmp_path / "div" / "checkpoints" / f"epoch_{e}.pt")["weight"]).all()


def test_synth_long_tail_and_determinism(tmp_path):
    info = synthesize(tmp_path / "a", num_classes=500, feature_dim=8, num_samples=20_000, seed=3)
    synthesize(tmp_path / "b", num_classes=500, feature_dim=8, num_samples=20_000, seed=3)
    assert np.array_equal(np.load(tmp_path / "a/train/features.npy"), np.load(tmp_path / "b/train/features.npy"))
    labels = np.concatenate([np.load(tmp_path / f"a/{s}/labels.npy") for s in ("train", "val", "test")])
    counts = np.bincount(labels, minlength=500)
    assert counts.min() >= 1 and counts.sum() == 20_000
    assert counts.max() > 10 * np.median(counts)  # a few big classes, many small ones
    assert info["largest_class"] == counts.max()
    norms = np.linalg.norm(np.load(tmp_path / "a/val/features.npy"), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5)


def test_low_memory_gather_equals_plain_gather(tiny_data):
    from xcent.data import load_split

    plain = load_split(tiny_data, "train")
    low = load_split(tiny_data, "train")
    low.release_pages = True
    rows = torch.randperm(plain.num_samples, generator=torch.Generator().manual_seed(0))[:700].sort().values
    a, la = plain.gather(rows)
    b, lb = low.gather(rows)  # > 256 rows: gathered piecewise with releases in between
    assert torch.equal(a, b) and torch.equal(la, lb) and a.dtype == b.dtype


# ----------------------------------------------------------------------------- the typed config


@pytest.mark.parametrize("flags,expected", [
    ([], False), (["--overwrite"], True), (["--overwrite", "true"], True), (["--overwrite", "false"], False),
    (["--overwrite=true"], True), (["--no-overwrite"], False), (["--overwrite", "--no-overwrite"], False),
    (["--overwrite", "--epochs", "3"], True),  # a bare flag before another flag
])
def test_boolean_flags_work_bare_valued_and_negated(flags, expected):
    c = config_from_argv(["--data-dir", "d", *flags])
    assert c.overwrite is expected
    assert config_from_argv(["--data-dir", "d", "--no-check-features", "--low-memory"]).check_features is False
    assert config_from_argv(["--data-dir", "d", "--low-memory"]).low_memory is True


def test_reference_flag_names_and_defaults_resolve():
    c = config_from_argv(["--data-dir", "d", "--algorithm", "UMAX", "--umax-delta", "inf", "--softplus-rho", "0.5",
                          "--data-size", "9", "--num-classes", "7", "--warmup-epochs", "1", "--save-frequency", "2",
                          "--resume", "latest", "--seed", "3", "--out-dir", "o", "--device", "cpu"])
    assert c.algorithm == "umax" and math.isinf(c.umax_delta)
    assert c.softplus_rho is None  # not a hyper-parameter of umax
    assert config_from_argv(["--data-dir", "d", "--algorithm", "softplus", "--softplus-rho", "0.5"]).softplus_rho == 0.5
    assert (c.data_size, c.num_classes, c.warmup_epochs, c.save_frequency, c.seed) == (9, 7, 1, 2, 3)
    assert c.name == "umax" and c.lr == 0.5 and c.gamma == 1.0  # the tuned defaults of umax
    from xcent.config import config_from_dict

    assert config_from_dict(c.to_dict()) == c
    dashed = config_from_dict({"data-dir": "d", "algorithm": "umax", "umax-delta": float("inf")})
    assert dashed.umax_delta == c.umax_delta


def test_help_shows_readable_types(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "<function" not in text and "0x" not in text
    assert "--overwrite" in text and "--no-overwrite" in text and "type: bool" in text
    assert "type: Optional[Real]" in text and "the seed" not in text


@pytest.mark.parametrize("flags,line", [
    (["--lr", "abc"], "--lr abc: expected a number"),
    (["--epochs", "2.5"], "--epochs 2.5: expected int"),
    (["--algorithm", "umax", "--umax-delta", "-1"], "--umax-delta -1: must be >= 0"),
    (["--gamma", "x"], "--gamma x: expected a number"),
    (["--train-loss", "both"], "--train-loss both: expected one of subset, running"),
    (["--overwrite", "maybe"], "--overwrite maybe: expected true or false"),
])
def test_parser_errors_are_one_line_naming_the_flag(tmp_path, capsys, flags, line):
    code = cli.main(["train", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"xcent train: error: {line}")
    assert not (tmp_path / "o").exists()
