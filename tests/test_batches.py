"""xcent.batches: the epoch's batches read ahead in a thread are the batches read in
place; errors reach the caller; the thread never outlives the loop."""

import threading

import numpy as np
import pytest
import torch
from conftest import read_jsonl

from xcent import cli
from xcent.batches import THREAD_NAME, BatchLoader, batch_index, prefetch_enabled, read_batch
from xcent.config import config_from_argv
from xcent.data import load_split, write_split
from xcent.errors import DivergenceError, UsageError
from xcent.modelio import load as load_ckpt
from xcent.train import train

CUDA = torch.cuda.is_available()


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


@pytest.fixture(autouse=True)
def no_leaked_threads():
    assert not loader_threads()
    yield
    assert not loader_threads(), "a batch thread outlived its loop"


def make_split(root, n=203, dim=5, classes=7, fmt="npy", dtype=np.float16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    feats = torch.from_numpy(x).to(torch.bfloat16) if dtype == "bfloat16" else x.astype(dtype)
    write_split(root / "train", feats, rng.integers(0, classes, n), fmt=fmt)
    return load_split(root, "train")


@pytest.mark.parametrize("fmt,dtype,low_memory", [("npy", np.float16, False), ("npy", np.float32, True),
                                                  ("pt", "bfloat16", False)])
@pytest.mark.parametrize("prefetch", [False, True])
def test_batches_are_the_epoch_order_in_place(tmp_path, fmt, dtype, low_memory, prefetch):
    split = make_split(tmp_path, fmt=fmt, dtype=dtype)
    split.release_pages = low_memory
    order = torch.randperm(split.num_samples, generator=torch.Generator().manual_seed(3))
    B = 16  # 203 rows: 12 full batches and one of 11
    with BatchLoader(split, order, B, "cpu", prefetch=prefetch) as batches:
        got = list(batches)
    assert len(got) == len(batches) == 13 and [b.step for b in got] == list(range(13))
    assert got[-1].index.shape == (11,)
    seen = torch.cat([b.index for b in got])
    assert torch.equal(seen.sort().values, torch.arange(split.num_samples))  # every row once
    full = split.features if fmt == "pt" else torch.from_numpy(np.array(split.features))
    for b in got:
        rows = order[b.step * B:(b.step + 1) * B].sort().values
        assert torch.equal(b.index, rows) and torch.equal(b.index, batch_index(order, b.step, B))
        assert torch.equal(b.labels, split.labels[rows])
        assert b.features.dtype == full.dtype and torch.equal(b.features, full[rows])
        assert b.features.device.type == "cpu" and b.index.device.type == "cpu"


def test_rows_of_and_finish_shape_each_batch(tmp_path):
    split = make_split(tmp_path, n=50)
    order = torch.arange(50).flip(0)
    rows_of = lambda index: index[::2]  # noqa: E731  e.g. a rank's slice of the batch
    finish = lambda feats, index: feats.float() * 2  # noqa: E731  runs on the caller's thread
    with BatchLoader(split, order, 8, "cpu", rows_of=rows_of, finish=finish) as batches:
        for b in batches:
            want = torch.from_numpy(np.array(split.features))[b.index[::2]].float() * 2
            assert torch.equal(b.features, want) and b.labels.shape == b.index.shape
            one = read_batch(split, b.index, "cpu", rows_of=rows_of)
            assert torch.equal(finish(one.features, one.index), b.features)


def test_leaving_the_loop_early_stops_the_thread(tmp_path):
    split = make_split(tmp_path, n=400)
    order = torch.randperm(400)
    with BatchLoader(split, order, 4, "cpu") as batches:
        it = iter(batches)
        assert next(it).step == 0 and next(it).step == 1
        assert loader_threads()  # reading ahead: the loop is not over
    assert not loader_threads()  # the with block stopped it, the iterator still referenced
    loader = BatchLoader(split, order, 4, "cpu")
    with pytest.raises(KeyboardInterrupt), loader:
        for _ in loader:
            raise KeyboardInterrupt
    assert not loader_threads()
    with pytest.raises(RuntimeError, match="iterated once"):
        list(loader)


def test_an_error_in_the_thread_is_raised_in_the_caller(tmp_path, monkeypatch):
    split = make_split(tmp_path, n=100)
    real = type(split).gather
    calls = []

    def failing(self, index, out=None):
        calls.append(threading.current_thread().name)
        if len(calls) == 4:
            raise UsageError(f"{self.feature_files[0]}: cannot be read (OSError: Input/output error)")
        return real(self, index, out)

    monkeypatch.setattr(type(split), "gather", failing)
    seen = []
    loader = BatchLoader(split, torch.arange(100), 10, "cpu")
    with pytest.raises(UsageError, match="features.npy: cannot be read") as info, loader:
        for b in loader:
            seen.append(b.step)
    assert seen == [0, 1, 2]  # the batches before the bad one, in order
    assert str(info.value).count("\n") == 0
    assert set(calls) == {THREAD_NAME}  # the reads ran in the thread


def config(data, out, name, *extra):
    return config_from_argv(["--data-dir", str(data), "--out-dir", str(out), "--name", name, *map(str, extra)])


def test_trainer_results_are_the_same_with_and_without_prefetch(tiny_data, tmp_path):
    for name, flag in (("on", "on"), ("off", "off")):
        train(config(tiny_data, tmp_path, name, "--epochs", 2, "--batch-size", 48, "--log-every-steps", 3,
                     "--prefetch", flag), echo=lambda *_: None)
    a = load_ckpt(tmp_path / "on" / "checkpoints" / "epoch_2.pt")
    b = load_ckpt(tmp_path / "off" / "checkpoints" / "epoch_2.pt")
    assert torch.equal(a["weight"], b["weight"]) and torch.equal(a["nu"], b["nu"])
    assert a["config"]["prefetch"] == "on" and b["config"]["prefetch"] == "off"
    steps = read_jsonl(tmp_path / "on" / "steps_on.jsonl")
    assert steps and steps == read_jsonl(tmp_path / "off" / "steps_off.jsonl")


def test_trainer_read_error_is_one_line_exit_2(tiny_data, tmp_path, capsys, monkeypatch):
    from xcent.data import Split

    real = Split.gather

    def failing(self, index, out=None):
        if threading.current_thread().name == THREAD_NAME and self.name == "train":
            raise UsageError(f"{self.feature_files[0]}: cannot be read (OSError: Input/output error)")
        return real(self, index, out)

    monkeypatch.setattr(Split, "gather", failing)
    code = cli.main(["train", "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "e",
                     "--epochs", "2", "--batch-size", "64", "--prefetch", "on"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("xcent train: error:") and "features.npy: cannot be read" in err[0]


def test_divergence_leaves_no_thread(tmp_path):
    rng = np.random.default_rng(2)
    for split, n in (("train", 400), ("val", 40)):
        write_split(tmp_path / "d" / split, (rng.standard_normal((n, 8)) * 1e3).astype(np.float32),
                    rng.integers(0, 20, n))
    with pytest.raises(DivergenceError):
        train(config(tmp_path / "d", tmp_path, "div", "--algorithm", "asgd", "--lr", 1e6, "--epochs", 3,
                     "--batch-size", 16, "--prefetch", "on"), echo=lambda *_: None)
    # the autouse fixture checks that no batch thread is left


@pytest.mark.skipif(not CUDA, reason="pinned memory and non-blocking copies need CUDA")
@pytest.mark.parametrize("prefetch", [False, True])
def test_cuda_batches_are_pinned_and_never_overwritten_in_flight(tmp_path, prefetch):
    split = make_split(tmp_path, n=4000, dim=64)
    order = torch.randperm(4000, generator=torch.Generator().manual_seed(0))
    full = torch.from_numpy(np.array(split.features))
    device = torch.device("cuda")
    kept = []
    with BatchLoader(split, order, 32, device, prefetch=prefetch) as batches:
        for b in batches:
            assert b.features.device.type == "cuda" and b.index.is_pinned() and b.labels.is_pinned()
            assert b.index.device.type == "cpu" and b.labels.device.type == "cpu"
            # hold the stream back so that copies are still in flight while the next batches are read
            torch.cuda._sleep(200_000)
            kept.append((b.index.clone(), b.features))
    torch.cuda.synchronize()
    for index, feats in kept:
        assert torch.equal(feats.cpu(), full[index])


def test_prefetch_auto_is_on_with_cuda_only():
    assert prefetch_enabled("auto", "cuda") and prefetch_enabled("auto", "cuda:1")
    assert not prefetch_enabled("auto", "cpu")
    assert prefetch_enabled("on", "cpu") and not prefetch_enabled("off", "cuda")
    with pytest.raises(ValueError):
        prefetch_enabled("yes", "cpu")


def test_bad_prefetch_value_is_one_line(tiny_data, tmp_path, capsys):
    code = cli.main(["train", "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--prefetch", "maybe"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--prefetch" in err[0]
    assert not tmp_path.joinpath("scent").exists()


def test_class_sharded_prefetch_equals_reading_in_the_loop(tmp_path):
    """Under torchrun each rank reads its slice ahead in the thread and all-gathers on the
    training thread: the same run as without prefetch (2 gloo processes each)."""
    import os
    import subprocess
    import sys

    from xcent.data import synthesize

    synthesize(tmp_path / "data", num_classes=45, feature_dim=8, num_samples=700, seed=5, noise=0.6)
    for i, mode in enumerate(("on", "off")):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(29000 + (os.getpid() + 7 * i) % 400), "-m", "xcent", "train", "--data-dir", str(tmp_path / "data"),
               "--out-dir", str(tmp_path / "out"), "--name", mode, "--epochs", "2", "--batch-size", "48",
               "--train-eval-size", "200", "--prefetch", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for shard in ("shard_00000.pt", "shard_00001.pt"):
        a = torch.load(tmp_path / "out" / "on" / "checkpoints" / "epoch_2" / shard, weights_only=True)["weight"]
        b = torch.load(tmp_path / "out" / "off" / "checkpoints" / "epoch_2" / shard, weights_only=True)["weight"]
        assert torch.equal(a, b)
    a = torch.load(tmp_path / "out" / "on" / "checkpoints" / "epoch_2" / "manifest.pt", weights_only=True)
    b = torch.load(tmp_path / "out" / "off" / "checkpoints" / "epoch_2" / "manifest.pt", weights_only=True)
    assert torch.equal(a["nu"], b["nu"])
