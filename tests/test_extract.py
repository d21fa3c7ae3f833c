"""`xcent extract` on tiny generated webdataset shards.

Needs torch, numpy and pillow only (BioCLIP through open_clip is tested in
test_bioclip.py; the end-to-end test skips until `xcent.train` exists). Images are random JPEGs, the
backbones tiny random networks saved as state_dict files; every invariant is checked
against a direct recomputation: feature row k is the backbone applied to the image
whose key is k.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL")
import tiny_backbones  # noqa: E402
from PIL import Image  # noqa: E402
from tiny_backbones import CLIP_MEAN, CLIP_STD, TinyImageTower, iresnet_tiny  # noqa: E402

from xcent.cli import main as xcent_main  # noqa: E402
from xcent.cli.extract import extract_main  # noqa: E402
from xcent.extract import backbones  # noqa: E402
from xcent.extract.shards import expand_braces, expand_urls  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True, scope="module")
def _tiny_backbones():
    # registered for this module only: the user-facing --arch list (and docs/cli.md,
    # rendered from --help) never shows them
    tiny_backbones.register()
    yield
    tiny_backbones.unregister()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURE_DIM = 16
GLINT_SIZE = 64  # --data-size for the Glint360K-style tests


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # these networks are tiny: intra-op threads only add overhead (and fight other jobs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------- helpers
def jpeg_bytes(rng: np.random.Generator, width: int, height: int) -> bytes:
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_shard(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A webdataset shard: members ``key.ext`` in sample order (gzip if the name says so)."""
    with tarfile.open(path, "w:gz" if str(path).endswith(".gz") else "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def file_digest(directory) -> dict[str, str]:
    return {
        name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(directory))
    }


def face_tensor(data: bytes) -> torch.Tensor:
    """The insightface recipe, written out independently: RGB / 255, (x - 0.5) / 0.5, CHW."""
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64) / 255.0
    return torch.from_numpy(((array - 0.5) / 0.5).transpose(2, 0, 1).copy()).float()


def clip_tensor(data: bytes) -> torch.Tensor:
    """40x32 images: the short side already fits, so CLIP preprocessing is a 4-pixel
    center crop of each side and the CLIP mean/std."""
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64) / 255.0
    assert array.shape == (32, 40, 3)
    array = array[:, 4:36]
    mean, std = np.array(CLIP_MEAN), np.array(CLIP_STD)
    return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy()).float()


@pytest.fixture(scope="module")
def glint(tmp_path_factory):
    """Three .tar.gz shards of 112x112 faces with integer keys and ``cls``, plus bad
    samples of every kind and one shard that is not a tar at all."""
    root = tmp_path_factory.mktemp("glint")
    rng = np.random.default_rng(0)
    keys = rng.permutation(GLINT_SIZE)[:36]  # rows never seen stay uncached
    good = {int(k): (jpeg_bytes(rng, 112, 112), int(rng.integers(0, 9))) for k in keys}
    items = [(f"{k:06d}", {"jpg": jpg, "cls": str(c).encode()}) for k, (jpg, c) in good.items()]
    bad = [
        (f"{200:06d}", {"jpg": jpeg_bytes(rng, 112, 112), "cls": b"1"}),  # key_out_of_range
        (f"{40000:06d}", {"jpg": jpeg_bytes(rng, 112, 112), "cls": b"2"}),  # key_out_of_range
        ("face_a", {"jpg": jpeg_bytes(rng, 112, 112), "cls": b"3"}),  # bad_key
        (f"{1000:06d}", {"jpg": jpeg_bytes(rng, 112, 112)}),  # key_out_of_range (checked first)
    ]
    spare = [k for k in range(GLINT_SIZE) if k not in good]
    corrupt_key, no_cls_key, no_jpg_key, small_key = spare[:4]
    bad += [
        (f"{corrupt_key:06d}", {"jpg": b"\xff\xd8 not really a jpeg", "cls": b"4"}),  # corrupt_image
        (f"{no_cls_key:06d}", {"jpg": jpeg_bytes(rng, 112, 112)}),  # missing_cls
        (f"{no_jpg_key:06d}", {"cls": b"5"}),  # missing_jpg
        (f"{small_key:06d}", {"jpg": jpeg_bytes(rng, 64, 64), "cls": b"5"}),  # corrupt_image (not 112x112)
    ]
    samples = items[:12] + bad[:4] + items[12:24] + bad[4:] + items[24:]
    for i in range(3):
        write_shard(root / f"glint-{i:02d}.tar.gz", samples[i * 15 : (i + 1) * 15])
    (root / "glint-03.tar.gz").write_bytes(b"this is not a tar file" * 10)  # bad_shard
    model = iresnet_tiny(FEATURE_DIM)
    with torch.no_grad():  # non-trivial BN statistics, so the head is exercised
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), root / "weights.pt")
    return {
        "root": root,
        "url": str(root / "glint-{00..03}.tar.gz"),
        "weights": str(root / "weights.pt"),
        "good": good,
        "errors": {
            "key_out_of_range": 3,
            "bad_key": 1,
            "corrupt_image": 2,
            "missing_cls": 1,
            "missing_jpg": 1,
            "bad_shard": 1,
        },
    }


