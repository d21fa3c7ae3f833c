"""What xcent may write into, replace or resume: only its own runs and outputs, never a
live run, and a resume that continues the same run on the same data. See
docs/reliability.md ("A run directory is never lost or mixed")."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from xcent import cli
from xcent.data import write_split
from xcent.fileio import lock_path
from xcent.rundir import RUN_CONFIG_KEYS, not_a_run, replaced_path
from xcent.train import lr_at

TESTS = Path(__file__).resolve().parent
SRC = str(TESTS.parent / "src")


def run_cli(capsys, args):
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def small_data(root, n=60, dim=6, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    for split, rows in (("train", n), ("val", n // 3)):
        x = rng.standard_normal((rows, dim)).astype(np.float32)
        write_split(Path(root) / split, x / np.linalg.norm(x, axis=1, keepdims=True), rng.integers(0, classes, rows))
    return Path(root)


def train_args(data, out, name, *extra):
    return ["train", "--data-dir", str(data), "--out-dir", str(out), "--name", name, "--batch-size", "16",
            "--lr", "0.5", *map(str, extra)]


def snapshot(root):
    """Every path under ``root`` (hidden ones included) with a file's bytes."""
    root = Path(root)
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def epochs_of(run):
    return [json.loads(line)["epoch"] for line in (Path(run) / f"eval_{Path(run).name}.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- what a run is


def test_what_counts_as_a_run(tmp_path):
    run = tmp_path / "r"
    assert not_a_run(run) is None  # absent: a new run
    run.mkdir()
    assert not_a_run(run) is None  # empty
    (run / ".config.tmp123.yaml").write_text("x")  # an interrupted atomic write of xcent's
    assert not_a_run(run) is None
    (run / "out.log").write_text("")
    assert "no config.yaml" in not_a_run(run)
    config = dict.fromkeys(RUN_CONFIG_KEYS, 1)
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "data_size": None}))  # a hand-written --config
    assert "did not write" in not_a_run(run)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "checkpoints").mkdir()
    (run / "eval_other_name.jsonl").write_text("")  # a run renamed by hand is still a run
    assert not_a_run(run) is None
    (run / "curves.png").write_text("")
    assert "'curves.png'" in not_a_run(run)
    assert not_a_run(run, others_ok=True) is None  # what --resume accepts
    (run / "curves.png").unlink()
    (run / "checkpoints").rmdir()
    (run / "checkpoints").write_text("")  # a file where xcent keeps a directory
    assert "'checkpoints'" in not_a_run(run)
    assert "is a file" in not_a_run(run / "out.log")


# ----------------------------------------------------------------------------- section: nothing else is touched


def user_folder(path):
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    (path / "sub").mkdir()
    (path / "sub" / "more.txt").write_text("mine too")


@pytest.mark.parametrize("command", ["train", "demo"])
@pytest.mark.parametrize("target", ["folder", "data", "file", "run_with_my_file"])
def test_train_never_writes_into_or_replaces_what_is_not_a_run(tmp_path, capsys, command, target):
    """The data directory, a folder or a file of the user's, or a run holding a file xcent did not
    write: exit 2 with one line, with and without --overwrite, and nothing is touched (no
    `.NAME.replaced`, no lock file left)."""
    data = small_data(tmp_path / "data")
    out, name = tmp_path / "out", "r"
    if target == "folder":
        user_folder(out / name)
    elif target == "file":
        out.mkdir()
        (out / name).write_text("mine")
    elif target == "data":
        out, name = tmp_path, "data"
    else:
        assert cli.main(train_args(data, out, name, "--epochs", 1)) == 0
        (out / name / "predictions.jsonl").write_text("mine")
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        args = train_args(data, out, name, "--epochs", 1, *extra)
        if command == "demo":
            args[0] = "demo"
        code, err = run_cli(capsys, args)
        assert code == 2 and len(err) == 1, err
        assert str(out / name) in err[0] and "not an xcent run" in err[0], err
        assert snapshot(tmp_path) == before


def test_a_file_set_aside_by_an_older_overwrite_is_reported_not_deleted(tmp_path, capsys):
    """`.NAME.replaced` that is not a run (an older xcent renamed a user's file so): every later
    command on NAME exits 2 naming it (no NotADirectoryError), and leaves it alone."""
    data = small_data(tmp_path / "data")
    out = tmp_path / "out"
    assert cli.main(train_args(data, out, "r", "--epochs", 1)) == 0
    replaced_path(out / "r").write_text("the user's file")
    before = snapshot(tmp_path)
    for extra in (["--resume", "latest", "--epochs", 2], ["--overwrite"], []):
        code, err = run_cli(capsys, train_args(data, out, "r", *extra))
        assert code == 2 and len(err) == 1 and str(replaced_path(out / "r")) in err[0], err
        assert snapshot(tmp_path) == before


