"""Reliability (issue 12): locks, full disks and read-only outputs, bad values, divergence rule,
run-directory helpers. See docs/reliability.md for what is promised and what is not."""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from xcent import cli
from xcent.data import write_split
from xcent.divergence import DIVERGENCE_FACTOR, check_divergence, divergence_bound
from xcent.errors import UsageError
from xcent.fileio import (
    append_line_durable,
    atomic_path,
    exclusive_lock,
    lock_path,
    open_memmap_reserved,
    write_text_atomic,
)
from xcent.rundir import (
    RUN_CONFIG_KEYS,
    Replacement,
    changed_settings,
    check_run_name,
    read_records,
    recover_replaced,
    replaced_path,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_cli(capsys, args):
    code = cli.main(args)
    return code, capsys.readouterr().err.strip().splitlines()


def small_data(root, n=60, dim=6, classes=5):
    rng = np.random.default_rng(0)
    for split, rows in (("train", n), ("val", n // 3)):
        x = rng.standard_normal((rows, dim)).astype(np.float32)
        write_split(root / split, x / np.linalg.norm(x, axis=1, keepdims=True), rng.integers(0, classes, rows))
    return root


# ----------------------------------------------------------------------------- a small filesystem


@pytest.fixture()
def small_fs(tmp_path):
    """A 2 MiB tmpfs mounted at tmp_path/fs (unmounted afterwards)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({proc.stderr.strip() or proc.returncode}); "
                    f"the full-disk tests need one")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to the last byte; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_atomic_writes_on_a_full_disk_raise_enospc_naming_the_path(small_fs):
    write_text_atomic(small_fs / "old.txt", "old content\n")
    fill(small_fs)
    target = small_fs / "ckpt.pt"
    with pytest.raises(OSError) as info, atomic_path(target) as tmp:
        torch.save({"weight": torch.randn(256, 256)}, tmp)  # torch alone says "unexpected pos"
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    with pytest.raises(OSError) as info, atomic_path(small_fs / "a.npy") as tmp:
        np.save(tmp, np.zeros(100_000))  # numpy alone gives no errno
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(small_fs / "a.npy")
    with pytest.raises(OSError) as info:
        write_text_atomic(small_fs / "old.txt", "new content " * 100_000)
    assert info.value.errno == errno.ENOSPC
    assert (small_fs / "old.txt").read_text() == "old content\n"  # the old file is intact
    assert not [p for p in small_fs.iterdir() if ".tmp" in p.name]  # no temp file left behind


def test_append_is_all_or_nothing_on_a_full_disk(small_fs):
    log = small_fs / "eval.jsonl"
    append_line_durable(log, json.dumps({"epoch": 0}))
    before = log.read_bytes()
    fill(small_fs)
    with pytest.raises(OSError) as info:
        append_line_durable(log, json.dumps({"epoch": 1, "pad": "x" * 200_000}))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(log)
    assert log.read_bytes() == before  # truncated back: no torn line
    (small_fs / "filler").unlink()
    append_line_durable(log, json.dumps({"epoch": 1}))
    assert [r["epoch"] for r in read_records(log)[0]] == [0, 1]


MAP_WRITE = textwrap.dedent("""
    import sys, numpy as np
    from xcent.fileio import open_memmap_reserved
    path, reserved = sys.argv[1], sys.argv[2] == "1"
    shape = (4096, 1024)  # 16 MiB of float32 on a 2 MiB filesystem
    try:
        if reserved:
            out = open_memmap_reserved(path, np.float32, shape)
        else:
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        out[:] = 1.0
        out.flush()
    except OSError as exc:
        print("OSError", exc.errno, exc.filename)
        sys.exit(2)
""")


def test_memory_mapped_outputs_reserve_space_instead_of_bus_error(small_fs):
    env = dict(os.environ, PYTHONPATH=SRC)
    plain = subprocess.run([sys.executable, "-c", MAP_WRITE, str(small_fs / "plain.npy"), "0"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == -signal.SIGBUS  # the hazard: a write into an unbacked page
    (small_fs / "plain.npy").unlink()
    reserved = subprocess.run([sys.executable, "-c", MAP_WRITE, str(small_fs / "r.npy"), "1"], env=env,
                              capture_output=True, text=True, timeout=60)
    assert reserved.returncode == 2, reserved.stderr
    assert reserved.stdout.split() == ["OSError", str(errno.ENOSPC), str(small_fs / "r.npy")]
    assert not (small_fs / "r.npy").exists()
    # with room, the reserved map is a normal array
    arr = open_memmap_reserved(small_fs / "ok.npy", np.float32, (16, 8))
    arr[:] = 2.0
    arr.flush()
    del arr
    assert np.load(small_fs / "ok.npy").sum() == 2.0 * 128


def test_commands_on_a_full_or_read_only_disk_exit_2_naming_the_path(small_fs, capsys, tmp_path):
    fill(small_fs)
    code, err = run_cli(capsys, ["synth", "--out", str(small_fs / "d"), "--num-classes", "50",
                                 "--num-samples", "8000", "--feature-dim", "32"])
    assert code == 2 and len(err) == 1, err
    assert "no space left on device while writing" in err[0] and str(small_fs) in err[0]
    assert not (small_fs / "d").exists()  # nothing half-written to refuse next time
    (small_fs / "filler").unlink()
    # after space is freed, the same command completes
    assert cli.main(["synth", "--out", str(small_fs / "d"), "--num-classes", "50", "--num-samples", "8000",
                     "--feature-dim", "32"]) == 0
    assert np.load(small_fs / "d" / "train" / "features.npy").shape[1] == 32
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    code, err = run_cli(capsys, ["synth", "--out", str(small_fs / "e"), "--num-classes", "50",
                                 "--num-samples", "1000"])
    assert code == 2 and len(err) == 1 and "read-only file system while writing" in err[0], err
    assert str(small_fs) in err[0]
    code, err = run_cli(capsys, ["train", "--data-dir", str(small_fs / "d"), "--out-dir", str(small_fs / "out"),
                                 "--epochs", "1"])
    assert code == 2 and len(err) == 1 and "read-only file system while writing" in err[0], err
    assert str(small_fs / "out") in err[0]


# ----------------------------------------------------------------------------- locks

HOLD = textwrap.dedent("""
    import sys, time
    from xcent.fileio import exclusive_lock
    with exclusive_lock(sys.argv[1], "run"):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_exclusive_lock_names_the_holder_and_dies_with_it(tmp_path):
    target = tmp_path / "out" / "run"
    with exclusive_lock(target, "run"), pytest.raises(UsageError, match=rf"run {target} is in use by process "
                                                                        rf"{os.getpid()}"):
        exclusive_lock(target, "run").acquire()
    exclusive_lock(target, "run").acquire().release()  # released on exit
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=SRC))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=rf"in use by process {holder.pid}"):
            exclusive_lock(target, "run").acquire()
    finally:
        holder.kill()  # SIGKILL: no cleanup runs; the kernel drops the lock
        holder.wait()
    with exclusive_lock(target, "run"):
        assert lock_path(target).read_text().strip() == str(os.getpid())
    assert not target.exists()  # the lock lives beside the output, never inside it
    assert not lock_path(target).exists()  # and goes with its release


