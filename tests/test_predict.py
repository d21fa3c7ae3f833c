"""Prediction, export and the Python API against a brute-force dense softmax."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from conftest import AllocationRecorder, gamma

import xcent
from xcent import cli
from xcent.classifier import scan_classes
from xcent.data import synthesize
from xcent.modelio import FORMAT, load_model, save_atomic
from xcent.modelio import load as load_ckpt
from xcent.predict import Classifier, _write_atomic

C, D = 40, 12


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 1-epoch training run through the CLI on synthetic data (the shared one
    for the CLI tests below)."""
    root = tmp_path_factory.mktemp("predict")
    data = root / "data"
    synthesize(data, num_classes=C, feature_dim=D, num_samples=800, val_fraction=0.1, test_fraction=0.1, seed=3)
    assert cli.main(["train", "--data-dir", str(data), "--out-dir", str(root / "out"), "--name", "n",
                     "--epochs", "1", "--batch-size", "64"]) == 0
    return {"root": root, "data": data, "ckpt": root / "out" / "n" / "checkpoints" / "epoch_1.pt"}


def dense(features, weight):
    """The obvious twin: the full (N, C) float64 softmax."""
    return torch.softmax(torch.as_tensor(np.asarray(features), dtype=torch.float64) @ weight.double().T, dim=1)