def test_a_run_and_an_empty_directory_may_be_used(tmp_path, capsys):
    data = small_data(tmp_path / "data")
    out = tmp_path / "out"
    (out / "r").mkdir(parents=True)  # empty: used as it is
    assert cli.main(train_args(data, out, "r", "--epochs", 1)) == 0
    code, err = run_cli(capsys, train_args(data, out, "r", "--epochs", 1))
    assert code == 2 and "already holds a run" in err[0]
    assert cli.main(train_args(data, out, "r", "--epochs", 2, "--overwrite")) == 0
    assert epochs_of(out / "r") == [0, 1, 2] and not replaced_path(out / "r").exists()
    (out / "r" / "curves.png").write_text("a figure of the user's")  # resume writes only its own files
    assert cli.main(train_args(data, out, "r", "--epochs", 3, "--resume", "latest")) == 0
    assert (out / "r" / "curves.png").read_text() == "a figure of the user's"


def test_a_failed_start_leaves_no_out_dir_behind(tmp_path, capsys):
    """The run's lock is taken before the data is read; a bad dataset still leaves nothing."""
    data = small_data(tmp_path / "data")
    code, err = run_cli(capsys, train_args(data, tmp_path / "a" / "b", "r", "--num-classes", 2))
    assert code == 2 and "--num-classes 2" in err[0], err
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------- a live run is never replaced


def start_paused(where, args):
    """``xcent train`` in a new process, stopped at ``where`` (tests/launch_paused.py)."""
    proc = subprocess.Popen([sys.executable, str(TESTS / "launch_paused.py"), where, "--", *map(str, args[1:])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=SRC))
    seen = []
    for line in proc.stdout:  # what the run prints before it pauses
        if line.strip() == "paused":
            return proc
        seen.append(line)
    proc.kill()
    raise AssertionError(f"the run did not pause: {''.join(seen)} {proc.communicate()}")


def go_on(proc) -> int:
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.communicate(timeout=120)
    return proc.returncode


@pytest.mark.parametrize("where", ["data", "epoch:1"])
def test_overwrite_of_a_live_run_exits_2_naming_it(tmp_path, capsys, where):
    """A run that is reading its data or training: `--overwrite` from another process exits 2
    naming the holder, and the live run ends with all its epochs."""
    data = small_data(tmp_path / "data")
    out = tmp_path / "out"
    live = start_paused(where, train_args(data, out, "r", "--epochs", 2))
    try:
        before = snapshot(tmp_path)
        code, err = run_cli(capsys, train_args(data, out, "r", "--epochs", 1, "--overwrite"))
        assert code == 2 and len(err) == 1 and f"in use by process {live.pid}" in err[0], err
        assert snapshot(tmp_path) == before
    finally:
        assert go_on(live) == 0
    assert epochs_of(out / "r") == [0, 1, 2] and not replaced_path(out / "r").exists()
    assert sorted(p.name for p in (out / "r" / "checkpoints").iterdir()) == ["best.pt", "epoch_1.pt", "epoch_2.pt"]


def test_a_run_started_while_an_overwrite_reads_its_data_exits_2(tmp_path, capsys):
    """The overwrite started first and is still reading its data; a run started on the same name
    meanwhile exits 2 naming it (before, it trained to the end, exit 0, and was then deleted by the
    overwrite, which also exited 0)."""
    data = small_data(tmp_path / "data")
    out = tmp_path / "out"
    assert cli.main(train_args(data, out, "r", "--epochs", 1)) == 0
    first = start_paused("data", train_args(data, out, "r", "--epochs", 1, "--overwrite", "--seed", 3))
    try:
        code, err = run_cli(capsys, train_args(data, out, "r", "--epochs", 2, "--resume", "latest"))
        assert code == 2 and len(err) == 1 and f"in use by process {first.pid}" in err[0], err
    finally:
        assert go_on(first) == 0
    saved = yaml.safe_load((out / "r" / "config.yaml").read_text())
    assert saved["seed"] == 3 and epochs_of(out / "r") == [0, 1]
    assert not lock_path(out / "r").exists()