# ----------------------------------------------------------------------------- bad values


def test_parser_errors_put_the_reason_first(tmp_path, capsys):
    code, err = run_cli(capsys, ["eval", "--checkpoint", str(tmp_path / "x.pt"), "--data-dir", str(tmp_path),
                                 "--chunk-rows", "many"])
    assert code == 2 and "chunk-rows" in err[0] and err[0].startswith("xcent eval: error:"), err
    assert len(err) <= 2


@pytest.mark.parametrize("content", [b"\x00\x01\xff\xfe binary", None])
def test_binary_or_directory_config_file_is_refused(tmp_path, capsys, content):
    config = tmp_path / "cfg.yaml"
    if content is None:
        config.mkdir()
    else:
        config.write_bytes(content)
    for command in ("train", "synth"):
        out_flag = "--data-dir" if command == "train" else "--out"
        code, err = run_cli(capsys, [command, "--config", str(config), out_flag, str(tmp_path / "o")])
        assert code == 2 and len(err) == 1 and f"--config {config}" in err[0], err
    assert not (tmp_path / "o").exists()


def test_features_without_columns_are_refused(tmp_path, capsys):
    data = tmp_path / "d"
    for split, n in (("train", 40), ("val", 10)):
        write_split(data / split, np.zeros((n, 0), dtype=np.float32), np.arange(n) % 4)
    code, err = run_cli(capsys, ["train", "--data-dir", str(data), "--out-dir", str(tmp_path / "o"), "--epochs", "1"])
    assert code == 2 and len(err) == 1 and "no columns" in err[0] and "features" in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["latin1", "directory"])