def log_prob_tol(features, weight) -> float:
    """How far a float32 log-probability ``s_c - lse`` can be from the float64 one: each
    score is within gamma_D |x| |w| of exact (any summation order), the log-sum-exp
    within that plus gamma_{C + 2} (the float32 sum of C exponentials, the log and the
    shift), so the difference within twice the first plus the second."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    score_err = gamma(x.shape[1]) * float(x.norm(dim=1).max()) * float(weight.double().norm(dim=1).max())
    return 2 * score_err + gamma(weight.shape[0] + 2)


def assert_ranked_apart(p, k, tol):
    """The float64 probabilities' top k + 1 are further apart than float32's error can
    move them (relative ``tol``): their order, which the tests compare exactly, is the
    same on any machine. A property of the test data, checked."""
    top = torch.sort(p, dim=1, descending=True).values[:, :k + 1].log()
    assert float((top[:, :-1] - top[:, 1:]).min()) > 2 * tol


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def fail(argv, capsys):
    """Run a command that must fail: exit 2 and a single-line error."""
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1
    return err


@pytest.mark.parametrize("class_chunk", [3, 7, 40, 1000])
def test_topk_scan_equals_dense_softmax(class_chunk):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(C, D, generator=gen, dtype=torch.float64)
    k = 5
    scan = scan_classes(x, weight, k=k, class_chunk=class_chunk)
    scores, ids, lse = scan.top_scores, scan.top_ids, scan.lse
    full = x @ weight.T
    want_vals, want_ids = torch.sort(full, dim=1, descending=True)
    assert torch.equal(ids, want_ids[:, :k])  # chunks smaller than k, uneven last chunk, one chunk
    torch.testing.assert_close(scores, want_vals[:, :k], rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(full, dim=1), rtol=1e-12, atol=1e-12)


def test_classifier_predict_and_log_proba_equal_dense():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(C, D, generator=gen)
    features = (torch.randn(23, D, generator=gen) * 2).numpy()
    clf = Classifier(weight, chunk_rows=5, class_chunk=6)
    ids, probs = clf.predict(features, k=4)
    p = dense(features, weight)
    want_p, want_ids = torch.sort(p, dim=1, descending=True)
    tol = log_prob_tol(features, weight)
    assert_ranked_apart(p, 4, tol)
    assert ids.shape == (23, 4) and torch.equal(ids, want_ids[:, :4])
    # |exp(a) - exp(b)| <= exp(b) (e^|a - b| - 1): relative to the probability
    torch.testing.assert_close(probs.double(), want_p[:, :4], rtol=math.expm1(tol), atol=0)
    torch.testing.assert_close(clf.log_proba(features).double(), p.log(), rtol=0, atol=tol)
    one_ids, one_probs = clf.predict(torch.from_numpy(features[7]), k=4)
    # a 1-row matmul may round differently from a 5-row one: both within tol of exact
    assert torch.equal(one_ids, ids[7]) and torch.allclose(one_probs, probs[7], rtol=math.expm1(2 * tol), atol=0)
    assert clf.names(ids[:2, :2]) == [[str(i) for i in row] for row in ids[:2, :2].tolist()]


def test_predict_memory_is_bounded_by_the_block_not_by_n_or_c():
    num_classes, dim, n, chunk_rows, class_chunk = 2048, 8, 32, 8, 128
    clf = Classifier(torch.randn(num_classes, dim), chunk_rows=chunk_rows, class_chunk=class_chunk)
    x = torch.randn(n, dim)
    with AllocationRecorder() as rec:
        ids, _ = clf.predict(x, k=5)
    # an (N, C) or (chunk_rows, C) score matrix would be 65,536 or 16,384 elements
    assert rec.max_numel <= chunk_rows * class_chunk
    assert torch.equal(ids[:, 0], (x @ clf.weight.T).argmax(dim=1))


def test_cli_predict_jsonl_and_csv_equal_dense_softmax(run, tmp_path, capsys):
    val_feats = run["data"] / "val" / "features.npy"
    feats = np.load(val_feats)
    weight = load_ckpt(run["ckpt"])["weight"]
    want_p, want_ids = torch.sort(dense(feats, weight), dim=1, descending=True)
    out = tmp_path / "p.jsonl"
    assert cli.main(["predict", "--checkpoint", str(run["ckpt"]), "--features", str(val_feats),
                     "--top-k", "3", "--out", str(out), "--chunk-rows", "7", "--class-chunk", "9"]) == 0
    records = read_jsonl(out)
    assert [r["row"] for r in records] == list(range(len(feats)))
    assert [r["ids"] for r in records] == want_ids[:, :3].tolist()
    # names come from DATA_DIR/classes.txt, found through the checkpoint's config
    assert records[0]["names"] == [f"class_{i}" for i in records[0]["ids"]]
    # float32's error, then 7 significant digits in the file (5e-7 relative)
    tol = log_prob_tol(feats, weight)
    assert_ranked_apart(dense(feats, weight), 3, tol)
    np.testing.assert_allclose([r["probs"] for r in records], want_p[:, :3].numpy(), rtol=math.expm1(tol) + 5e-7,
                               atol=0)

    names = tmp_path / "names.txt"
    names.write_text("".join(f"n{c}, \"quoted\"\n" for c in range(C)))
    out_csv = tmp_path / "p.csv"
    assert cli.main(["predict", "--checkpoint", str(run["ckpt"]), "--features", str(val_feats),
                     "--top-k", "2", "--out", str(out_csv), "--label-names", str(names)]) == 0
    rows = list(csv.reader(out_csv.open()))
    assert rows[0] == ["row", "id_1", "name_1", "prob_1", "id_2", "name_2", "prob_2"]
    assert len(rows) == len(feats) + 1
    for r, line in enumerate(rows[1:]):
        assert int(line[1]) == want_ids[r, 0] and int(line[4]) == want_ids[r, 1]
        assert line[2] == f"n{want_ids[r, 0]}, \"quoted\""
        assert float(line[3]) == pytest.approx(float(want_p[r, 0]), rel=math.expm1(tol) + 5e-7)


def test_predict_top_k_hits_equal_eval_accuracy(run, tmp_path, capsys):
    """Counting hits in xcent predict's output gives xcent eval's top-1 and top-5."""
    out = tmp_path / "p.jsonl"
    assert cli.main(["predict", "--checkpoint", str(run["ckpt"]), "--features",
                     str(run["data"] / "val" / "features.npy"), "--top-k", "5", "--out", str(out)]) == 0
    labels = np.load(run["data"] / "val" / "labels.npy")
    ids = [r["ids"] for r in read_jsonl(out)]
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(run["ckpt"]), "--data-dir", str(run["data"]), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    # they agree when no class scores within eval's tie band (2 tau) of a row's true class,
    # which holds for this data (checked): then both orders are the exact one
    weight = load_ckpt(run["ckpt"])["weight"].double()
    x = torch.from_numpy(np.load(run["data"] / "val" / "features.npy")).double()
    scores, y = x @ weight.T, torch.from_numpy(labels).long()[:, None]
    tau = 2 * gamma(D) * x.norm(dim=1) * weight.norm(dim=1).max()
    gaps = (scores - scores.gather(1, y)).abs().scatter_(1, y, float("inf")).min(dim=1).values
    assert bool((gaps > 2 * tau).all())
    assert m["top1"] == pytest.approx(np.mean([r[0] == y for r, y in zip(ids, labels)]))
    assert m["top5"] == pytest.approx(np.mean([y in r for r, y in zip(ids, labels)]))


def test_export_round_trips_bit_for_bit(run, tmp_path, capsys):
    ckpt = load_ckpt(run["ckpt"])
    st = tmp_path / "model.safetensors"
    assert cli.main(["export", "--checkpoint", str(run["ckpt"]), "--out", str(st)]) == 0
    weight, meta = load_model(st)
    assert weight.dtype == ckpt["weight"].dtype and torch.equal(weight, ckpt["weight"])
    assert weight.numpy().tobytes() == ckpt["weight"].numpy().tobytes()
    assert (meta["num_classes"], meta["feature_dim"], meta["algorithm"], meta["epoch"], meta["num_samples"]) == (
        C, D, ckpt["algorithm"], ckpt["epoch"], ckpt["num_samples"])
    assert meta["label_names"] == (run["data"] / "classes.txt").read_text().splitlines()
    # exporting the export gives the same tensors and metadata, byte for byte (the
    # file itself may differ: safetensors does not fix the order of header keys)
    again = tmp_path / "again.safetensors"
    assert cli.main(["export", "--checkpoint", str(st), "--out", str(again)]) == 0
    from safetensors import safe_open
    with safe_open(str(st), "pt") as a, safe_open(str(again), "pt") as b:
        assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys()) == ["label_names", "weight"]
        for key in a.keys():  # noqa: SIM118 - safetensors handles are not dicts
            assert a.get_tensor(key).numpy().tobytes() == b.get_tensor(key).numpy().tobytes()

    # predict and eval accept the export and give the same answers as the checkpoint
    feats = str(run["data"] / "test" / "features.npy")
    for src, name in ((run["ckpt"], "a.jsonl"), (st, "b.jsonl")):
        assert cli.main(["predict", "--checkpoint", str(src), "--features", feats, "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    printed = []
    for src in (run["ckpt"], st):
        capsys.readouterr()
        assert cli.main(["eval", "--checkpoint", str(src), "--data-dir", str(run["data"]), "--json"]) == 0
        printed.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    printed[0].pop("checkpoint"), printed[1].pop("checkpoint")
    assert printed[0] == printed[1]

    clf = xcent.Classifier.load(st)
    assert clf.label_names[5] == "class_5" and clf.num_classes == C and clf.feature_dim == D
    ids, probs = clf.predict(np.load(feats), k=5)
    assert ids.tolist() == [r["ids"] for r in read_jsonl(tmp_path / "b.jsonl")]


def test_bad_inputs_exit_2_with_one_line_and_keep_outputs(run, tmp_path, capsys):
    out = tmp_path / "keep.jsonl"
    previous = '{"row": 0, "ids": [3], "probs": [1.0]}\n'  # an earlier run's output: replaceable
    out.write_text(previous)
    ckpt, base = str(run["ckpt"]), ["--out", str(out)]
    wrong_dim = tmp_path / "wrong.npy"
    np.save(wrong_dim, np.zeros((4, D + 1), dtype=np.float32))
    err = fail(["predict", "--checkpoint", ckpt, "--features", str(wrong_dim), *base], capsys)
    assert "--features" in err and str(wrong_dim) in err and f"{D + 1}" in err and f"{D}" in err

    with_nan = tmp_path / "nan.pt"
    x = torch.randn(10, D)
    x[6, 2] = float("nan")
    torch.save(x, with_nan)
    err = fail(["predict", "--checkpoint", ckpt, "--features", str(with_nan), *base], capsys)
    assert "--features" in err and "row 6" in err

    feats = str(run["data"] / "val" / "features.npy")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint at all" * 10)
    other_dict = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3, 3)}, other_dict)
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(C, D)}, str(foreign))
    for bad in (garbage, other_dict, foreign, tmp_path / "missing.pt"):
        for argv in (["predict", "--features", feats, *base], ["export", "--out", str(tmp_path / "x.safetensors")],
                     ["eval", "--data-dir", str(run["data"])]):
            assert f"--checkpoint {bad}: " in fail([*argv, "--checkpoint", str(bad)], capsys)

    assert "--top-k" in fail(["predict", "--checkpoint", ckpt, "--features", feats, "--top-k", str(C + 1), *base],
                             capsys)
    assert "--out" in fail(["predict", "--checkpoint", ckpt, "--features", feats, "--out", str(tmp_path / "p.txt")],
                           capsys)
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    assert "--label-names" in fail(["predict", "--checkpoint", ckpt, "--features", feats, "--label-names",
                                    str(short), *base], capsys)
    assert out.read_text() == previous
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left
    assert not (tmp_path / "x.safetensors").exists()

    with pytest.raises(xcent.errors.UsageError, match="row 1"):
        Classifier(torch.randn(C, D)).predict(np.array([[0.0] * D, [math.inf] * D], dtype=np.float32))


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    out = tmp_path / "p.jsonl"
    out.write_text("old\n")

    def broken(f):
        f.write("half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write_atomic(out, broken)
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["p.jsonl"]


def test_checkpoint_without_data_dir_has_no_names_and_lazy_import(tmp_path):
    weight = torch.randn(C, D)
    path = tmp_path / "c.pt"
    save_atomic({"format": FORMAT, "weight": weight, "epoch": 2, "algorithm": "sox", "num_classes": C,
                 "feature_dim": D, "config": {}}, path)
    clf = xcent.Classifier.load(path)
    assert clf.label_names is None and clf.meta["epoch"] == 2 and torch.equal(clf.weight, weight)
    names = tmp_path / "classes.txt"
    names.write_text("".join(f"c{c}\n" for c in range(C)))
    assert xcent.Classifier.load(path, label_names=names).names([3, 4]) == ["c3", "c4"]


def test_sharded_checkpoint_directory_loads_and_exports(tmp_path, capsys):
    """A class-sharded run's epoch_K/ (manifest + row shards) reads as one weight."""
    from xcent.modelio import MANIFEST

    weight = torch.randn(C, D)
    ckpt = tmp_path / "epoch_3"
    ckpt.mkdir()
    save_atomic({"weight": weight[:15].clone()}, ckpt / "shard_00000.pt")
    save_atomic({"weight": weight[15:].clone()}, ckpt / "shard_00001.pt")
    save_atomic({"format": FORMAT, "epoch": 3, "algorithm": "scent", "num_classes": C, "feature_dim": D,
                 "config": {}, "shards": [("shard_00000.pt", 0, 15), ("shard_00001.pt", 15, C)]}, ckpt / MANIFEST)
    got, meta = load_model(ckpt)
    assert torch.equal(got, weight) and meta["epoch"] == 3
    st = tmp_path / "m.safetensors"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--out", str(st)]) == 0
    assert torch.equal(load_model(st)[0], weight)
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert f"--checkpoint {empty}: " in fail(["export", "--checkpoint", str(empty), "--out", str(st)], capsys)


