"""`xcent split`: deterministic, disjoint, only cached rows, the layout `xcent train`
reads, honest class-coverage numbers; `--stratify` keeps classes with >= 3 rows in train.

Works on a synthetic extraction directory (no images, no backbone).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from xcent.cli import main as xcent_main
from xcent.extract.split import split_rows

DATA_SIZE, FEATURE_DIM, NUM_CLASSES = 400, 4, 40


def make_extracted(directory, fmt: str = "npy", seed: int = 0):
    """An extraction output with a long tail of class sizes and some rows never cached."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    weights = 1.0 / np.arange(1, NUM_CLASSES + 1) ** 1.2
    labels = rng.choice(NUM_CLASSES, size=DATA_SIZE, p=weights / weights.sum()).astype(np.int64)
    features = rng.standard_normal((DATA_SIZE, FEATURE_DIM)).astype(np.float32)
    features[:, 0] = np.arange(DATA_SIZE)  # each feature row names its global row
    is_cached = rng.random(DATA_SIZE) < 0.9
    features[~is_cached] = 0
    arrays = {"features": features, "labels": labels, "is_cached": is_cached}
    for name, array in arrays.items():
        if fmt == "npy":
            np.save(directory / f"{name}.npy", array)
        else:
            torch.save(torch.from_numpy(array), directory / f"{name}.pt")
    (directory / "classes.txt").write_text("".join(f"class {i}\n" for i in range(NUM_CLASSES)))
    return arrays


def run_split(in_dir, out_dir, *extra) -> int:
    return xcent_main(["split", "--in", str(in_dir), "--out", str(out_dir), *extra])


def read_split(out_dir, name, fmt="npy"):
    if fmt == "npy":
        return np.load(out_dir / name / "features.npy"), np.load(out_dir / name / "labels.npy")
    return (
        torch.load(out_dir / name / "features.pt", weights_only=True).numpy(),
        torch.load(out_dir / name / "labels.pt", weights_only=True).numpy(),
    )


@pytest.fixture
def extracted(tmp_path):
    arrays = make_extracted(tmp_path / "extracted")
    return tmp_path / "extracted", arrays


def test_split_layout_rows_and_determinism(extracted, tmp_path, capsys):
    in_dir, arrays = extracted
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    assert run_split(in_dir, out_a) == 0
    report = capsys.readouterr().out
    assert run_split(in_dir, out_b) == 0
    cached = np.flatnonzero(arrays["is_cached"])
    num_cached = len(cached)
    seen = []
    for name in ("train", "val", "test"):
        features, labels = read_split(out_a, name)
        assert features.dtype == np.float32 and labels.dtype == np.int64 and features.shape[1] == FEATURE_DIM
        rows = features[:, 0].astype(np.int64)  # which global row each split row came from
        np.testing.assert_array_equal(rows, np.load(out_a / name / "rows.npy"))
        np.testing.assert_array_equal(features, arrays["features"][rows])
        np.testing.assert_array_equal(labels, arrays["labels"][rows])
        for other in ("features.npy", "labels.npy"):  # same seed, same bytes
            assert (out_a / name / other).read_bytes() == (out_b / name / other).read_bytes()
        seen.append(rows)
    assert [len(r) for r in seen[1:]] == [round(0.05 * num_cached)] * 2
    everything = np.concatenate(seen)
    assert len(np.unique(everything)) == len(everything) == num_cached  # disjoint, complete
    assert set(everything) == set(cached)  # only cached rows
    assert (out_a / "classes.txt").read_text() == (in_dir / "classes.txt").read_text()
    assert f"{num_cached - 2 * round(0.05 * num_cached)} train" in report
    assert f"{DATA_SIZE - num_cached} rows not cached" in report


def test_coverage_report_matches_brute_force(extracted, tmp_path, capsys):
    in_dir, _ = extracted
    out_dir = tmp_path / "out"
    assert run_split(in_dir, out_dir, "--val-fraction", "0.2", "--test-fraction", "0.2", "--seed", "3") == 0
    out = capsys.readouterr().out
    train = set(read_split(out_dir, "train")[1].tolist())
    val = set(read_split(out_dir, "val")[1].tolist())
    test = set(read_split(out_dir, "test")[1].tolist())
    report = json.loads((out_dir / "split.json").read_text())
    assert report["num_classes"] == NUM_CLASSES
    assert report["classes_in_train"] == len(train)
    assert report["classes_with_rows"] == len(train | val | test)
    assert report["val_classes_not_in_train"] == len(val - train)
    assert report["test_classes_not_in_train"] == len(test - train)
    assert f"{len(val - train)} of the val classes, {len(test - train)} of the test classes" in out


