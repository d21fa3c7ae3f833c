"""``xcent extract --arch bioclip`` through the real open_clip, checked row by row
against open_clip's own ``create_model_and_transforms`` + ``encode_image`` + L2
normalisation on the same images.

open_clip needs a torchvision built for the installed torch, which the CPU-only torch
wheel does not have: these tests skip where open_clip cannot be imported, except when
``XCENT_REQUIRE_OPEN_CLIP=1`` (set by ``.ci/run`` in its second environment, which has a
matching pair), where a skip would hide a broken install and fails instead.
The error path (open_clip missing) is tested everywhere by hiding the module.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from xcent.cli import main as xcent_main  # noqa: E402
from xcent.extract import backbones  # noqa: E402

#: a small ViT in open_clip's own config format, for tests with more images than a
#: ViT-B-16 forward pass on a CPU allows in seconds
TINY_VIT = "xcent-test-tiny-vit"
TINY_VIT_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 128, "width": 32, "heads": 2, "layers": 1},
}


def open_clip_or_skip():
    try:
        import open_clip
    except Exception as exc:  # noqa: BLE001 - a broken torchvision raises RuntimeError, not ImportError
        if os.environ.get("XCENT_REQUIRE_OPEN_CLIP") == "1":
            pytest.fail(f"XCENT_REQUIRE_OPEN_CLIP=1 but open_clip cannot be imported: {exc}")
        pytest.skip(f"open_clip not importable here ({' '.join(str(exc).split())[:120]})")
    return open_clip


@pytest.fixture(autouse=True, scope="module")
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


def jpeg_bytes(rng: np.random.Generator, width: int, height: int) -> bytes:
    # smooth images (a gradient plus noise): bicubic resizing has something to do
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def treeoflife(root, rng, num_images: int, shards: int = 2) -> dict:
    """TreeOfLife-10M-style shards (``<treeoflife_id>.jpg`` + ``.txt`` caption) and the
    catalog CSV that ``--metadata-path`` reads, with ids in random catalog order and
    one catalog row that no shard holds."""
    species = ["Quercus robur", "Apis mellifera", "Bufo bufo", "Zea mays"]
    ids = [f"{rng.integers(1 << 62):016x}-{i}" for i in range(num_images + 1)]
    catalog_species = [species[int(rng.integers(len(species)))] for _ in ids]
    with open(root / "catalog.csv", "w", newline="", encoding="utf-8") as handle:
        handle.write("treeoflife_id,eol_content_id,kingdom,species,common\n")
        for tid, sp in zip(ids, catalog_species):
            handle.write(f'{tid},{rng.integers(10**6)},Plantae,{sp},"common, name"\n')
    sizes = [(int(rng.integers(60, 300)), int(rng.integers(60, 300))) for _ in ids]
    images = {tid: jpeg_bytes(rng, w, h) for tid, (w, h) in zip(ids, sizes)}
    shown = ids[:-1]  # the last catalog row is never seen: it stays uncached
    per_shard = -(-len(shown) // shards)
    for s in range(shards):
        with tarfile.open(root / f"tol-{s:06d}.tar", "w") as tar:
            for tid in shown[s * per_shard : (s + 1) * per_shard]:
                for ext, data in (("jpg", images[tid]), ("txt", b"a photo of a living thing")):
                    info = tarfile.TarInfo(f"{tid}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return {
        "ids": ids,
        "species": catalog_species,
        "images": images,
        "url": str(root / f"tol-{{{0:06d}..{shards - 1:06d}}}.tar"),
        "catalog": str(root / "catalog.csv"),
    }


def save_random_open_clip(open_clip, model_name: str, path) -> None:
    """A randomly initialised open_clip model saved as an open_clip checkpoint file."""
    torch.manual_seed(0)
    model = open_clip.create_model(model_name)
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, path)


def reference_features(open_clip, model_name: str, checkpoint, jpegs: list[bytes]) -> np.ndarray:
    """open_clip's own pipeline: its transforms, ``encode_image``, then L2-normalise."""
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint))
    model.eval()
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(io.BytesIO(data))) for data in jpegs])
        features = model.encode_image(images)
    return (features / features.norm(dim=-1, keepdim=True)).numpy()


