"""Bad input: one line naming the flag or file, exit status 2, existing outputs untouched."""

import hashlib

import numpy as np
import pytest
import torch

from xcent import cli
from xcent.data import write_split


def make_data(root, n_train=60, n_val=20, dim=6, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_val)):
        write_split(root / split, rng.standard_normal((n, dim)).astype(np.float32), rng.integers(0, classes, n))
    return root


def snapshot(directory):
    return {p.relative_to(directory): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture()
def existing_run(tmp_path):
    data = make_data(tmp_path / "data")
    args = ["train", "--data-dir", str(data), "--out-dir", str(tmp_path / "out"), "--name", "run",
            "--epochs", "2", "--batch-size", "16"]
    assert cli.main(args) == 0
    return data, tmp_path / "out", args


def run_bad(capsys, args):
    code = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def corrupt(data, what):
    rng = np.random.default_rng(9)
    if what == "missing_dir":
        return data.parent / "nope", "nope"
    if what == "missing_split":
        for f in (data / "val").iterdir():
            f.unlink()
        (data / "val").rmdir()
        return data, "val"
    if what == "row_mismatch":
        np.save(data / "train" / "labels.npy", np.zeros(59, dtype=np.int64))
        return data, "59 labels"
    if what == "label_out_of_range":
        np.save(data / "val" / "labels.npy", np.full(20, 7, dtype=np.int64))
        return data, "out of range"
    if what == "negative_label":
        y = np.zeros(60, dtype=np.int64)
        y[3] = -1
        np.save(data / "train" / "labels.npy", y)
        return data, "negative label"
    if what == "float_labels":
        np.save(data / "train" / "labels.npy", np.zeros(60, dtype=np.float32))
        return data, "integers"
    if what == "nan_features":
        x = rng.standard_normal((60, 6)).astype(np.float32)
        x[17, 2] = np.nan
        np.save(data / "train" / "features.npy", x)
        return data, "row 17"
    if what == "inf_features_pt":
        (data / "val" / "features.npy").unlink()
        x = torch.randn(20, 6)
        x[4, 0] = float("inf")
        torch.save(x, data / "val" / "features.pt")
        return data, "row 4"
    if what == "dim_mismatch":
        np.save(data / "val" / "features.npy", rng.standard_normal((20, 7)).astype(np.float32))
        return data, "feature dimension"
    if what == "empty_split":
        np.save(data / "test" / "features.npy", np.zeros((0, 6), dtype=np.float32))
        np.save(data / "test" / "labels.npy", np.zeros(0, dtype=np.int64))
        return data, "empty"
    if what == "corrupt_features":
        (data / "train" / "features.npy").write_bytes(b"garbage")
        return data, "cannot be read"
    raise AssertionError(what)


DATA_CASES = ["missing_dir", "missing_split", "row_mismatch", "label_out_of_range", "negative_label",
              "float_labels", "nan_features", "inf_features_pt", "dim_mismatch", "empty_split", "corrupt_features"]


@pytest.mark.parametrize("what", DATA_CASES)
def test_bad_data(tmp_path, capsys, what):
    data, needle = corrupt(make_data(tmp_path / "data"), what)
    extra = ["--num-classes", "5"] if what == "label_out_of_range" else []
    code, err = run_bad(capsys, ["train", "--data-dir", str(data), "--out-dir", str(tmp_path / "out"),
                                 "--epochs", "1", *extra])
    assert code == 2
    assert len(err) == 1 and err[0].startswith("xcent train: error:")
    assert needle in err[0]
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("flags,needle", [
    (["--algorithm", "adam"], "--algorithm adam"),
    (["--batch-size", "1"], "--batch-size 1"),
    (["--epochs", "0"], "--epochs 0"),
    (["--lr", "-1"], "--lr"),
    (["--feature-dim", "9"], "--feature-dim 9"),
    (["--data-size", "3"], "--data-size 3"),
    (["--warmup-epochs", "2"], "--warmup-epochs 2"),
])
def test_bad_flags(tmp_path, capsys, flags, needle):
    data = make_data(tmp_path / "data")
    code, err = run_bad(capsys, ["train", "--data-dir", str(data), "--out-dir", str(tmp_path / "out"),
                                 "--epochs", "2", *flags])
    assert code == 2 and len(err) == 1 and needle in err[0]
    assert not (tmp_path / "out").exists()


def test_existing_run_is_refused_and_untouched(existing_run, capsys):
    data, out, args = existing_run
    before = snapshot(out)
    code, err = run_bad(capsys, args)
    assert code == 2 and len(err) == 1 and "already holds a run" in err[0] and "--resume" in err[0]
    assert snapshot(out) == before
    assert cli.main(args + ["--overwrite", "true"]) == 0  # the explicit way


def test_resume_missing_corrupt_incompatible(existing_run, capsys, tmp_path):
    data, out, args = existing_run
    before = snapshot(out)
    ckpt = out / "run" / "checkpoints" / "epoch_1.pt"
    bad_file = tmp_path / "corrupt.pt"
    bad_file.write_bytes(b"\x00not a checkpoint")
    other_data = make_data(tmp_path / "data8", dim=8)
    cases = [
        (["--resume", str(tmp_path / "missing.pt")], "no such file"),
        (["--resume", str(bad_file)], "corrupt"),
        (["--resume", str(ckpt), "--algorithm", "sox"], "algorithm"),
        (["--resume", str(ckpt), "--data-dir", str(other_data)], "feature_dim"),
        (["--resume", str(ckpt), "--num-classes", "9"], "num_classes"),
    ]
    for flags, needle in cases:
        code, err = run_bad(capsys, args + ["--epochs", "3"] + flags)
        assert code == 2, flags
        assert len(err) == 1 and needle in err[0], (flags, err)
        assert snapshot(out) == before


def test_resume_latest_continues(existing_run, capsys):
    data, out, args = existing_run
    assert cli.main(args[:-4] + ["--epochs", "3", "--batch-size", "16", "--resume", "latest"]) == 0
    assert (out / "run" / "checkpoints" / "epoch_3.pt").exists()


def test_unknown_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