# ----------------------------------------------------------------------------- the other commands' outputs

HOLD = """
import sys, time
from xcent.fileio import exclusive_lock
with exclusive_lock(sys.argv[1], "run"):
    print("locked", flush=True)
    time.sleep(120)
"""


def compare_args(data, out):
    return ["compare", "--data-dir", str(data), "--out-dir", str(out), "--algorithms", "scent", "--epochs", "1",
            "--batch-size", "16", "--lr", "0.5"]


@pytest.mark.parametrize("target", ["out_dir_of_mine", "run_dir_of_mine", "file"])
def test_compare_writes_only_into_its_own_outputs(tmp_path, capsys, target):
    data = small_data(tmp_path / "data")
    out = tmp_path / "cmp"
    assert cli.main(compare_args(data, out)) == 0  # a comparison: rerun, it is reused
    (run_name,) = [p.name for p in out.iterdir() if p.is_dir()]
    if target == "out_dir_of_mine":
        out = tmp_path / "mine"
        user_folder(out)
    elif target == "run_dir_of_mine":
        shutil.rmtree(out / run_name)
        user_folder(out / run_name)  # a folder of mine under a planned run's name
    else:
        out = tmp_path / "file"
        out.write_text("mine")
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, compare_args(data, out))
    assert code == 2 and len(err) == 1 and str(out) in err[0], err
    assert snapshot(tmp_path) == before


def test_compare_stops_on_a_run_another_process_trains(tmp_path, capsys):
    """Not recorded as failed (a compare_failed.json written into the live run, and the run
    reported failed for ever): the command exits 2 naming the holder."""
    data = small_data(tmp_path / "data")
    out = tmp_path / "cmp"
    assert cli.main(compare_args(data, out)) == 0
    (run_name,) = [p.name for p in out.iterdir() if p.is_dir()]
    shutil.rmtree(out / run_name)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / run_name)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=SRC))
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = run_cli(capsys, compare_args(data, out))
        assert code == 2 and f"in use by process {holder.pid}" in err[-1], err
        assert not (out / run_name).exists()
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(compare_args(data, out)) == 0


@pytest.mark.parametrize("command", ["synth", "demo"])
@pytest.mark.parametrize("target", ["folder", "file"])
def test_datasets_are_written_only_into_a_new_or_empty_directory(tmp_path, capsys, command, target):
    """`xcent synth --out` and `xcent demo --data-dir` (the built-in dataset written on first use)
    used to write train/val/test into a folder of the user's, over files of the same name."""
    where = tmp_path / "d"
    if target == "folder":
        user_folder(where)
        (where / "val").mkdir()
        (where / "val" / "features.npy").write_text("mine")
    else:
        where.write_text("mine")
    before = snapshot(tmp_path)
    if command == "synth":
        args = ["synth", "--out", where, "--num-classes", 5, "--num-samples", 50]
    else:
        args = ["demo", "--data-dir", where, "--out-dir", tmp_path / "o", "--epochs", 1]
    code, err = run_cli(capsys, args)
    flag = "--out" if command == "synth" else "--data-dir"
    assert code == 2 and len(err) == 1 and f"{flag} {where}" in err[0], err
    assert snapshot(tmp_path) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["synth", "--out", str(empty), "--num-classes", "5", "--num-samples", "50"]) == 0
    assert (empty / "val" / "features.npy").exists()


def test_file_outputs_replace_only_what_the_command_wrote(tmp_path, capsys):
    """export, predict and import --overwrite replace an earlier output of theirs, never a file
    of the user's that happens to have the suffix."""
    data = small_data(tmp_path / "data")
    assert cli.main(train_args(data, tmp_path / "o", "r", "--epochs", 1)) == 0
    ckpt = tmp_path / "o" / "r" / "checkpoints" / "epoch_1.pt"
    np.save(tmp_path / "x.npy", np.ones((3, 6), dtype=np.float32))
    commands = {
        "model.safetensors": ["export", "--checkpoint", ckpt, "--out"],
        "preds.jsonl": ["predict", "--checkpoint", ckpt, "--features", tmp_path / "x.npy", "--top-k", 2, "--out"],
        "preds.csv": ["predict", "--checkpoint", ckpt, "--features", tmp_path / "x.npy", "--top-k", 2, "--out"],
    }
    for name, args in commands.items():
        out = tmp_path / name
        out.write_text("a file of the user's\n")
        code, err = run_cli(capsys, [*args, out])
        assert code == 2 and len(err) == 1 and f"--out {out}: exists" in err[0], err
        assert out.read_text() == "a file of the user's\n"
        out.unlink()
        assert cli.main([str(a) for a in (*args, out)]) == 0
        assert cli.main([str(a) for a in (*args, out)]) == 0  # its own earlier output is replaced
    mine = tmp_path / "mine.pt"
    mine.write_text("a file of the user's")
    code, err = run_cli(capsys, ["import", "--checkpoint", ckpt, "--algorithm", "scent", "--out", mine,
                                 "--overwrite", "true"])
    assert code == 2 and len(err) == 1 and "not an xcent checkpoint" in err[0], err
    assert mine.read_text() == "a file of the user's"