def test_bad_classes_txt_is_refused(tmp_path, capsys, kind):
    data = small_data(tmp_path / "d")
    if kind == "directory":
        (data / "classes.txt").mkdir()
    else:
        (data / "classes.txt").write_bytes("caf\xe9\n".encode("latin-1") * 5)
    code, err = run_cli(capsys, ["train", "--data-dir", str(data), "--out-dir", str(tmp_path / "o"), "--epochs", "1"])
    assert code == 2 and len(err) == 1 and "classes.txt" in err[0], err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- divergence rule


def test_divergence_rule_bounds():
    assert divergence_bound(2000) == pytest.approx(DIVERGENCE_FACTOR * math.log(2000))
    assert divergence_bound(2) == DIVERGENCE_FACTOR  # max(log C, 1)
    assert check_divergence({"train_loss": math.log(2000), "val_loss": 1e9}, 2000) is None  # val not judged
    assert check_divergence({"train_loss": 9.9 * math.log(2000)}, 2000) is None
    why = check_divergence({"train_loss": 1.7e4}, 2000)
    assert why is not None and "train CE 1.7e+04" in why
    assert check_divergence({"train_loss": float("nan")}, 2000) is not None
    assert check_divergence({"train_loss": None}, 2000) is None


# ----------------------------------------------------------------------------- run-directory helpers


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "", "a\\b"])
def test_run_names_outside_out_dir_are_refused(name):
    with pytest.raises(UsageError, match="--name"):
        check_run_name(name)
    check_run_name("sox_lr2.0")


def test_records_tolerate_a_torn_line_and_later_epochs(tmp_path):
    log = tmp_path / "eval.jsonl"
    log.write_text("".join(json.dumps({"epoch": e, "val_loss": 1.0}) + "\n" for e in range(4)) + '{"epoch": 4, "va')
    records, warnings = read_records(log, upto_epoch=2)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert len(warnings) == 2 and "torn" in warnings[0] and "epochs 3" in warnings[1]
    log.write_text('{"epoch": 0}\n{"ep\n{"epoch": 2}\n')
    with pytest.raises(UsageError, match="line 2"):
        read_records(log)  # damage before the last line is not a crash artefact


def test_replacement_keeps_the_old_run_until_committed(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("".join(f"{k}: 1\n" for k in RUN_CONFIG_KEYS))  # a run's (not_a_run)
    (run / "eval_run.jsonl").write_text("old\n")
    rep = Replacement(run)
    rep.begin()
    assert not run.exists() and (replaced_path(run) / "eval_run.jsonl").read_text() == "old\n"
    run.mkdir()
    (run / "partial").write_text("new")
    rep.rollback()
    assert (run / "eval_run.jsonl").read_text() == "old\n" and not (run / "partial").exists()
    rep = Replacement(run)
    rep.begin()
    run.mkdir()
    rep.commit()
    assert not replaced_path(run).exists() and run.exists()
    # a kill in between: recovery restores or finishes depending on the new run's checkpoint
    (run / "config.yaml").write_text("".join(f"{k}: 1\n" for k in RUN_CONFIG_KEYS))
    (run / "eval_run.jsonl").write_text("old\n")
    Replacement(run).begin()
    run.mkdir()
    assert "restored" in recover_replaced(run, lambda p: False)
    assert (run / "eval_run.jsonl").read_text() == "old\n"
    Replacement(run).begin()
    run.mkdir()
    assert "removed" in recover_replaced(run, lambda p: True)
    assert not replaced_path(run).exists() and not (run / "eval_run.jsonl").exists()
    assert recover_replaced(run, lambda p: True) is None


def test_changed_settings_lists_each_difference():
    saved = {"lr": 2.0, "seed": 1, "batch_size": 32, "epochs": 5, "warmup_epochs": 0, "gamma": 0.1,
             "softplus_rho": 1.0, "umax_delta": None}
    assert changed_settings(saved, dict(saved, epochs=9), ("lr", "gamma")) == []  # extending is allowed
    assert changed_settings(saved, dict(saved, softplus_rho=2.0), ("lr", "gamma")) == []  # not this algorithm's
    now = dict(saved, lr=3.0, seed=2, epochs=4, softplus_rho=2.0)
    assert changed_settings(saved, now, ("lr", "gamma", "softplus_rho")) == [
        ("seed", 1, 2), ("epochs", 5, 4), ("lr", 2.0, 3.0), ("softplus_rho", 1.0, 2.0)]


# ----------------------------------------------------------------------------- the trainer


def train_args(data, out, name, *extra):
    return ["train", "--data-dir", str(data), "--out-dir", str(out), "--name", name, "--batch-size", "16",
            *map(str, extra)]


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flags,needle", [
    (["--train-eval-size", "-1"], "--train-eval-size -1"),
    (["--eval-chunk-rows", "0"], "--eval-chunk-rows 0"),
    (["--name", "../x"], "--name '../x'"),
])
def test_bad_train_values_are_refused(tmp_path, capsys, flags, needle):
    data = small_data(tmp_path / "d")
    code, err = run_cli(capsys, ["train", "--data-dir", str(data), "--out-dir", str(tmp_path / "o"), *flags])
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists() and not (tmp_path / "x").exists()


