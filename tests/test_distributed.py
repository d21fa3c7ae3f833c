"""Class-sharded training under torchrun (gloo, CPU) equals single-process training."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import gamma, read_jsonl, sgd_drift

from xcent import modelio as ckpt_io
from xcent.config import config_from_argv
from xcent.data import load_dataset, synthesize
from xcent.train import TIMING_KEYS, train

COMMON = ["--epochs", "2", "--batch-size", "48", "--train-eval-size", "200"]


@pytest.fixture(scope="module")
def dist_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    # 45 classes: an odd count, so the two shards differ in size
    synthesize(root / "data", num_classes=45, feature_dim=8, num_samples=700, seed=5, noise=0.6)
    return root


def torchrun(nproc, args, env_extra=None, timeout=180, program=("-m", "xcent", "train")):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(29500 + os.getpid() % 1000), *program, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def single(root, name, *extra):
    argv = ["--data-dir", str(root / "data"), "--out-dir", str(root / "out"), "--name", name, *COMMON, *extra]
    return train(config_from_argv(argv), echo=lambda *_: None)


def metrics(path):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_jsonl(path)]


def drift_bound(root, epochs=2, batch_size=48, momentum=0.9):
    """:func:`conftest.sgd_drift` of these runs (one process against two: GEMMs of other
    shapes), one step more for the class-mean start; momentum 0.9 covers the
    ``--momentum`` runs and bounds the others."""
    data = load_dataset(root / "data")
    steps = epochs * -(-data.train.num_samples // batch_size) + 1
    return sgd_drift(steps, batch_size + data.feature_dim, momentum)


def assert_close_within(actual, expected, bound, **kwargs):
    """``|actual - expected| <= bound * max|expected|`` elementwise (the error of a sum
    is relative to its terms' magnitudes, not to the value: a small entry gets the
    same absolute allowance as a large one)."""
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=bound * scale, **kwargs)


def near_ties(features, labels, weight, band):
    """Rows (features float64) with another class scoring within ``band`` of the true one."""
    scores = features @ weight.double().T
    gaps = (scores - scores.gather(1, labels[:, None])).abs().scatter_(1, labels[:, None], float("inf"))
    return int((gaps.min(dim=1).values <= band).sum())


def assert_same_run(a_dir, b_dir, epoch=2, root=None):
    a = ckpt_io.load(ckpt_io.latest(a_dir / "checkpoints"))
    b = ckpt_io.load(ckpt_io.latest(b_dir / "checkpoints"))
    assert a["epoch"] == b["epoch"] == epoch
    bound = drift_bound(root or a_dir.parent.parent, epochs=epoch)
    assert_close_within(a["weight"], b["weight"], bound)
    assert torch.equal(a["nu_set"], b["nu_set"])
    assert_close_within(a["nu"], b["nu"], bound, equal_nan=True)
    if "momentum_buffer" in a:
        assert_close_within(b["momentum_buffer"], a["momentum_buffer"], bound)
    return a, b


# scent and bsgd from the default class-mean start (the init is class-sharded too); sox from
# the random start: from the class-mean start on this 8-d data its tuned lr diverges in
# epoch 2, where its scheduled dual rate is 1e-5 (docs/own-data.md)
@pytest.mark.parametrize("algorithm, init", [("scent", "class-means"), ("sox", "random"), ("bsgd", "class-means")])
def test_two_processes_equal_one(dist_data, algorithm, init):
    single(dist_data, f"p1_{algorithm}", "--algorithm", algorithm, "--init", init)
    args = ["--data-dir", str(dist_data / "data"), "--out-dir", str(dist_data / "out"), "--name",
            f"p2_{algorithm}", "--algorithm", algorithm, "--init", init, *COMMON]
    proc = torchrun(2, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dist_data / "out"
    # sharded checkpoints: one directory per epoch, one file per rank
    shard_dir = out / f"p2_{algorithm}" / "checkpoints" / "epoch_2"
    assert sorted(p.name for p in shard_dir.iterdir()) == ["manifest.pt", "shard_00000.pt", "shard_00001.pt"]
    shard0 = torch.load(shard_dir / "shard_00000.pt", weights_only=True)["weight"]
    assert shard0.shape == (23, 8)  # no rank holds the full weight
    a, b = assert_same_run(out / f"p1_{algorithm}", out / f"p2_{algorithm}")
    m1, m2 = metrics(out / f"p1_{algorithm}" / f"eval_p1_{algorithm}.jsonl"), \
        metrics(out / f"p2_{algorithm}" / f"eval_p2_{algorithm}.jsonl")
    assert [r["epoch"] for r in m2] == [0, 1, 2]
    # a CE is 2-Lipschitz in the logits (lse - target), and a logit w_c . x moves by at
    # most |x| |dw_c| + twice the rounding of the dot product: the losses follow from
    # the weights' bound. An accuracy is a count: it can move only by the rows whose
    # true class has another within that much of its score (a near tie, which any two
    # GEMM kernels may decide differently); those are counted with the run's weights at
    # each checkpointed epoch (the best_* keys and epoch 0 mix in unsaved weights: their
    # losses are compared, their accuracies through epochs 1 and 2)
    data = load_dataset(dist_data / "data")
    feats = {name: torch.from_numpy(np.array(split.features)).double() for name, split in data.splits.items()}
    x_norm = max(float(f.norm(dim=1).max()) for f in feats.values())
    w_norm = float(a["weight"].norm(dim=1).max())
    dw = drift_bound(dist_data) * float(a["weight"].abs().max()) * data.feature_dim ** 0.5
    loss_tol = 2 * x_norm * (dw + 2 * gamma(data.feature_dim) * w_norm)
    for r1, r2 in zip(m1, m2):
        assert r1.keys() == r2.keys()
        epoch = r1["epoch"]
        weight = ckpt_io.load(out / f"p1_{algorithm}" / "checkpoints" / f"epoch_{epoch}.pt")["weight"] \
            if epoch > 0 else None
        for key in r1:
            if isinstance(r1[key], float) and key.endswith("loss"):
                assert r2[key] == pytest.approx(r1[key], rel=0, abs=loss_tol), key
            elif key.endswith(("_acc", "_top5")) and r1[key] is not None:
                if weight is None or key.startswith("best_"):
                    continue
                split = "train" if key.startswith("train") else "test" if key.startswith("test") else "val"
                rows = len(feats[split]) if split != "train" else 200  # --train-eval-size
                flips = near_ties(feats[split], data.splits[split].labels, weight, loss_tol)
                assert abs(r2[key] - r1[key]) * rows <= flips + 1e-9, (key, epoch, flips)
            else:
                assert r1[key] == r2[key], key
    # only rank 0 wrote the log and the JSONL (one line per epoch, not two)
    assert len(read_jsonl(out / f"p2_{algorithm}" / f"eval_p2_{algorithm}.jsonl")) == 3


def test_resume_across_process_counts(dist_data):
    out = dist_data / "out"
    if not (out / "p2_scent" / "checkpoints" / "epoch_1").exists():
        pytest.skip("needs test_two_processes_equal_one[scent]")
    # 2 -> 1: resume the 2-process run's epoch 1 in one process
    single(dist_data, "r21", "--resume", str(out / "p2_scent" / "checkpoints" / "epoch_1"))
    assert_same_run(out / "p1_scent", out / "r21")
    # 1 -> 2: resume the 1-process run's epoch 1 with two processes
    args = ["--data-dir", str(dist_data / "data"), "--out-dir", str(out), "--name", "r12", *COMMON,
            "--resume", str(out / "p1_scent" / "checkpoints" / "epoch_1.pt")]
    proc = torchrun(2, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(out / "p1_scent", out / "r12")
    # xcent eval reads the sharded checkpoint
    ev = subprocess.run(
        [
            sys.executable,
            "-m",
            "xcent",
            "eval",
            "--checkpoint",
            str(out / "r12" / "checkpoints" / "epoch_2"),
            "--data-dir",
            str(dist_data / "data"),
            "--split",
            "val",
        ],
        capture_output=True,
        text=True,
    )
    assert ev.returncode == 0 and "top1" in ev.stdout


def test_dead_rank_fails_the_job_quickly(dist_data):
    args = ["--data-dir", str(dist_data / "data"), "--out-dir", str(dist_data / "out"), "--name", "dies",
            "--epochs", "3", "--batch-size", "48", "--dist-timeout", "30"]
    start = time.monotonic()
    # rank 1 exits abruptly (status 17) after epoch 1: tests/launch_fail_after_epoch.py
    launcher = str(Path(__file__).with_name("launch_fail_after_epoch.py"))
    proc = torchrun(2, args, timeout=120, program=(launcher, "1", "1", "--"))
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 60
    assert "exitcode" in proc.stderr and "17" in proc.stderr  # torchrun names the failed rank and its code


def test_momentum_two_processes_equal_one_and_resume(dist_data):
    """--momentum / --weight-decay under torchrun: each rank's momentum rows go into its
    shard file (checksummed), and a resume with another process count reads them back."""
    out = dist_data / "out"
    opts = ["--momentum", "0.9", "--weight-decay", "1e-4"]
    single(dist_data, "m1", *opts)
    args = ["--data-dir", str(dist_data / "data"), "--out-dir", str(out), "--name", "m2", *COMMON, *opts]
    proc = torchrun(2, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shard = torch.load(out / "m2" / "checkpoints" / "epoch_2" / "shard_00001.pt", weights_only=True)
    assert shard["momentum_buffer"].shape == (22, 8) and "momentum_buffer" in shard["checksums"]
    assert_same_run(out / "m1", out / "m2")  # the buffers too, the shards' assembled
    a = ckpt_io.load(out / "m1" / "checkpoints" / "epoch_2.pt")
    assert a["momentum_buffer"].abs().max() > 0
    # 2 -> 1: resuming the sharded epoch 1 (weight and buffer rows) continues the run exactly
    # (its buffer is far from zero, so a resume that dropped it would not)
    assert ckpt_io.load(out / "m2" / "checkpoints" / "epoch_1")["momentum_buffer"].abs().max() > 1e-3
    single(dist_data, "m21", *opts, "--resume", str(out / "m2" / "checkpoints" / "epoch_1"))
    assert_same_run(out / "m1", out / "m21")
    # 1 -> 2: the single-process file's buffer, read by class range on each rank
    args = ["--data-dir", str(dist_data / "data"), "--out-dir", str(out), "--name", "m12", *COMMON, *opts,
            "--resume", str(out / "m1" / "checkpoints" / "epoch_1.pt")]
    proc = torchrun(2, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(out / "m1", out / "m12")


def test_sharded_momentum_buffer_is_checksummed(dist_data, tmp_path):
    """A flipped byte in a shard's momentum rows is refused on resume (exit 2 style)."""
    src = dist_data / "out" / "m2" / "checkpoints" / "epoch_1"
    if not src.exists():
        pytest.skip("needs test_momentum_two_processes_equal_one_and_resume")
    import shutil

    from xcent.errors import UsageError

    bad = tmp_path / "epoch_1"
    shutil.copytree(src, bad)
    shard = torch.load(bad / "shard_00000.pt", weights_only=True)
    shard["momentum_buffer"][3, 2] += 1.0  # the stored checksums stay those of the old bytes
    torch.save(shard, bad / "shard_00000.pt")
    assert torch.equal(ckpt_io.load_rows(bad, 23, 45), ckpt_io.load_rows(src, 23, 45))  # weight intact
    assert ckpt_io.load_rows(bad, 30, 45, key="momentum_buffer") is not None  # rank 1's rows are intact
    with pytest.raises(UsageError, match="momentum_buffer"):
        ckpt_io.load_rows(bad, 0, 23, key="momentum_buffer")