# ----------------------------------------------------------------------------- resume


def relabel(data, split="train"):
    """The same shapes, one label changed (a corrected annotation)."""
    path = Path(data) / split / "labels.npy"
    labels = np.load(path)
    labels[len(labels) // 2] = (labels[len(labels) // 2] + 1) % 5
    np.save(path, labels)


def strip_key(ckpt, key):
    """A checkpoint as an xcent before ``key`` existed wrote it."""
    import torch

    from xcent.modelio import save_atomic

    state = torch.load(ckpt, weights_only=True)
    assert key in state
    del state[key]
    save_atomic({k: v for k, v in state.items() if k != "checksums"}, ckpt)


@pytest.mark.parametrize("change", ["train_labels", "train_features", "val_labels"])
def test_resume_on_changed_data_is_refused_unless_allowed(tmp_path, capsys, change):
    data = small_data(tmp_path / "data")
    out = tmp_path / "out"
    assert cli.main(train_args(data, out, "r", "--epochs", 1)) == 0
    if change == "train_features":  # other features, same shapes (another backbone, a rewritten file)
        fresh = small_data(tmp_path / "other", seed=1)
        np.save(data / "train" / "features.npy", np.load(fresh / "train" / "features.npy"))
    else:
        relabel(data, change.split("_")[0])
    before = snapshot(out)
    code, err = run_cli(capsys, train_args(data, out, "r", "--epochs", 2, "--resume", "latest"))
    assert code == 2 and len(err) == 1, err
    assert f"({change.replace('_', ' ')})" in err[0] and "--allow-changed-settings" in err[0], err
    assert snapshot(out) == before
    code, err = run_cli(capsys, train_args(data, out, "r", "--epochs", 2, "--resume", "latest",
                                           "--allow-changed-settings"))
    assert code == 0 and epochs_of(out / "r") == [0, 1, 2]
    # from now on the checkpoints record the new data: a plain resume goes on
    assert cli.main(train_args(data, out, "r", "--epochs", 3, "--resume", "latest")) == 0


def test_checkpoints_without_a_fingerprint_still_resume(tmp_path, capsys):
    data = small_data(tmp_path / "data")
    out = tmp_path / "out"
    assert cli.main(train_args(data, out, "r", "--epochs", 1)) == 0
    strip_key(out / "r" / "checkpoints" / "epoch_1.pt", "data_fingerprint")
    (out / "r" / "checkpoints" / "best.pt").unlink()
    capsys.readouterr()
    assert cli.main(train_args(data, out, "r", "--epochs", 2, "--resume", "latest")) == 0
    assert "records no fingerprint of its data" in capsys.readouterr().out
    assert epochs_of(out / "r") == [0, 1, 2]


def test_lr_auto_resumes_with_the_lr_it_chose(tmp_path, capsys):
    """--lr auto on resume is the lr the run's search chose, also for a checkpoint that does not record
    that the search chose it (the run's config.yaml says lr: auto); a run given its lr is not."""
    import torch

    data = small_data(tmp_path / "data")
    out = tmp_path / "out"
    auto = [a for a in train_args(data, out, "r") if a != "0.5"]
    auto[auto.index("--lr") + 1:auto.index("--lr") + 1] = ["auto"]
    assert cli.main([*auto, "--epochs", "1"]) == 0
    chosen = torch.load(out / "r" / "checkpoints" / "epoch_1.pt", weights_only=True)["config"]["lr"]
    assert isinstance(chosen, float)
    assert cli.main([*auto, "--epochs", "2", "--resume", "latest"]) == 0
    strip_key(out / "r" / "checkpoints" / "epoch_2.pt", "lr_search")
    (out / "r" / "checkpoints" / "best.pt").unlink()
    assert cli.main([*auto, "--epochs", "3", "--resume", "latest"]) == 0
    records = [json.loads(line) for line in (out / "r" / "eval_r.jsonl").read_text().splitlines()]
    # the chosen lr's cosine: epoch 2 of a 2-epoch run, then epoch 3 of a 3-epoch run
    assert [r["lr"] for r in records[2:]] == pytest.approx([lr_at(2, 2, chosen), lr_at(3, 3, chosen)], rel=1e-12)
    assert yaml.safe_load((out / "r" / "config.yaml").read_text())["lr"] == "auto"
    assert cli.main(train_args(data, out, "given", "--epochs", 1)) == 0
    code, err = run_cli(capsys, [*[a if a != "r" else "given" for a in auto], "--epochs", 2, "--resume", "latest"])
    assert code == 2 and "--lr 0.5 (run) vs auto (now)" in err[0], err


def test_compare_with_lr_auto_resumes_an_interrupted_run(tmp_path, capsys):
    data = small_data(tmp_path / "data")
    out = tmp_path / "cmp"
    args = [a if a != "0.5" else "auto" for a in compare_args(data, out)]
    args[args.index("--epochs") + 1] = "2"
    assert cli.main(args) == 0
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    for name in ("epoch_2.pt", "best.pt"):  # killed during epoch 2
        (run / "checkpoints" / name).unlink()
    jsonl = run / f"eval_{run.name}.jsonl"
    jsonl.write_text("".join(jsonl.read_text().splitlines(keepends=True)[:2]))
    assert cli.main(args) == 0
    assert epochs_of(run) == [0, 1, 2] and not (run / "compare_failed.json").exists()


def interrupt(proc) -> int:
    """Ctrl-C: SIGINT to the paused process."""
    proc.send_signal(2)
    proc.communicate(timeout=120)
    return proc.returncode


@pytest.mark.parametrize("keep_best", [True, False])
def test_a_start_interrupted_before_its_first_epoch_checkpoint_has_one_story(tmp_path, capsys, keep_best):
    """Ctrl-C after the epoch-0 record, before epoch_1.pt. With the kept best (saved at epoch 0) the run
    resumes from its start and the plain command calls it a run; without it, there is nothing to
    resume and the plain command starts it afresh (before, --resume said "no checkpoint" and the plain
    command "already holds a run")."""
    data = small_data(tmp_path / "data")
    out = tmp_path / "out"
    flags = ["--epochs", 2] + ([] if keep_best else ["--no-keep-best"])
    proc = start_paused("best:0" if keep_best else "record:0", train_args(data, out, "r", *flags))
    assert interrupt(proc) != 0
    assert epochs_of(out / "r") == [0] and not (out / "r" / "checkpoints" / "epoch_1.pt").exists()
    if keep_best:
        code, err = run_cli(capsys, train_args(data, out, "r", *flags))
        assert code == 2 and "already holds a run" in err[0], err
        assert cli.main(train_args(data, out, "r", *flags, "--resume", "latest")) == 0
    else:
        code, err = run_cli(capsys, train_args(data, out, "r", *flags, "--resume", "latest"))
        assert code == 2 and "no checkpoint" in err[0] and "without --resume" in err[0], err
        assert cli.main(train_args(data, out, "r", *flags)) == 0
    assert epochs_of(out / "r") == [0, 1, 2] and not replaced_path(out / "r").exists()


def test_resume_from_a_best_checkpoint_of_epoch_0_logs_epoch_0_once(tmp_path, capsys):
    """Going back to the kept best of epoch 0 (val loss only rose after it) and training on."""
    import torch

    data = small_data(tmp_path / "data")
    out = tmp_path / "out"
    assert cli.main(train_args(data, out, "r", "--epochs", 2)) == 0
    best = out / "r" / "checkpoints" / "best.pt"
    assert torch.load(best, weights_only=True)["epoch"] == 0  # the setting of this test, checked
    assert cli.main(train_args(data, out, "r", "--epochs", 2, "--resume", best)) == 0
    assert epochs_of(out / "r") == [0, 1, 2]


def test_divergence_names_the_kept_best_checkpoint(tmp_path, capsys):
    data = small_data(tmp_path / "data")
    out = tmp_path / "out"
    code, err = run_cli(capsys, train_args(data, out, "r", "--epochs", 2, "--lr", 1e6, "--algorithm", "sox"))
    assert code == 3 and f"Last good checkpoint: {out / 'r' / 'checkpoints' / 'best.pt'}" in err[-1], err