def test_failed_overwrite_keeps_the_old_run(tmp_path, capsys):
    data = small_data(tmp_path / "d")
    out = tmp_path / "o"
    assert cli.main(train_args(data, out, "r", "--epochs", 2)) == 0
    before = snapshot(out / "r")
    # refused by validation: nothing moves
    code, _ = run_cli(capsys, train_args(data, out, "r", "--overwrite", "--eval-chunk-rows", 0))
    assert code == 2 and snapshot(out / "r") == before
    # fails after the old run was moved aside (diverges in epoch 1, before any checkpoint): restored
    code, err = run_cli(capsys, train_args(data, out, "r", "--overwrite", "--epochs", 2, "--lr", 1e6,
                                           "--algorithm", "sox"))
    assert code == 3 and "diverged" in err[-1]
    assert snapshot(out / "r") == before and not replaced_path(out / "r").exists()
    # succeeds: the old run is gone once the new one has its first checkpoint
    assert cli.main(train_args(data, out, "r", "--overwrite", "--epochs", 1, "--seed", 7)) == 0
    assert not replaced_path(out / "r").exists()
    assert sorted(p.name for p in (out / "r" / "checkpoints").iterdir()) == ["best.pt", "epoch_1.pt"]  # --keep-best


def test_second_trainer_on_a_run_exits_2_naming_the_holder(tmp_path, capsys):
    data = small_data(tmp_path / "d")
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / "r")], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=SRC))
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = run_cli(capsys, train_args(data, out, "r", "--epochs", 1))
        assert code == 2 and len(err) == 1 and f"in use by process {holder.pid}" in err[0], err
        assert not (out / "r").exists()
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(train_args(data, out, "r", "--epochs", 1)) == 0


def test_resume_with_changed_settings_is_refused_unless_allowed(tmp_path, capsys):
    data = small_data(tmp_path / "d")
    out = tmp_path / "o"
    assert cli.main(train_args(data, out, "r", "--epochs", 2, "--lr", 2.0)) == 0
    before = snapshot(out / "r")
    code, err = run_cli(capsys, train_args(data, out, "r", "--epochs", 3, "--lr", 3.0, "--seed", 5,
                                           "--resume", "latest"))
    assert code == 2 and len(err) == 1, err
    assert "--lr 2.0 (run) vs 3.0 (now)" in err[0] and "--seed 42 (run) vs 5 (now)" in err[0]
    assert "--allow-changed-settings" in err[0] and "--epochs" not in err[0].split("differ")[1]
    assert snapshot(out / "r") == before
    assert cli.main(train_args(data, out, "r", "--epochs", 3, "--lr", 3.0, "--resume", "latest",
                               "--allow-changed-settings")) == 0
    assert cli.main(train_args(data, out, "r", "--epochs", 4, "--lr", 3.0, "--resume", "latest")) == 0  # longer
    records = read_records(out / "r" / "eval_r.jsonl")[0]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3, 4]