def test_scores_that_overflow_are_refused_not_ranked(tmp_path, capsys):
    """Finite features and a finite weight whose products exceed float32 give an inf or
    NaN score, which torch.topk ranks first with probability NaN: refused, naming the
    row (and, in xcent predict, --features), with no output written."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(20, 4, generator=gen)
    x = torch.randn(5, 4, generator=gen)
    x[3] = 3e38  # finite
    clf = Classifier(weight, chunk_rows=2)
    with pytest.raises(xcent.errors.UsageError, match="scores of row 3 are not finite"):
        clf.predict(x, k=3)
    with pytest.raises(xcent.errors.UsageError, match="scores of row 3 are not finite"):
        clf.log_proba(x)
    ids, probs = clf.predict(x[:3], k=3)  # the other rows are fine
    assert bool(torch.isfinite(probs).all())
    ckpt, feats, out = tmp_path / "w.pt", tmp_path / "x.npy", tmp_path / "p.jsonl"
    save_atomic({"format": FORMAT, "weight": weight, "epoch": 0, "algorithm": "scent", "num_classes": 20,
                 "feature_dim": 4, "config": {}}, ckpt)
    np.save(feats, x.numpy())
    capsys.readouterr()
    code = cli.main(["predict", "--checkpoint", str(ckpt), "--features", str(feats), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"--features {feats}: the scores of row 3 are not finite" in err
    assert not out.exists()