def check_extraction(out_dir, data: dict, expected: np.ndarray, feature_dim: int) -> None:
    features = np.load(out_dir / "features.npy")
    labels = np.load(out_dir / "labels.npy")
    is_cached = np.load(out_dir / "is_cached.npy")
    num_images = len(data["ids"]) - 1
    assert features.shape == (num_images + 1, feature_dim)
    np.testing.assert_array_equal(np.flatnonzero(is_cached), np.arange(num_images))
    sorted_species = sorted(set(data["species"]))
    assert (out_dir / "classes.txt").read_text().splitlines() == sorted_species
    for row in range(num_images):
        assert sorted_species[labels[row]] == data["species"][row], row
        np.testing.assert_allclose(features[row], expected[row], rtol=0, atol=1e-5, err_msg=f"row {row}")
    assert not features[num_images].any()
    assert json.loads((out_dir / "extract.json").read_text())["last_run"]["num_errors"] == 0


def test_bioclip_vit_b16_matches_open_clip(tmp_path, capsys):
    """The BioCLIP architecture itself, with random weights from a checkpoint file."""
    open_clip = open_clip_or_skip()
    data = treeoflife(tmp_path, np.random.default_rng(0), num_images=4)
    checkpoint = tmp_path / "bioclip_random.pt"
    save_random_open_clip(open_clip, "ViT-B-16", checkpoint)
    out_dir = tmp_path / "out"
    code = xcent_main([
        "extract", "--data", "treeoflife10m", "--arch", "bioclip", "--data-url", data["url"],
        "--metadata-path", data["catalog"], "--pretrained-path", str(checkpoint), "--feature-dim", "512",
        "--data-size", str(len(data["ids"])), "--batch-size", "3", "--workers", "0", "--device", "cpu",
        "--out-dir", str(out_dir),
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    expected = reference_features(open_clip, "ViT-B-16", checkpoint, [data["images"][i] for i in data["ids"][:-1]])
    check_extraction(out_dir, data, expected, 512)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    open_clip = open_clip_or_skip()
    root = tmp_path_factory.mktemp("tiny_vit")
    (root / f"{TINY_VIT}.json").write_text(json.dumps(TINY_VIT_CONFIG))
    open_clip.add_model_config(str(root / f"{TINY_VIT}.json"))
    backbones.register_arch("openclip_tiny", backbones.open_clip_builder(TINY_VIT))
    save_random_open_clip(open_clip, TINY_VIT, root / "tiny.pt")
    yield open_clip, root / "tiny.pt"
    backbones.ARCHS.pop("openclip_tiny", None)


@pytest.mark.parametrize("batch_size,workers", [(5, 0), (16, 2)])
def test_small_open_clip_many_images(tiny_vit, tmp_path, capsys, batch_size, workers):
    """The same pipeline on a small open_clip ViT: more images, batches that do not
    divide them, data-loader workers."""
    open_clip, checkpoint = tiny_vit
    data = treeoflife(tmp_path, np.random.default_rng(1), num_images=23, shards=3)
    out_dir = tmp_path / "out"
    code = xcent_main([
        "extract", "--data", "treeoflife10m", "--arch", "openclip_tiny", "--data-url", data["url"],
        "--metadata-path", data["catalog"], "--pretrained-path", str(checkpoint), "--feature-dim", "32",
        "--data-size", str(len(data["ids"])), "--batch-size", str(batch_size), "--workers", str(workers),
        "--device", "cpu", "--out-dir", str(out_dir),
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    expected = reference_features(open_clip, TINY_VIT, checkpoint, [data["images"][i] for i in data["ids"][:-1]])
    check_extraction(out_dir, data, expected, 32)


def test_missing_open_clip_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """Without an importable open_clip, ``--arch bioclip`` exits 2 with one line that
    names the fix, and writes nothing."""
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    data = treeoflife(tmp_path, np.random.default_rng(2), num_images=2, shards=1)
    (tmp_path / "weights.pt").write_bytes(b"never read")
    out_dir = tmp_path / "out"
    code = xcent_main([
        "extract", "--data", "treeoflife10m", "--data-url", data["url"], "--metadata-path", data["catalog"],
        "--pretrained-path", str(tmp_path / "weights.pt"), "--data-size", "3", "--out-dir", str(out_dir),
    ])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("xcent extract: error: --arch bioclip needs open_clip")
    assert "pip install" in err[0] and "xcent[extract]" in err[0] and "torchvision" in err[0]
    assert not out_dir.exists()