def test_resume_drops_a_torn_line_and_epochs_past_the_checkpoint(tmp_path, capsys):
    data = small_data(tmp_path / "d")
    out = tmp_path / "o"
    assert cli.main(train_args(data, out, "r", "--epochs", 3)) == 0
    (out / "r" / "checkpoints" / "epoch_3.pt").unlink()
    with open(out / "r" / "eval_r.jsonl", "a") as f:
        f.write('{"epoch": 4, "val_lo')  # a crash mid-line (before appends were all-or-nothing)
    capsys.readouterr()
    assert cli.main(train_args(data, out, "r", "--epochs", 3, "--resume", "latest")) == 0
    err = capsys.readouterr().err
    assert "torn last line" in err and "past the resumed checkpoint" in err
    lines = (out / "r" / "eval_r.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2, 3]


def test_train_on_a_full_disk_exits_2_and_resumes_with_nothing_lost(small_fs, tmp_path, capsys):
    data = small_data(tmp_path / "d", n=120, dim=16, classes=40)
    out = small_fs / "o"
    assert cli.main(train_args(data, out, "r", "--epochs", 1)) == 0
    filler = fill(small_fs)
    code, err = run_cli(capsys, train_args(data, out, "r", "--epochs", 3, "--resume", "latest"))
    assert code == 2 and len(err) == 1 and "no space left on device while writing" in err[0], err
    assert str(out / "r") in err[0]
    filler.unlink()
    assert cli.main(train_args(data, out, "r", "--epochs", 3, "--resume", "latest")) == 0
    assert [r["epoch"] for r in read_records(out / "r" / "eval_r.jsonl")[0]] == [0, 1, 2, 3]
    assert cli.main(train_args(data, tmp_path / "ref", "r", "--epochs", 3)) == 0  # the same run without the fault
    a = torch.load(out / "r" / "checkpoints" / "epoch_3.pt", weights_only=True)["weight"]
    b = torch.load(tmp_path / "ref" / "r" / "checkpoints" / "epoch_3.pt", weights_only=True)["weight"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("algorithm", ["sox", "bsgd", "softplus", "umax"])
def test_finite_blow_up_is_divergence(tiny_data, tmp_path, capsys, algorithm):
    """At --lr 1e6 these stayed finite and exited 0 with val CE ~1e4..1e6 (log C = 4.1)."""
    code, err = run_cli(capsys, train_args(tiny_data, tmp_path, "r", "--algorithm", algorithm, "--lr", 1e6,
                                           "--epochs", 2, "--batch-size", 32))
    assert code == 3 and "diverged" in err[-1] and "train CE" in err[-1], err
    for path in (tmp_path / "r" / "checkpoints").glob("epoch_*.pt"):  # any "last good" one passes the rule
        epoch = int(path.stem.split("_")[1])
        record = next(r for r in read_records(tmp_path / "r" / "eval_r.jsonl")[0] if r["epoch"] == epoch)
        assert check_divergence(record, 60) is None


@pytest.mark.parametrize("algorithm", ["scent", "sox", "asgd", "softplus", "umax", "bsgd"])
def test_healthy_runs_never_trip_the_divergence_rule(tiny_data, tmp_path, algorithm):
    assert cli.main(train_args(tiny_data, tmp_path, "r", "--algorithm", algorithm, "--epochs", 4,
                               "--batch-size", 32)) == 0
    records = read_records(tmp_path / "r" / "eval_r.jsonl")[0]
    assert len(records) == 5
    # a wide margin, not a near miss: the train CE never rises above the untrained model's log C
    assert max(r["train_loss"] for r in records) <= math.log(60) * 1.05 < divergence_bound(60) / 5


@pytest.mark.parametrize("command", ["split", "compare"])
def test_other_outputs_are_locked_too(tmp_path, capsys, command):
    """xcent split/compare hold their output's lock while writing: a second writer exits 2. (xcent extract
    takes the same lock, `xcent.extract.run.extract_features`; its test needs the shard fixtures.)"""
    out = tmp_path / "out"
    if command == "split":
        src = tmp_path / "extracted"
        src.mkdir()
        np.save(src / "features.npy", np.zeros((30, 4), dtype=np.float32))
        np.save(src / "labels.npy", np.arange(30) % 3)
        np.save(src / "is_cached.npy", np.ones(30, dtype=bool))
        args = ["split", "--in", str(src), "--out", str(out)]
    else:
        args = ["compare", "--data-dir", str(small_data(tmp_path / "d")), "--out-dir", str(out),
                "--algorithms", "scent", "--epochs", "1"]
    with exclusive_lock(out, "x"):
        code, err = run_cli(capsys, args)
    assert code == 2 and len(err) == 1 and f"{out} is in use by process {os.getpid()}" in err[0], err


def test_export_and_predict_on_a_full_disk_exit_2_naming_the_path(small_fs, tmp_path, capsys):
    data = small_data(tmp_path / "d", n=120, dim=16, classes=40)
    assert cli.main(train_args(data, tmp_path / "o", "r", "--epochs", 1)) == 0
    ckpt = tmp_path / "o" / "r" / "checkpoints" / "epoch_1.pt"
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((20_000, 16)).astype(np.float32))
    filler = fill(small_fs)
    for args, out in ((["export", "--checkpoint", str(ckpt)], small_fs / "w.safetensors"),
                      (["predict", "--checkpoint", str(ckpt), "--features", str(tmp_path / "x.npy")],
                       small_fs / "p.jsonl")):
        code, err = run_cli(capsys, [*args, "--out", str(out)])
        assert code == 2 and len(err) == 1 and "no space left on device while writing" in err[0], err
        assert str(out) in err[0] and not out.exists()
    filler.unlink()
    assert cli.main(["export", "--checkpoint", str(ckpt), "--out", str(small_fs / "w.safetensors")]) == 0