def test_row_counts_and_seed(extracted, tmp_path):
    in_dir, _ = extracted
    assert run_split(in_dir, tmp_path / "counts", "--val-fraction", "7", "--test-fraction", "0") == 0
    assert len(read_split(tmp_path / "counts", "val")[1]) == 7
    assert len(read_split(tmp_path / "counts", "test")[1]) == 0
    assert run_split(in_dir, tmp_path / "other_seed", "--val-fraction", "7", "--seed", "43") == 0
    assert not np.array_equal(np.load(tmp_path / "counts/val/rows.npy"), np.load(tmp_path / "other_seed/val/rows.npy"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stratify_keeps_classes_with_three_rows_in_train(seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(60), rng.integers(1, 12, size=60))  # many small classes
    rows = np.arange(len(labels)) * 3  # global rows need not be contiguous
    num_val = num_test = len(labels) // 4
    parts = split_rows(rows, labels, num_val, num_test, seed, stratify=True)
    assert len(parts["val"]) == num_val and len(parts["test"]) == num_test
    assert sorted(np.concatenate(list(parts.values()))) == sorted(rows)
    label_of = dict(zip(rows, labels))
    train_classes = {label_of[r] for r in parts["train"]}
    sizes = np.bincount(labels)
    assert {c for c in range(60) if sizes[c] >= 3} <= train_classes
    # systematic sampling: each class gives the held-out splits about its share
    held = np.bincount([label_of[r] for r in np.concatenate([parts["val"], parts["test"]])], minlength=60)
    pool = sizes - (sizes >= 3)
    share = pool * (num_val + num_test) / pool.sum()
    assert np.all(np.abs(held - share) <= 1.0 + 1e-9)


def test_stratify_through_cli(extracted, tmp_path):
    in_dir, arrays = extracted
    out_dir = tmp_path / "strat"
    assert run_split(in_dir, out_dir, "--stratify", "--val-fraction", "0.3", "--test-fraction", "0.3") == 0
    cached_labels = arrays["labels"][arrays["is_cached"]]
    needed = {c for c in range(NUM_CLASSES) if (cached_labels == c).sum() >= 3}
    assert needed <= set(read_split(out_dir, "train")[1].tolist())


def test_pt_in_and_out(tmp_path):
    arrays = make_extracted(tmp_path / "seed_pt", fmt="pt")
    assert run_split(tmp_path / "seed_pt", tmp_path / "out", "--format", "pt") == 0
    features, labels = read_split(tmp_path / "out", "train", fmt="pt")
    rows = features[:, 0].astype(np.int64)
    np.testing.assert_array_equal(labels, arrays["labels"][rows])
    assert arrays["is_cached"][rows].all()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--val-fraction", "0.6", "--test-fraction", "0.5"], "leave no training row"),
        (["--val-fraction", "2.5"], "--val-fraction"),
        (["--test-fraction", "-0.1"], "--test-fraction"),
    ],
)
def test_bad_fractions_exit_2(extracted, tmp_path, capsys, flags, message):
    in_dir, _ = extracted
    assert run_split(in_dir, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xcent split: error:") and message in err[0]
    assert not (tmp_path / "out").exists()


def test_missing_input_exit_2(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert run_split(missing, tmp_path / "out") == 2
    assert str(missing) in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_split(tmp_path / "empty", tmp_path / "out") == 2
    assert os.path.join(str(tmp_path / "empty"), "features.npy") in capsys.readouterr().err


# ---------------------------------------------------------------- all or nothing
def tree_digest(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


KILL_MID_SPLIT = """
import os, signal, sys
from xcent.extract import split
from xcent.cli.extract import split_main

original = split.write_split
def write_then_die(out_dir, name, *args, **kwargs):
    original(out_dir, name, *args, **kwargs)
    if name == "train":  # train of the new split is written, val/test are not
        os.kill(os.getpid(), signal.SIGKILL)
split.write_split = write_then_die
sys.exit(split_main(sys.argv[1:]))
"""


def test_split_killed_mid_rewrite_leaves_the_old_split(extracted, tmp_path):
    """A kill while rewriting with another seed leaves the previous split whole (never
    train from the new split beside val/test from the old); the next run cleans up."""
    import subprocess
    import sys

    in_dir, _ = extracted
    out_dir = tmp_path / "out"
    assert run_split(in_dir, out_dir, "--seed", "1") == 0
    before = tree_digest(out_dir)
    args = ["--in", str(in_dir), "--out", str(out_dir), "--seed", "2"]
    proc = subprocess.run([sys.executable, "-c", KILL_MID_SPLIT, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert tree_digest(out_dir) == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert leftovers  # the killed run's temporary directory
    assert run_split(in_dir, out_dir, "--seed", "2") == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert tree_digest(out_dir) != before
    assert json.loads((out_dir / "split.json").read_text())["seed"] == 2


def test_split_failure_keeps_old_split_and_format_switch_leaves_one_format(extracted, tmp_path, monkeypatch):
    from xcent.extract import split

    in_dir, _ = extracted
    out_dir = tmp_path / "out"
    assert run_split(in_dir, out_dir) == 0
    before = tree_digest(out_dir)
    original = split.write_split

    def fail_on_test(out, name, *args, **kwargs):
        if name == "test":
            raise OSError(28, "No space left on device")
        return original(out, name, *args, **kwargs)

    monkeypatch.setattr(split, "write_split", fail_on_test)
    with pytest.raises(OSError):
        split.make_split(str(in_dir), str(out_dir), seed=5, fmt="pt")
    assert tree_digest(out_dir) == before and sorted(p.name for p in tmp_path.iterdir()) == ["extracted", "out"]
    monkeypatch.setattr(split, "write_split", original)
    assert run_split(in_dir, out_dir, "--format", "pt") == 0
    for name in ("train", "val", "test"):
        assert sorted(p.name for p in (out_dir / name).iterdir()) == ["features.pt", "labels.pt", "rows.npy"]


def test_out_with_foreign_files_is_refused(extracted, tmp_path, capsys):
    in_dir, _ = extracted
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")
    assert run_split(in_dir, out_dir) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "notes.txt" in err[0]
    assert [p.name for p in out_dir.iterdir()] == ["notes.txt"]


def test_float_labels_must_be_whole(tmp_path, capsys):
    arrays = make_extracted(tmp_path / "whole", fmt="pt")
    torch.save(torch.from_numpy(arrays["labels"].astype(np.float32)), tmp_path / "whole" / "labels.pt")
    assert run_split(tmp_path / "whole", tmp_path / "out") == 0  # whole-number floats are fine
    features, labels = read_split(tmp_path / "out", "train")
    np.testing.assert_array_equal(labels, arrays["labels"][features[:, 0].astype(np.int64)])
    assert labels.dtype == np.int64

    fractional = arrays["labels"].astype(np.float64)
    row = int(np.flatnonzero(arrays["is_cached"])[3])
    fractional[row] = 18.91
    torch.save(torch.from_numpy(fractional), tmp_path / "whole" / "labels.pt")
    assert run_split(tmp_path / "whole", tmp_path / "out2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "18.91" in err[0] and "whole number" in err[0]
    assert not (tmp_path / "out2").exists()


# --------------------------------------------------- train refuses overlapping splits
def test_train_refuses_overlapping_splits(extracted, tmp_path, capsys):
    """A mixed split directory (val rows also in train, as an interrupted rewrite by an
    older version left it) is refused by xcent train, naming the overlap count."""
    from xcent.data import count_shared_rows, load_dataset

    in_dir, arrays = extracted
    out_dir = tmp_path / "out"
    assert run_split(in_dir, out_dir, "--val-fraction", "0.2") == 0
    load_dataset(out_dir)  # a clean split loads
    # val from another seed: most of its rows are in this train split
    assert run_split(in_dir, tmp_path / "other", "--val-fraction", "0.2", "--seed", "9") == 0
    for name in ("features.npy", "labels.npy", "rows.npy"):
        (out_dir / "val" / name).write_bytes((tmp_path / "other" / "val" / name).read_bytes())
    shared = len(set(np.load(out_dir / "train/rows.npy")) & set(np.load(out_dir / "val/rows.npy")))
    assert shared > 0
    assert count_shared_rows(np.load(out_dir / "train/rows.npy"), np.load(out_dir / "val/rows.npy")) == shared
    capsys.readouterr()
    code = xcent_main(
        ["train", "--data-dir", str(out_dir), "--out-dir", str(tmp_path / "runs"), "--name", "r", "--epochs", "1"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"{shared} of its" in err[0] and "overlap" in err[0]
    assert not (tmp_path / "runs" / "r").exists()


@pytest.mark.parametrize("seed", range(5))
def test_count_shared_rows_brute_force(seed):
    from xcent.data import count_shared_rows

    rng = np.random.default_rng(seed)
    a, b = rng.choice(1000, 300, replace=False), rng.choice(1000, 200, replace=False)
    assert count_shared_rows(a, b) == len(set(a.tolist()) & set(b.tolist()))
    assert count_shared_rows(a, np.zeros(0, dtype=np.int64)) == 0