def glint_args(glint, out_dir, *extra) -> list[str]:
    return [
        "--data", "glint360k", "--data-url", glint["url"], "--out-dir", str(out_dir),
        "--pretrained-path", glint["weights"], "--arch", "iresnet_tiny", "--feature-dim", str(FEATURE_DIM),
        "--data-size", str(GLINT_SIZE), "--batch-size", "8", "--workers", "0", "--device", "cpu", *extra,
    ]  # fmt: skip


def load_out(out_dir) -> dict[str, np.ndarray]:
    return {name: np.load(os.path.join(out_dir, f"{name}.npy")) for name in ("features", "labels", "is_cached")}


@pytest.fixture(scope="module")
def glint_out(glint, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("glint_out")
    assert extract_main(glint_args(glint, out_dir)) == 0
    return out_dir


# ------------------------------------------------------------------------- tests
def test_brace_expansion(tmp_path):
    assert expand_braces("s-{000..003}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar", "s-003.tar"]
    assert expand_braces("s-{8..11}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("{a,b{1..2}}/x") == ["a/x", "b1/x", "b2/x"]
    for name in ("a-1.tar", "a-2.tar", "b-1.tar"):
        (tmp_path / name).write_bytes(b"")
    url = f"{tmp_path}/a-{{1..2}}.tar::{tmp_path}/b-*.tar"
    assert expand_urls(url) == [f"{tmp_path}/a-1.tar", f"{tmp_path}/a-2.tar", f"{tmp_path}/b-1.tar"]


def test_glint_rows_labels_features(glint, glint_out):
    out = load_out(glint_out)
    good = glint["good"]
    assert out["features"].shape == (GLINT_SIZE, FEATURE_DIM) and out["features"].dtype == np.float32
    assert out["labels"].dtype == np.int64 and out["is_cached"].dtype == bool
    assert sorted(np.flatnonzero(out["is_cached"])) == sorted(good)
    for key, (_, label) in good.items():
        assert out["labels"][key] == label
    # feature row k is the backbone applied to the image whose key is k
    model = iresnet_tiny(FEATURE_DIM)
    model.load_state_dict(torch.load(glint["weights"], weights_only=True))
    model.eval()
    keys = sorted(good)
    with torch.no_grad():
        expected = model(torch.stack([face_tensor(good[k][0]) for k in keys])).numpy()
    np.testing.assert_allclose(out["features"][keys], expected, rtol=1e-4, atol=1e-5)
    assert not out["features"][~out["is_cached"]].any()
    classes = (glint_out / "classes.txt").read_text().splitlines()
    assert classes == [str(i) for i in range(max(c for _, c in good.values()) + 1)]


def test_glint_skip_counts_exact(glint, glint_out):
    last_run = json.loads((glint_out / "extract.json").read_text())["last_run"]
    assert last_run["errors"] == glint["errors"]
    assert last_run["new_rows"] == len(glint["good"])
    assert last_run["skipped_cached"] == 0
    assert last_run["total_cached"] == len(glint["good"])


def test_rerun_skips_every_cached_row(glint, glint_out, tmp_path, capsys):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(glint_out):
        (copy / name).write_bytes((glint_out / name).read_bytes())
    assert extract_main(glint_args(glint, copy)) == 0
    last_run = json.loads((copy / "extract.json").read_text())["last_run"]
    assert last_run["new_rows"] == 0 and last_run["skipped_cached"] == len(glint["good"])
    assert last_run["errors"] == glint["errors"]  # bad samples are reported again
    assert f"0 rows cached, {len(glint['good'])} skipped as already cached" in capsys.readouterr().out
    for name, array in load_out(glint_out).items():
        np.testing.assert_array_equal(load_out(copy)[name], array)


def test_workers_float16_and_pt(glint, glint_out, tmp_path):
    out_dir = tmp_path / "w2"
    assert extract_main(glint_args(glint, out_dir, "--workers", "2", "--dtype", "float16", "--save-pt")) == 0
    reference, out = load_out(glint_out), load_out(out_dir)
    assert out["features"].dtype == np.float16
    np.testing.assert_array_equal(out["is_cached"], reference["is_cached"])
    np.testing.assert_array_equal(out["labels"], reference["labels"])
    np.testing.assert_allclose(out["features"], reference["features"], rtol=2e-3, atol=2e-3)
    assert json.loads((out_dir / "extract.json").read_text())["last_run"]["errors"] == glint["errors"]
    for name, array in out.items():
        np.testing.assert_array_equal(torch.load(out_dir / f"{name}.pt", weights_only=True).numpy(), array)


KILL_AFTER_BATCHES = 2
KILLER = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {tests!r})
import tiny_backbones
from xcent.cli.extract import extract_main
from xcent.extract.store import FeatureStore

tiny_backbones.register()
calls = [0]
original = FeatureStore.write

def write_then_die(self, rows, features, labels):
    calls[0] += 1
    if calls[0] <= {n}:
        return original(self, rows, features, labels)
    # die in the middle of a batch: features written, the batch not yet marked cached
    self.features[rows] = np.nan
    os.kill(os.getpid(), signal.SIGKILL)

FeatureStore.write = write_then_die
sys.exit(extract_main(sys.argv[1:]))
"""


def test_resume_after_kill(glint, glint_out, tmp_path):
    out_dir = tmp_path / "killed"
    code = KILLER.replace("{n}", str(KILL_AFTER_BATCHES)).replace("{tests!r}", repr(TESTS))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *glint_args(glint, out_dir)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == -9, proc.stderr
    partial = load_out(out_dir)
    assert partial["is_cached"].sum() == KILL_AFTER_BATCHES * 8
    assert extract_main(glint_args(glint, out_dir)) == 0
    last_run = json.loads((out_dir / "extract.json").read_text())["last_run"]
    assert last_run["skipped_cached"] == KILL_AFTER_BATCHES * 8
    assert last_run["new_rows"] == len(glint["good"]) - KILL_AFTER_BATCHES * 8
    for name, array in load_out(glint_out).items():  # the same as the uninterrupted run
        np.testing.assert_allclose(load_out(out_dir)[name], array, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """TreeOfLife-10M-style: .tar shards keyed by treeoflife_id, and a catalog CSV."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(1)
    species = ["Quercus robur", "Apis mellifera", "Bufo bufo", "Zea mays", "Felis catus"]
    ids = [f"id-{rng.integers(1 << 30):08x}-{i}" for i in range(30)]
    catalog_species = [species[i % len(species)] for i in range(30)]
    with open(root / "catalog.csv", "w", newline="") as handle:
        handle.write("treeoflife_id,eol_content_id,species,common\n")
        for tid, sp in zip(ids, catalog_species):
            handle.write(f'{tid},{rng.integers(1000)},{sp},"a, b"\n')
    data_size = 28  # catalog rows 28 and 29 fall outside
    images = {tid: jpeg_bytes(rng, 40, 32) for tid in ids}
    samples = [(tid, {"jpg": images[tid], "txt": b"caption"}) for tid in ids[:27] + ids[28:]]  # row 27 never seen
    samples.insert(5, ("id-not-in-catalog", {"jpg": jpeg_bytes(rng, 40, 32)}))  # unknown_id
    write_shard(root / "tol-000000.tar", samples[:15])
    write_shard(root / "tol-000001.tar", samples[15:])
    model = TinyImageTower(FEATURE_DIM)
    torch.save(model.state_dict(), root / "tiny_clip.pt")
    return {
        "root": root, "ids": ids, "species": catalog_species, "images": images, "data_size": data_size,
        "args": [
            "--data", "treeoflife10m", "--data-url", str(root / "tol-00000{0..1}.tar"),
            "--metadata-path", str(root / "catalog.csv"), "--arch", "clip_tiny",
            "--pretrained-path", str(root / "tiny_clip.pt"), "--feature-dim", str(FEATURE_DIM),
            "--data-size", str(data_size), "--batch-size", "4", "--workers", "0",
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
def tree_out(tree, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tree_out")
    assert extract_main([*tree["args"], "--out-dir", str(out_dir)]) == 0
    return out_dir


def test_treeoflife_rows_labels_features(tree, tree_out):
    out_dir = tree_out
    out = load_out(out_dir)
    expected_rows = list(range(27))
    assert list(np.flatnonzero(out["is_cached"])) == expected_rows
    sorted_species = sorted(set(tree["species"]))
    assert (out_dir / "classes.txt").read_text().splitlines() == sorted_species
    for row in expected_rows:
        assert sorted_species[out["labels"][row]] == tree["species"][row]
    model = TinyImageTower(FEATURE_DIM)
    model.load_state_dict(torch.load(tree["root"] / "tiny_clip.pt", weights_only=True))
    model.eval()
    with torch.no_grad():
        raw = model(torch.stack([clip_tensor(tree["images"][tree["ids"][row]]) for row in expected_rows]))
    expected = (raw / raw.norm(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(out["features"][expected_rows], expected, rtol=1e-4, atol=1e-5)
    last_run = json.loads((out_dir / "extract.json").read_text())["last_run"]
    assert last_run["errors"] == {"unknown_id": 1, "key_out_of_range": 2}


def test_max_batches_then_resume(tree, tree_out, tmp_path):
    out_dir = tmp_path / "partial"
    assert extract_main([*tree["args"], "--out-dir", str(out_dir), "--max-batches", "2"]) == 0
    assert load_out(out_dir)["is_cached"].sum() == 8
    assert extract_main([*tree["args"], "--out-dir", str(out_dir)]) == 0
    assert json.loads((out_dir / "extract.json").read_text())["last_run"]["skipped_cached"] == 8
    for name, array in load_out(tree_out).items():
        np.testing.assert_allclose(load_out(out_dir)[name], array, rtol=1e-5, atol=1e-6)


def test_missing_shard_is_usage_error_and_destroys_nothing(glint, glint_out, capsys):
    before = file_digest(glint_out)
    missing = str(glint["root"] / "glint-04.tar.gz")
    code = xcent_main(
        [
            "extract",
            *glint_args(glint, glint_out)[:3],
            glint["url"].replace("{00..03}", "{00..04}"),
            *glint_args(glint, glint_out)[4:],
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.splitlines() == [f"xcent extract: error: --data-url: shard not found: {missing}"]
    assert file_digest(glint_out) == before


@pytest.mark.parametrize("problem", ["missing", "no_species_column", "not_utf8"])
def test_bad_metadata_is_usage_error(tree, tmp_path, capsys, problem):
    path = tmp_path / "catalog.csv"
    if problem == "no_species_column":
        path.write_text("treeoflife_id,kingdom\nx,Animalia\n")
    elif problem == "not_utf8":
        path.write_bytes(b"treeoflife_id,species\n\xff\xfe\xfa,x\n")
    out_dir = tmp_path / "out"
    args = [a if a != str(tree["root"] / "catalog.csv") else str(path) for a in tree["args"]]
    code = xcent_main(["extract", *args, "--out-dir", str(out_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("xcent extract: error: --metadata-path") and str(path) in err[0]
    assert not out_dir.exists()


@pytest.mark.parametrize("content", ["notes", "arrays_of_mine"])
def test_out_dir_of_the_users_is_never_written_into(glint, tmp_path, capsys, content):
    """A folder that is not an extraction output: its own notes, or arrays of the store's names and
    shapes that xcent extract did not write (no extract.json), which it used to resume into."""
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    if content == "notes":
        (out_dir / "notes.txt").write_text("mine")
    else:
        np.save(out_dir / "features.npy", np.ones((GLINT_SIZE, FEATURE_DIM), dtype=np.float32))
        np.save(out_dir / "labels.npy", np.zeros(GLINT_SIZE, dtype=np.int64))
    before = file_digest(out_dir)
    assert xcent_main(["extract", *glint_args(glint, out_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out-dir: {out_dir} holds" in err[0], err
    assert file_digest(out_dir) == before


def test_resume_with_other_settings_refused(glint, glint_out, capsys):
    before = file_digest(glint_out)
    args = glint_args(glint, glint_out, "--dtype", "float16")
    assert xcent_main(["extract", *args]) == 2
    assert "dtype" in capsys.readouterr().err
    assert file_digest(glint_out) == before


def test_weights_that_do_not_fit_are_usage_error(glint, tmp_path, capsys):
    args = glint_args(glint, tmp_path / "out")
    args[args.index("--feature-dim") + 1] = "8"
    assert xcent_main(["extract", *args]) == 2
    assert "--pretrained-path" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_iresnet50_published_shape():
    with torch.device("meta"):  # shapes only: no time spent initialising 43.6M weights
        model = backbones.iresnet("iresnet50").eval()
    assert sum(p.numel() for p in model.parameters()) == 43_590_848  # the published ~43.6M
    state = model.state_dict()
    assert state["fc.weight"].shape == (512, 512 * 7 * 7)
    assert "layer3.13.bn3.running_var" in state and "layer1.0.downsample.1.weight" in state
    assert not model.features.weight.requires_grad  # the head's last BN keeps scale 1
    # (the forward pass of the same class runs in every iresnet_tiny test above)


def test_extract_split_train_eval_end_to_end(glint_out, tmp_path, capsys):
    """extract (the glint_out fixture) -> split -> train 1 epoch -> eval, through the CLI."""
    pytest.importorskip("xcent.train")
    data_dir, runs = tmp_path / "data", tmp_path / "runs"
    assert (
        xcent_main(
            ["split", "--in", str(glint_out), "--out", str(data_dir), "--val-fraction", "6", "--test-fraction", "6"]
        )
        == 0
    )
    assert "24 train / 6 val / 6 test" in capsys.readouterr().out
    for split_name, size in (("train", 24), ("val", 6), ("test", 6)):
        assert np.load(data_dir / split_name / "features.npy").shape == (size, FEATURE_DIM)
        assert np.load(data_dir / split_name / "labels.npy").dtype == np.int64
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "src"), "OMP_NUM_THREADS": "1"}

    def xcent(*args):
        proc = subprocess.run(
            [sys.executable, "-m", "xcent", *args], capture_output=True, text=True, env=env, timeout=300
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    xcent(
        "train",
        "--data-dir",
        str(data_dir),
        "--out-dir",
        str(runs),
        "--name",
        "e2e",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--algorithm",
        "scent",
    )
    checkpoint = runs / "e2e" / "checkpoints" / "epoch_1.pt"
    assert checkpoint.exists()
    assert xcent("eval", "--checkpoint", str(checkpoint), "--data-dir", str(data_dir), "--split", "val").strip()


# ------------------------------------------------------- every loss is counted
def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def member_offsets(data: bytes) -> list[int]:
    """Header offsets of the members of an uncompressed tar."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [member.offset for member in tar.getmembers()]


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """One good shard of 20 samples, and damaged copies of it: cut in half (plain tar),
    cut at a member boundary (no end-of-archive block), a header damaged inside a
    well-formed .tar.gz (tarfile alone takes it for the end of the archive), flipped
    compressed bytes of a .tar.gz, and a .tar.gz cut short. Plus a shard whose samples
    include a ``cls`` too large for int64."""
    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(5)
    samples = [(f"{k:06d}", {"jpg": jpeg_bytes(rng, 112, 112), "cls": str(k % 7).encode()}) for k in range(20)]
    good = tar_bytes(samples)
    offsets = member_offsets(good)  # 2 members per sample: jpg, cls
    import gzip

    cases = {}

    def shard(name: str, data: bytes, samples_read: int | None):
        (root / name).write_bytes(data)
        cases[name] = samples_read

    shard("good.tar", good, None)
    half = len(good) // 2
    # sample k is yielded once the next sample's first header has been read whole; the
    # sample being assembled at the cut is dropped (its completeness cannot be known)
    yielded = sum(1 for k in range(19) if offsets[2 * k + 2] + 512 <= half)
    shard("cut_half.tar", good[:half], yielded)
    shard("cut_boundary.tar", good[: offsets[24]], 11)  # 12 samples whole, no end block
    damaged = bytearray(good)
    damaged[offsets[16] : offsets[16] + 8] = b"\x00garbage"  # header of sample 8's jpg
    shard("bad_header.tar.gz", gzip.compress(bytes(damaged), mtime=0), 7)
    compressed = bytearray(gzip.compress(good, mtime=0))
    compressed[len(compressed) // 2] ^= 0xFF
    shard("flipped.tar.gz", bytes(compressed), None)  # where it breaks depends on deflate
    shard("cut.tar.gz", gzip.compress(good, mtime=0)[: len(compressed) * 2 // 3], None)

    huge = [(f"{k:06d}", {"jpg": jpeg_bytes(rng, 112, 112), "cls": b"1"}) for k in range(20, 26)]
    huge[2][1]["cls"] = str(2**63).encode()  # one past int64
    huge[4][1]["cls"] = b"123456789012345678901234567890"
    shard("huge_cls.tar", tar_bytes(huge), None)
    model = iresnet_tiny(FEATURE_DIM)
    torch.save(model.state_dict(), root / "weights.pt")
    return root, cases


def fault_args(root, shards: str, out_dir, *extra) -> list[str]:
    return [
        "--data", "glint360k", "--data-url", str(root / shards), "--out-dir", str(out_dir),
        "--pretrained-path", str(root / "weights.pt"), "--arch", "iresnet_tiny", "--feature-dim", str(FEATURE_DIM),
        "--data-size", "64", "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "name", ["cut_half.tar", "cut_boundary.tar", "bad_header.tar.gz", "flipped.tar.gz", "cut.tar.gz"]
)
def test_iter_shard_reports_every_break(faults, name):
    from xcent.extract.shards import ShardBreak, iter_shard

    root, cases = faults
    items = list(iter_shard(str(root / name)))
    assert isinstance(items[-1], ShardBreak) and items[-1].path == str(root / name)
    assert not any(isinstance(item, ShardBreak) for item in items[:-1])
    read = len(items) - 1
    assert items[-1].samples_read == read
    if cases[name] is not None:
        assert read == cases[name]
    assert [s["__key__"] for s in items[:-1]] == [f"{k:06d}" for k in range(read)]
    assert list(iter_shard(str(root / "good.tar")))[-1]["__key__"] == "000019"  # a good shard has no break


@pytest.mark.parametrize("batch_size,workers", [(1, 0), (16, 0), (64, 0), (4, 2)])
def test_bad_shards_counted_whatever_batch_size_and_workers(faults, tmp_path, batch_size, workers):
    """Each broken shard is one bad_shard, and the summary says how far it was read,
    whatever the batch size or the number of workers; the good samples before each
    break are still extracted."""
    root, cases = faults
    names = ["cut_half.tar", "cut_boundary.tar", "bad_header.tar.gz"]
    out_dir = tmp_path / "out"
    url = "{" + ",".join(names) + "}"
    args = fault_args(root, url, out_dir, "--batch-size", str(batch_size), "--workers", str(workers))
    assert extract_main(args) == 0
    last_run = json.loads((out_dir / "extract.json").read_text())["last_run"]
    assert last_run["errors"] == {"bad_shard": 3}
    reads = {os.path.basename(b["path"]): b["samples_read"] for b in last_run["shard_breaks"]}
    assert reads == {name: cases[name] for name in names}
    # the shards are copies of one shard: what was read of the longest is what is cached
    assert last_run["total_cached"] == max(reads.values())


def test_summary_line_names_the_break(faults, tmp_path, capsys):
    root, cases = faults
    assert xcent_main(["extract", *fault_args(root, "bad_header.tar.gz", tmp_path / "o", "--workers", "0")]) == 0
    out = capsys.readouterr().out
    assert "bad_shard=1" in out and f"bad_header.tar.gz broke off after {cases['bad_header.tar.gz']} samples" in out


def test_cls_too_large_for_int64_is_skipped_and_counted(faults, tmp_path):
    root, _ = faults
    out_dir = tmp_path / "out"
    assert extract_main(fault_args(root, "huge_cls.tar", out_dir, "--batch-size", "2", "--workers", "0")) == 0
    last_run = json.loads((out_dir / "extract.json").read_text())["last_run"]
    assert last_run["errors"] == {"bad_cls": 2}
    cached = np.flatnonzero(np.load(out_dir / "is_cached.npy"))
    assert cached.tolist() == [20, 21, 23, 25]
