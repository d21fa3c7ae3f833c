"""Checkpoint and export integrity: a flipped bit, a crafted file or a swapped shard is
refused by every reader with one line and exit 2; stale temp files are cleaned."""

import json
import shutil
import struct
import zipfile

import pytest
import torch

import xcent
from xcent import cli
from xcent import modelio as mio
from xcent.data import synthesize
from xcent.errors import UsageError

C, D = 40, 12


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 2-epoch run through the CLI (checkpoints at epochs 1 and 2) and an export."""
    root = tmp_path_factory.mktemp("modelio")
    data = root / "data"
    synthesize(data, num_classes=C, feature_dim=D, num_samples=800, val_fraction=0.1, test_fraction=0.1, seed=3)
    assert cli.main(["train", "--data-dir", str(data), "--out-dir", str(root / "out"), "--name", "n",
                     "--epochs", "2", "--batch-size", "64", "--save-frequency", "1"]) == 0
    ckpts = root / "out" / "n" / "checkpoints"
    export = root / "w.safetensors"
    assert cli.main(["export", "--checkpoint", str(ckpts / "epoch_2.pt"), "--out", str(export)]) == 0
    return {"root": root, "data": data, "ckpts": ckpts, "export": export}


def fail(argv, capsys):
    """Run a command that must fail: exit 2 and a single-line error; returns it."""
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


def zip_record_offset(path, nbytes):
    """Offset of the data of the torch.save record holding ``nbytes`` bytes."""
    with zipfile.ZipFile(path) as zf:
        infos = [i for i in zf.infolist() if i.file_size == nbytes and "/data/" in i.filename]
    assert len(infos) == 1
    with open(path, "rb") as f:
        f.seek(infos[0].header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return infos[0].header_offset + 30 + name_len + extra_len


def flip_bit(path, offset, bit=3):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def flipped_copy(src, dst, nbytes, at=5):
    shutil.copy(src, dst)
    flip_bit(dst, zip_record_offset(dst, nbytes) + at)
    return dst


def train_argv(run, *extra):
    return ["train", "--data-dir", str(run["data"]), "--out-dir", str(run["root"] / "out"), "--name", "n",
            "--epochs", "3", "--batch-size", "64", *extra]


def test_torch_itself_loads_a_flipped_bit_silently(run, tmp_path):
    """Why xcent checks: torch.load (mmap or not) ignores the zip CRCs."""
    bad = flipped_copy(run["ckpts"] / "epoch_1.pt", tmp_path / "bad.pt", C * D * 4)
    good = torch.load(run["ckpts"] / "epoch_1.pt", weights_only=True)["weight"]
    for mmap in (False, True):
        assert not torch.equal(torch.load(bad, weights_only=True, mmap=mmap)["weight"], good)


def test_flipped_weight_bit_is_refused_by_every_reader(run, tmp_path, capsys):
    bad = flipped_copy(run["ckpts"] / "epoch_1.pt", tmp_path / "epoch_1.pt", C * D * 4)
    why = "corrupt checkpoint (tensor 'weight' fails its checksum)"
    assert fail(train_argv(run, "--resume", str(bad)), capsys).endswith(f"--resume {bad}: {why}")
    assert fail(["eval", "--checkpoint", str(bad), "--data-dir", str(run["data"])], capsys).endswith(
        f"--checkpoint {bad}: {why}")
    feats = run["data"] / "val" / "features.npy"
    out = tmp_path / "p.jsonl"
    assert why in fail(["predict", "--checkpoint", str(bad), "--features", str(feats), "--out", str(out)], capsys)
    assert not out.exists()
    assert why in fail(["export", "--checkpoint", str(bad), "--out", str(tmp_path / "w.safetensors")], capsys)
    with pytest.raises(UsageError, match="fails its checksum"):
        xcent.Classifier.load(bad)
    # the dual state is checked too (resume reads it; eval reads only the weight's metadata)
    num_samples = torch.load(bad, weights_only=True)["num_samples"]
    bad_nu = flipped_copy(run["ckpts"] / "epoch_1.pt", tmp_path / "nu.pt", num_samples * 4)
    assert "tensor 'nu' fails its checksum" in fail(train_argv(run, "--resume", str(bad_nu)), capsys)


def test_resume_latest_refuses_a_corrupt_latest_checkpoint(run, tmp_path, capsys):
    copy = tmp_path / "out"
    shutil.copytree(run["root"] / "out", copy)
    latest = copy / "n" / "checkpoints" / "epoch_2.pt"
    flip_bit(latest, zip_record_offset(latest, C * D * 4) + 100, bit=7)
    argv = ["train", "--data-dir", str(run["data"]), "--out-dir", str(copy), "--name", "n", "--epochs", "3",
            "--batch-size", "64", "--resume", "latest"]
    assert fail(argv, capsys).endswith(f"--resume {latest}: corrupt checkpoint (tensor 'weight' fails its checksum)")


def test_corrupt_export_is_refused(run, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    shutil.copy(run["export"], bad)
    raw = bad.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    assert "checksums" in header["__metadata__"]
    flip_bit(bad, 8 + header_len + header["weight"]["data_offsets"][0] + 17)
    feats = run["data"] / "val" / "features.npy"
    err = fail(["predict", "--checkpoint", str(bad), "--features", str(feats), "--out", str(tmp_path / "p.csv")],
               capsys)
    assert err.endswith(f"--checkpoint {bad}: corrupt checkpoint (tensor 'weight' fails its checksum)")
    with pytest.raises(UsageError, match="fails its checksum"):
        xcent.Classifier.load(bad)
    # the untouched export still loads, bit for bit
    weight, _ = mio.load_model(run["export"])
    assert torch.equal(weight, mio.load(run["ckpts"] / "epoch_2.pt")["weight"])


def write_sharded(directory, ckpt, cuts):
    """A class-sharded checkpoint directory as save_sharded writes it, by hand."""
    directory.mkdir()
    shards = []
    for r, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        name = f"shard_{r:05d}.pt"
        mio.save_atomic({"weight": ckpt["weight"][lo:hi].clone()}, directory / name)
        shards.append((name, lo, hi))
    sums = {name: torch.load(directory / name, weights_only=True)["checksums"]["weight"] for name, _, _ in shards}
    meta = {k: v for k, v in ckpt.items() if k not in ("weight", "checksums")}
    mio.save_atomic({**meta, "shards": shards, "shard_checksums": sums, "world_size": len(shards)},
                    directory / mio.MANIFEST)
    return directory


def test_sharded_checkpoint_corrupt_or_swapped_shard(run, tmp_path, capsys):
    ckpt = mio.load(run["ckpts"] / "epoch_2.pt")
    sharded = write_sharded(tmp_path / "epoch_2", ckpt, [0, 15, 40])
    assert torch.equal(mio.load(sharded)["weight"], ckpt["weight"])
    weight, meta = mio.load_model(sharded)
    assert torch.equal(weight, ckpt["weight"]) and meta["epoch"] == 2

    shard = sharded / "shard_00001.pt"
    flip_bit(shard, zip_record_offset(shard, 25 * D * 4) + 9)
    why = "corrupt checkpoint (tensor 'weight' fails its checksum)"
    assert fail(["eval", "--checkpoint", str(sharded), "--data-dir", str(run["data"])], capsys).endswith(
        f"--checkpoint {shard}: {why}")
    assert why in fail(train_argv(run, "--resume", str(sharded)), capsys)
    # a rank whose classes lie in the intact shard reads and verifies only that one
    assert torch.equal(mio.load_rows(sharded, 0, 15), ckpt["weight"][:15])
    with pytest.raises(UsageError, match="shard_00001.pt: corrupt"):
        mio.load_rows(sharded, 10, 20)

    # a well-formed shard of another save in its place
    other = write_sharded(tmp_path / "other", {**ckpt, "weight": ckpt["weight"] * 2}, [0, 15, 40])
    shutil.copy(other / "shard_00001.pt", shard)
    assert "not the one its manifest records" in fail(
        ["export", "--checkpoint", str(sharded), "--out", str(tmp_path / "w.safetensors")], capsys)
    # a corrupt manifest (the duals live there)
    manifest = other / mio.MANIFEST
    flip_bit(manifest, zip_record_offset(manifest, ckpt["num_samples"] * 4) + 2)
    assert "tensor 'nu' fails its checksum" in fail(train_argv(run, "--resume", str(other)), capsys)


CRAFTED = {
    "short weight": (lambda c: {**c, "weight": c["weight"][:-1].clone()}, "'weight' is (39, 12)"),
    "short nu": (lambda c: {**c, "nu": c["nu"][:-3].clone()}, "'nu' has"),
    "nu_set not bool": (lambda c: {**c, "nu_set": c["nu_set"].float()}, "'nu_set' is not a 1-d bool tensor"),
    "missing nu": (lambda c: {k: v for k, v in c.items() if k != "nu"}, "missing 'nu'"),
    "missing weight": (lambda c: {k: v for k, v in c.items() if k != "weight"}, "missing 'weight'"),
    "negative epoch": (lambda c: {**c, "epoch": -1}, "'epoch' is -1"),
    "epoch as text": (lambda c: {**c, "epoch": "1"}, "'epoch' is '1'"),
    "integer weight": (lambda c: {**c, "weight": c["weight"].long()}, "'weight' is not a 2-d float tensor"),
    "num_classes bool": (lambda c: {**c, "num_classes": True}, "'num_classes' is True"),
    "rng_state float": (lambda c: {**c, "rng_state": c["rng_state"].float()}, "'rng_state' is not a uint8"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_checkpoints_exit_2_with_one_line(run, tmp_path, capsys, case):
    make, reason = CRAFTED[case]
    ckpt = {k: v for k, v in mio.load(run["ckpts"] / "epoch_1.pt").items() if k != "checksums"}
    path = tmp_path / "crafted.pt"
    mio.save_atomic(make(ckpt), path)  # valid checksums: the structure is what is wrong
    err = fail(train_argv(run, "--resume", str(path)), capsys)
    assert f"--resume {path}: invalid checkpoint (" in err and reason in err
    if case != "missing nu":  # what a file holds is checked by every reader
        err = fail(["eval", "--checkpoint", str(path), "--data-dir", str(run["data"])], capsys)
        assert f"--checkpoint {path}: invalid checkpoint (" in err and reason in err
    else:  # but eval does not need the training state
        capsys.readouterr()
        assert cli.main(["eval", "--checkpoint", str(path), "--data-dir", str(run["data"]), "--json"]) == 0


def test_checkpoint_of_an_older_xcent_is_checked_by_its_zip_crcs(run, tmp_path, capsys):
    """Written before tensor checksums (plain torch.save): accepted, but verified
    against the zip CRCs, so a flipped bit is still refused."""
    ckpt = {k: v for k, v in mio.load(run["ckpts"] / "epoch_1.pt").items() if k != "checksums"}
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(old), "--data-dir", str(run["data"]), "--json"]) == 0
    assert torch.equal(mio.load(old)["weight"], ckpt["weight"])
    flip_bit(old, zip_record_offset(old, C * D * 4) + 33)
    err = fail(["eval", "--checkpoint", str(old), "--data-dir", str(run["data"])], capsys)
    assert f"--checkpoint {old}: corrupt checkpoint (record '" in err and "fails its zip CRC" in err


def test_row_ranges_read_only_their_checksum_pieces(monkeypatch, tmp_path):
    monkeypatch.setattr(mio, "CHECKSUM_BYTES", 64)  # 16 floats per piece
    weight = torch.arange(40 * 4, dtype=torch.float32).reshape(40, 4)
    ckpt = {"format": mio.FORMAT, "weight": weight, "num_classes": 40, "feature_dim": 4, "epoch": 0}
    path = tmp_path / "w.pt"
    mio.save_atomic(ckpt, path)
    assert len(torch.load(path, weights_only=True)["checksums"]["weight"]) == 10
    flip_bit(path, zip_record_offset(path, 40 * 4 * 4) + 4 * 4 * 30)  # inside row 30
    assert torch.equal(mio.load_rows(path, 0, 28), weight[:28])  # pieces 0..6 only
    for lo, hi in ((28, 32), (0, 40)):
        with pytest.raises(UsageError, match="'weight' fails its checksum"):
            mio.load_rows(path, lo, hi)
    with pytest.raises(UsageError, match="'weight' fails its checksum"):
        mio.load_model(path)


def test_stale_temp_files_of_interrupted_saves_are_removed_on_resume(run, tmp_path, capsys):
    copy = tmp_path / "out"
    shutil.copytree(run["root"] / "out", copy)
    ckpts = copy / "n" / "checkpoints"
    (ckpts / ".epoch_3.tmp4242.pt").write_bytes(b"half a checkpoint")
    (ckpts / ".epoch_3.tmp").mkdir()
    (ckpts / ".epoch_3.tmp" / "shard_00000.pt").write_bytes(b"half a shard")
    (ckpts / "notes.txt").write_text("mine")
    capsys.readouterr()
    argv = ["train", "--data-dir", str(run["data"]), "--out-dir", str(copy), "--name", "n", "--epochs", "3",
            "--batch-size", "64", "--resume", "latest"]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.pt", "epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "notes.txt"]
    # the function itself, on a directory that does not exist and on one with nothing stale
    assert mio.clean_stale_temp(tmp_path / "nowhere") == []
    assert mio.clean_stale_temp(ckpts) == []


def test_non_finite_weight_is_refused_by_every_reader(run, tmp_path, capsys):
    """An intact file whose weight holds NaN/inf (a diverged state, a hand-made or
    converted file; a float64 value beyond float32's range): exit 2 naming the file, the
    tensor and the row, in every reader. It used to evaluate to `loss nan top1 1.0000`
    and to predict `probs: NaN`."""
    good = mio.load(run["ckpts"] / "epoch_1.pt")
    feats = run["data"] / "val" / "features.npy"
    cases = {}
    for name, edit in (("nan", lambda w: w.__setitem__((7, 3), float("nan"))),
                       ("inf", lambda w: w.__setitem__((7, 0), float("-inf")))):
        w = good["weight"].clone()
        edit(w)
        cases[name] = w
    big = good["weight"].double()
    big[7, 5] = 1e39  # finite in the file, inf once cast to float32
    cases["float64"] = big
    for name, w in cases.items():
        path = tmp_path / f"{name}.pt"
        mio.save_atomic({**{k: v for k, v in good.items() if k != "checksums"}, "weight": w}, path)
        why = f"{path}: 'weight' holds a value that is not finite in float32 (NaN, inf or beyond +-3.4e38) in row 7"
        assert fail(train_argv(run, "--resume", str(path)), capsys).endswith(f"--resume {why}")
        assert fail(["eval", "--checkpoint", str(path), "--data-dir", str(run["data"])], capsys).endswith(
            f"--checkpoint {why}")
        out = tmp_path / "p.jsonl"
        assert why in fail(["predict", "--checkpoint", str(path), "--features", str(feats), "--out", str(out)],
                           capsys)
        assert not out.exists()
        assert why in fail(["export", "--checkpoint", str(path), "--out", str(tmp_path / "w.safetensors")], capsys)
        with pytest.raises(UsageError, match="row 7"):
            xcent.Classifier.load(path)
    # an export written with a NaN (by hand: xcent export refuses to read one)
    export = tmp_path / "nan.safetensors"
    mio.export_safetensors(cases["nan"], {"algorithm": "scent", "epoch": 1}, export)
    assert "'weight' holds a value that is not finite" in fail(
        ["eval", "--checkpoint", str(export), "--data-dir", str(run["data"])], capsys)
    # a sharded directory: the row is counted in the whole weight, whichever shard holds it
    sharded = write_sharded(tmp_path / "epoch_1", {**good, "weight": cases["nan"]}, [0, 5, 40])
    assert "shard_00001.pt: 'weight' holds a value that is not finite in float32 (NaN, inf or beyond " \
        "+-3.4e38) in row 7" in fail(["eval", "--checkpoint", str(sharded), "--data-dir", str(run["data"])], capsys)
    assert "in row 7" in fail(train_argv(run, "--resume", str(sharded)), capsys)
    # a set dual that is not finite is refused on resume too (NaN marks an unset one)
    nu = good["nu"].clone()
    nu[int(good["nu_set"].nonzero()[0, 0])] = float("inf")
    path = tmp_path / "nu.pt"
    mio.save_atomic({**{k: v for k, v in good.items() if k != "checksums"}, "nu": nu}, path)
    assert "'nu' holds a value that is not finite" in fail(train_argv(run, "--resume", str(path)), capsys)
    # the library: a Classifier of a non-finite weight is refused too
    with pytest.raises(ValueError, match="row 7"):
        xcent.Classifier(cases["nan"])
