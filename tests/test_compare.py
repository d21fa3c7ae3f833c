"""`xcent compare` and `xcent plot` on tiny synthetic data (a few seconds in all)."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest

import xcent.train
from xcent import cli, compare, losses
from xcent.cli import compare as compare_cli
from xcent.compare import plan as compare_plan
from xcent.data import synthesize
from xcent.errors import DivergenceError

TRAIN_FLAGS = ["--batch-size", "32", "--train-eval-size", "0"]
REAL_TRAIN = xcent.train.train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny"
    synthesize(path, num_classes=30, feature_dim=8, num_samples=480, seed=0, noise=0.5)
    return path


@pytest.fixture(scope="module")
def compared(data_dir, tmp_path_factory):
    """One finished comparison: scent and bsgd, two seeds, two epochs."""
    out = tmp_path_factory.mktemp("cmp") / "out"
    rc = compare_cli.compare_main(["--data-dir", str(data_dir), "--out-dir", str(out), "--algorithms", "scent,bsgd",
                               "--seeds", "1,2", "--epochs", "2", *TRAIN_FLAGS])
    assert rc == 0
    return out


def _jsonl(out: Path, name: str) -> list[dict]:
    return compare.read_records(out / name / f"eval_{name}.jsonl")


def _md_rows(md: str) -> dict[str, list[str]]:
    """Per-seed rows of compare.md: run name -> its cells."""
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and cells[1].startswith("`"):
            rows[cells[1].strip("`")] = cells
    return rows


def _spy_train(monkeypatch, fail_algorithm=None):
    """Record the configs `xcent.train.train` is called with (optionally failing one algorithm)."""
    calls = []

    def spy(c, echo=print):
        calls.append(c.to_dict())
        if c.algorithm == fail_algorithm:
            raise DivergenceError("training diverged at epoch 1, step 3 (test): non-finite loss")
        return REAL_TRAIN(c, echo=lambda *a: None)

    monkeypatch.setattr(xcent.train, "train", spy)
    return calls


# ----------------------------------------------------------------------------- tables


def test_tables_equal_jsonl(compared):
    summary = json.loads((compared / "compare.json").read_text())
    rows = _md_rows((compared / "compare.md").read_text())
    cols = list(compare.METRICS)
    assert sorted(rows) == ["bsgd_seed1", "bsgd_seed2", "scent_seed1", "scent_seed2"]
    for run in summary["runs"]:
        records = _jsonl(compared, run["name"])
        last = records[-1]
        assert last["epoch"] == 2 and run["status"] == "done"
        expected = {
            "final_train_loss": last["train_loss"], "final_val_loss": last["val_loss"],
            "best_val_loss": min(r["val_loss"] for r in records), "final_val_top1": last["val_acc"],
            "final_val_top5": last["val_top5"], "test_loss": last["best_test_loss"],
            "test_top1": last["best_test_acc"],
            "seconds_per_epoch": statistics.fmean(r["epoch_seconds"] for r in records[1:]),
        }
        # test numbers are the ones measured at the epoch of best val top-1
        at_best = [r for r in records if r["test_loss"] is not None][-1]
        assert at_best["val_acc"] == last["best_val_acc"] and at_best["test_loss"] == expected["test_loss"]
        for key, value in expected.items():
            assert run["metrics"][key] == pytest.approx(value, rel=1e-12), key
            cell = rows[run["name"]][3 + cols.index(key)]
            assert cell == format(value, compare.METRICS[key][1]), (run["name"], key)
    for algo in ("scent", "bsgd"):
        res = summary["results"][algo]
        assert res["seeds"] == [1, 2]
        finals = [_jsonl(compared, f"{algo}_seed{s}")[-1]["val_loss"] for s in (1, 2)]
        assert res["metrics"]["final_val_loss"]["mean"] == pytest.approx(statistics.fmean(finals))
        assert res["metrics"]["final_val_loss"]["std"] == pytest.approx(statistics.stdev(finals))
    scent_hp = summary["results"]["scent"]["hparams"]
    assert scent_hp == {"lr": 5.0, "gamma": 12.0}  # the tuned defaults of the spec
    md = (compared / "compare.md").read_text()
    summary_line = next(line for line in md.splitlines() if line.startswith("| SCENT | 2 |"))
    m = summary["results"]["scent"]["metrics"]["final_val_loss"]
    assert f"{m['mean']:.4f} ± {m['std']:.4f}" in summary_line and "lr 5, gamma 12" in summary_line


# ----------------------------------------------------------------------------- figure


def test_figure_panels_and_curves(compared):
    summary = json.loads((compared / "compare.json").read_text())
    fig = compare.make_figure(compare.compare_curves(summary), "t")
    axes = fig.get_axes()
    assert len(axes) == 2
    assert "Train" in axes[0].get_title() and "Validation" in axes[1].get_title()
    assert all(ax.get_xlabel() == "epoch" for ax in axes)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    # the paper's legend order, not the run order; then the shared start as a reference line
    assert labels == ["BSGD (2 seeds)", "SCENT (2 seeds)", "start (epoch 0)"]
    for ax, key in zip(axes, ("train_loss", "val_loss")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        for algo, label in (("bsgd", "BSGD (2 seeds)"), ("scent", "SCENT (2 seeds)")):
            runs = [_jsonl(compared, f"{algo}_seed{s}") for s in (1, 2)]
            x, y = lines[label].get_data()
            assert list(x) == [0, 1, 2]
            assert list(y) == pytest.approx([statistics.fmean(r[e][key] for r in runs) for e in range(3)])
            assert lines[label].get_color() == losses.get(algo).color
        assert len(ax.collections) == 2  # one min-max band per algorithm
        # the start: the runs' epoch-0 value (both algorithms start from the same model per seed)
        starts = [_jsonl(compared, f"{algo}_seed{s}")[0][key] for algo in ("bsgd", "scent") for s in (1, 2)]
        x, y = lines["start (epoch 0)"].get_data()
        assert list(y) == pytest.approx([statistics.fmean(starts)] * 2, rel=1e-12)
        assert lines["start (epoch 0)"].get_linestyle() == ":"
    from PIL import Image

    with Image.open(compared / "compare.png") as img:
        width, height = img.size
    assert width > 1000 and height > 500
    assert (compared / "compare.pdf").read_bytes()[:4] == b"%PDF"


# ----------------------------------------------------------------------------- resume


def test_second_call_skips_finished_runs(compared, data_dir, monkeypatch):
    calls = _spy_train(monkeypatch)
    jsonl = compared / "scent_seed1" / "eval_scent_seed1.jsonl"
    before = (jsonl.stat().st_mtime_ns, jsonl.read_bytes())
    rc = compare_cli.compare_main(["--data-dir", str(data_dir), "--out-dir", str(compared), "--algorithms",
                               "scent,bsgd", "--seeds", "1,2", "--epochs", "2", *TRAIN_FLAGS])
    assert rc == 0 and calls == []
    assert (jsonl.stat().st_mtime_ns, jsonl.read_bytes()) == before


def test_interrupted_run_resumes_from_checkpoint(compared, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(compared, out)
    run = out / "bsgd_seed2"
    full = _jsonl(out, "bsgd_seed2")
    (run / "checkpoints" / "epoch_2.pt").unlink()  # as if killed during epoch 2 (whose best.pt would not
    (run / "checkpoints" / "best.pt").unlink()  # be written yet: the kept best is a resume point too)
    (run / "eval_bsgd_seed2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full[:2]))
    calls = _spy_train(monkeypatch)
    rc = compare_cli.compare_main(["--data-dir", str(data_dir), "--out-dir", str(out), "--algorithms", "scent,bsgd",
                               "--seeds", "1,2", "--epochs", "2", *TRAIN_FLAGS])
    assert rc == 0
    assert [c["name"] for c in calls] == ["bsgd_seed2"]
    assert calls[0]["resume"] == "latest"
    resumed = _jsonl(out, "bsgd_seed2")
    assert [r["epoch"] for r in resumed] == [0, 1, 2]
    assert resumed[-1]["val_loss"] == pytest.approx(full[-1]["val_loss"], rel=1e-6)


# ----------------------------------------------------------------------------- failures


def test_failed_run_is_reported_and_others_go_on(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ["--data-dir", str(data_dir), "--out-dir", str(out), "--algorithms", "sox,bsgd", "--epochs", "1",
            *TRAIN_FLAGS]
    calls = _spy_train(monkeypatch, fail_algorithm="sox")
    assert compare_cli.compare_main(argv) == 1
    assert [c["algorithm"] for c in calls] == ["sox", "bsgd"]
    summary = json.loads((out / "compare.json").read_text())
    status = {r["name"]: r["status"] for r in summary["runs"]}
    assert status == {"sox_seed42": "failed", "bsgd_seed42": "done"}
    assert summary["results"]["bsgd"]["metrics"]["final_val_loss"]["mean"] == _jsonl(out, "bsgd_seed42")[-1]["val_loss"]
    md = (out / "compare.md").read_text()
    assert "`sox_seed42` (failed): DivergenceError: training diverged" in md
    assert "sox_seed42" in capsys.readouterr().err

    calls = _spy_train(monkeypatch)  # a second call reports it again without rerunning anything
    assert compare_cli.compare_main(argv) == 1 and calls == []
    calls = _spy_train(monkeypatch)
    assert compare_cli.compare_main(argv + ["--retry-failed"]) == 0
    assert [c["algorithm"] for c in calls] == ["sox"]
    assert not (out / "sox_seed42" / compare.FAILED_FILE).exists()


# ----------------------------------------------------------------------------- grids and overrides


def test_grid_picks_the_best_point(data_dir, tmp_path):
    out = tmp_path / "out"
    rc = compare_cli.compare_main(["--data-dir", str(data_dir), "--out-dir", str(out), "--algorithms", "bsgd",
                               "--epochs", "1", "--grid", "bsgd.lr=0.01,2", *TRAIN_FLAGS])
    assert rc == 0
    finals = {lr: _jsonl(out, f"bsgd_lr{lr}_seed42")[-1]["val_loss"] for lr in ("0.01", "2")}
    best = min(finals, key=finals.get)
    assert best == "2"  # a 200x smaller step barely moves from log C
    res = json.loads((out / "compare.json").read_text())["results"]["bsgd"]
    assert res["point"] == {"lr": best} and res["runs"] == [f"bsgd_lr{best}_seed42"]
    assert [(p["point"]["lr"], p["selected"]) for p in res["grid"]] == [("0.01", False), ("2", True)]
    assert res["hparams"]["lr"] == 2.0
    md = (out / "compare.md").read_text()
    assert "| 2 | " in md and "**yes**" in md


def test_config_file_algorithms_section_and_cli_precedence(data_dir, tmp_path):
    cfg = tmp_path / "cmp.yaml"
    cfg.write_text(f"data_dir: {data_dir}\nout_dir: {tmp_path / 'o'}\nepochs: 3\nbatch_size: 64\n"
                   "algorithms:\n  sox: {gamma: 0.25, lr: 2}\n  scent: {}\n")
    plan = compare_cli.plan_from_argv(["--config", str(cfg), "--override", "sox.lr=3", "--seeds", "5"])
    assert plan.algorithms == ["sox", "scent"]
    by_algo = {r.algorithm: r.config for r in plan.runs}
    assert by_algo["sox"]["gamma"] == 0.25 and by_algo["sox"]["lr"] == 3.0  # the command line wins
    assert by_algo["scent"]["lr"] == 5.0 and by_algo["scent"]["gamma"] == 12.0
    assert all(c["epochs"] == 3 and c["batch_size"] == 64 and c["seed"] == 5 for c in by_algo.values())
    assert not (tmp_path / "o").exists()  # planning writes nothing


def test_demo_plan_uses_its_own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(compare_plan, "DEMO_DATA", dict(compare_plan.DEMO_DATA, num_classes=20, num_samples=200))
    plan = compare_cli.plan_from_argv(["--demo", "--out-dir", str(tmp_path / "o")])
    assert Path(plan.data_dir) == tmp_path / "cache" / "xcent" / compare_plan.DEMO_CACHE
    assert (Path(plan.data_dir) / "val").is_dir()
    assert sorted(r.algorithm for r in plan.runs) == ["asgd", "bsgd", "scent", "softplus", "sox", "umax"]
    assert {r.config["epochs"] for r in plan.runs} == {compare_plan.DEMO_EPOCHS} and compare_plan.DEMO_EPOCHS <= 5
    assert {r.seed for r in plan.runs} == {42}


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra, needle", [
    (["--override", "foo.lr=1"], "--override foo.lr=1"),
    (["--override", "sox.nonsense=1"], "--nonsense is not an xcent train flag"),
    (["--seeds", "a,b"], "--seeds"),
    (["--bogus", "1"], "--bogus"),
    (["--seed", "3"], "--seed: set by xcent compare; use --seeds"),
    (["--algorithms", "scent,nope"], "--algorithms nope"),
    (["--lr", "abc"], "lr"),
    (["--epochs", "abc"], "--epochs abc: expected int"),
    (["--epochs", "3"], "holds a run with other settings (epochs 2 vs 3)"),
])
def test_bad_input_is_one_line_exit_2_and_keeps_outputs(compared, data_dir, extra, needle, capsys):
    before = {p.name: p.read_bytes() for p in compared.glob("compare.*")}
    argv = ["--data-dir", str(data_dir), "--out-dir", str(compared), "--algorithms", "scent,bsgd",
            "--seeds", "1,2", "--epochs", "2", *TRAIN_FLAGS, *extra]
    rc = cli.main(["compare", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("xcent compare: error:") and needle in err
    assert {p.name: p.read_bytes() for p in compared.glob("compare.*")} == before


def test_missing_data_dir_is_named(tmp_path, capsys):
    rc = cli.main(["compare", "--data-dir", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--data-dir" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- xcent plot


def test_plot_from_run_dirs_and_seed_style_jsonl(compared, tmp_path, capsys):
    seed_dir = tmp_path / "seed_runs"  # the seed code's layout: eval_NAME.jsonl, no config.yaml
    seed_dir.mkdir()
    shutil.copy(compared / "scent_seed1" / "eval_scent_seed1.jsonl", seed_dir / "eval_glint360k_sox.jsonl")
    out = tmp_path / "fig.png"
    rc = cli.main(["plot", str(compared / "bsgd_seed1"), str(compared / "bsgd_seed2"), str(seed_dir),
                   "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "3 run(s), 2 curve(s)" in capsys.readouterr().out
    from PIL import Image

    with Image.open(out) as img:
        assert img.size[0] > 1000
    assert compare.infer_algorithm("glint360k_asgd_softplus") == "softplus"
    assert compare.infer_algorithm("tol_u-max") == "umax"
    assert compare.infer_algorithm("whatever") is None
    # a compare output directory plots its selected runs
    rc = cli.main(["plot", str(compared), "--out", str(tmp_path / "fig2.pdf")])
    assert rc == 0 and "4 run(s), 2 curve(s)" in capsys.readouterr().out


def test_plot_bad_input(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path / "none"), "--out", str(tmp_path / "f.png")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "eval_r.jsonl").write_text("{not json\n")
    assert cli.main(["plot", str(tmp_path / "r"), "--out", str(tmp_path / "f.png")]) == 2
    assert "line 1 is not JSON" in capsys.readouterr().err
    assert cli.main(["plot", str(tmp_path / "r"), "--out", str(tmp_path / "f.txt")]) == 2
    assert "--out" in capsys.readouterr().err
    assert not (tmp_path / "f.png").exists()


def test_boolean_flags_and_readable_help(data_dir, tmp_path, capsys):
    base = ["--data-dir", str(data_dir), "--out-dir", str(tmp_path / "o"), "--algorithms", "bsgd", "--epochs", "1"]
    assert compare_cli.plan_from_argv(base + ["--retry-failed"]).retry_failed is True
    assert compare_cli.plan_from_argv(base + ["--retry-failed", "true", "--batch-size", "16"]).retry_failed is True
    plan = compare_cli.plan_from_argv(base + ["--retry-failed", "false", "--low-memory"])
    assert plan.retry_failed is False and plan.runs[0].config["low_memory"] is True  # a bare train flag too
    assert compare_cli.plan_from_argv(base + ["--no-retry-failed"]).retry_failed is False
    assert cli.main(["compare", *base, "--retry-failed", "maybe"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--retry-failed" in err
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--retry-failed" in text and "type: str | null" in text and "<function" not in text
    assert not (tmp_path / "o").exists()
