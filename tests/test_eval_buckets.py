"""`xcent eval` head/torso/tail and macro metrics against a hand computation."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import gamma

from xcent import cli
from xcent.data import load_dataset, synthesize, write_split
from xcent.evaluate import _aggregate, bucket_metrics, class_buckets, evaluate, per_class_stats
from xcent.modelio import FORMAT, save_atomic


def test_class_buckets_by_hand():
    counts = torch.tensor([5, 0, 3, 3, 9, 1, 0, 2])
    # seen classes by count, ties by id: 4 (9), 0 (5), 2 (3), 3 (3), 7 (2), 5 (1)
    b = class_buckets(counts)
    assert {k: v.tolist() for k, v in b.items()} == {"head": [0, 4], "torso": [2, 3], "tail": [5, 7], "unseen": [1, 6]}
    # 7 seen classes: thirds of 3, 2, 2; the tie at count 3 is cut by class id
    b = class_buckets(torch.tensor([3, 3, 3, 3, 1, 1, 2]))
    assert {k: v.tolist() for k, v in b.items()} == {"head": [0, 1, 2], "torso": [3, 6], "tail": [4, 5], "unseen": []}


# Six classes; with W = I (6 x 6) the features are the logits themselves, so every
# number below is a hand computation from these rows.
TRAIN_LABELS = [0, 0, 0, 0, 2, 2, 3, 3, 4, 5, 5, 5, 5, 5, 5]  # counts 4, 0, 2, 2, 1, 6
VAL = [  # (logits, label)
    ([3, 1, 0, 0, 0, 0], 0),  # top-1 right
    ([1, 2, 0, 0, 0, 0], 0),  # rank 1: top-1 wrong, top-5 right
    ([0, 0, 0, 0, 0, 2], 5),  # right
    ([0, 0, 1, 3, 0, 0], 2),  # rank 1
    ([0, 0, 0, 2, 0, 0], 3),  # right
    ([1, 1, 1, 1, 0, 1], 4),  # rank 5: top-5 wrong
    ([0, 4, 0, 0, 0, 0], 1),  # right, a class never seen in training
]


#: how far a float32 CE of these rows (logits 0..4, 6 classes; W = I, so the scores
#: are exact) can be from the exact one: the log-sum-exp's shift, 6 exponentials, their
#: sum and the log each round once (gamma_{6 + 4}, relative to the largest logit plus
#: the log of C); the mean over rows adds gamma_7
LOSS_TOL = (gamma(10) + gamma(7)) * (4 + math.log(6))


def assert_close_nested(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_close_nested(a[key], b[key])
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=0, abs=2 * LOSS_TOL)  # two evaluations, each within LOSS_TOL
    else:
        assert a == b


def ce(logits, label):
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


@pytest.fixture
def crafted(tmp_path):
    data = tmp_path / "data"
    write_split(data / "train", np.zeros((len(TRAIN_LABELS), 6), np.float32), np.array(TRAIN_LABELS))
    write_split(data / "val", np.array([v for v, _ in VAL], np.float32), np.array([y for _, y in VAL]))
    ckpt = tmp_path / "ckpt.pt"
    save_atomic({"format": FORMAT, "weight": torch.eye(6), "epoch": 4, "algorithm": "scent", "num_classes": 6,
                 "feature_dim": 6, "config": {"data_dir": str(data)}}, ckpt)
    return data, ckpt


def test_eval_buckets_and_macro_equal_hand_computation(crafted, capsys):
    data, ckpt = crafted
    capsys.readouterr()
    # --json alone and --json true (the trainer issue's spelling) both work
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--data-dir", str(data), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--data-dir", str(data), "--json", "true",
                     "--class-chunk", "4", "--chunk-rows", "3"]) == 0
    assert_close_nested(json.loads(capsys.readouterr().out), m)  # other chunking: float32 sums differ in ulps
    losses = [ce(v, y) for v, y in VAL]

    assert m["epoch"] == 4 and m["num_rows"] == 7 and m["num_classes_evaluated"] == 6
    assert m["top1"] == pytest.approx(4 / 7) and m["top5"] == pytest.approx(6 / 7)
    assert m["loss"] == pytest.approx(sum(losses) / 7, rel=0, abs=LOSS_TOL)
    # per-class top-1: class 0 1/2, 1 1, 2 0, 3 1, 4 0, 5 1
    assert m["macro_top1"] == pytest.approx(3.5 / 6)
    assert m["macro_top5"] == pytest.approx(5 / 6)

    b = m["buckets"]
    assert set(b) == {"head", "torso", "tail", "unseen"}
    # train counts 5:6, 0:4 | 2:2, 3:2 | 4:1 ; unseen: 1
    assert (b["head"]["num_classes"], b["head"]["train_count_min"], b["head"]["train_count_max"]) == (2, 4, 6)
    assert (b["torso"]["num_classes"], b["tail"]["num_classes"], b["unseen"]["num_classes"]) == (2, 1, 1)
    head, torso, tail, unseen = b["head"], b["torso"], b["tail"], b["unseen"]
    assert head["num_rows"] == 3 and head["top1"] == pytest.approx(2 / 3) and head["top5"] == 1.0
    assert head["macro_top1"] == pytest.approx((1 / 2 + 1) / 2)
    assert head["loss"] == pytest.approx(sum(losses[:3]) / 3, rel=0, abs=LOSS_TOL)
    assert torso["num_rows"] == 2 and torso["top1"] == 0.5 and torso["macro_top1"] == 0.5
    assert torso["loss"] == pytest.approx((losses[3] + losses[4]) / 2, rel=0, abs=LOSS_TOL)
    assert tail["num_rows"] == 1 and tail["top1"] == 0.0 and tail["top5"] == 0.0
    assert tail["loss"] == pytest.approx(losses[5], rel=0, abs=LOSS_TOL)
    assert unseen["num_rows"] == 1 and unseen["top1"] == 1.0
    assert unseen["loss"] == pytest.approx(losses[6], rel=0, abs=LOSS_TOL)


def test_eval_text_output_and_no_train_split(crafted, tmp_path, capsys):
    data, ckpt = crafted
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--data-dir", str(data)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("val: loss") and "macro-top1 0.5833" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == ["head", "torso", "tail", "unseen"]
    assert lines[3].split()[:4] == ["torso", "2", "2..2", "2"]
    # without a train split there is no breakdown, but the overall numbers are unchanged
    shutil.rmtree(data / "train")
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--data-dir", str(data), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert "buckets" not in m and m["top1"] == pytest.approx(4 / 7)


def test_eval_rejects_train_labels_out_of_range(crafted, capsys):
    data, ckpt = crafted
    write_split(data / "train", np.zeros((2, 6), np.float32), np.array([0, 6]))
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--data-dir", str(data)]) == 2
    assert "train label 6" in capsys.readouterr().err


def test_per_class_sums_agree_with_evaluate_and_with_the_buckets(tmp_path):
    """The aggregates the trainer logs (evaluate) and those xcent eval prints come
    from the same per-row numbers; buckets partition the rows."""
    synthesize(tmp_path, num_classes=30, feature_dim=8, num_samples=600, seed=2)
    data = load_dataset(tmp_path)
    weight = torch.randn(30, 8, generator=torch.Generator().manual_seed(0)) * 3
    val = data.splits["val"]
    stats = per_class_stats(val, weight, chunk_rows=7, class_chunk=11)
    overall, direct = _aggregate(stats), evaluate(val, weight, chunk_rows=7, class_chunk=11)
    assert overall["num_rows"] == direct["num_rows"]
    assert (overall["top1"], overall["top5"]) == (direct["top1"], direct["top5"])
    # the same float32 per-row losses (same kernel, same chunks), summed in float64 in
    # another grouping: 1e-9 is far above float64's gamma_N (N < 100 rows)
    assert overall["loss"] == pytest.approx(direct["loss"], rel=1e-9)
    counts = torch.bincount(data.train.labels, minlength=30)
    buckets = bucket_metrics(stats, counts)
    assert sum(b["num_rows"] for b in buckets.values()) == overall["num_rows"]
    assert sum(b["num_classes"] for b in buckets.values()) == 30
    assert sum(b["top1"] * b["num_rows"] for b in buckets.values() if b["num_rows"]) == pytest.approx(
        overall["top1"] * overall["num_rows"])
    # brute force macro top-1 from a dense (N, C) score matrix
    scores = torch.from_numpy(np.array(val.features)) @ weight.T
    hit = (scores.argmax(1) == val.labels).double()
    per_class = [float(hit[val.labels == c].mean()) for c in torch.unique(val.labels).tolist()]
    assert overall["macro_top1"] == pytest.approx(sum(per_class) / len(per_class))


@pytest.mark.parametrize("kind", ["zero", "constant"])
def test_ties_count_against_the_model_in_eval_and_training_evaluation(kind, tmp_path, capsys):
    """An all-zero or all-equal-rows weight ranks every class equal: nothing is right
    (it used to score top-1 1.000), in xcent eval and in the trainer's evaluate."""
    synthesize(tmp_path / "data", num_classes=30, feature_dim=8, num_samples=600, seed=2)
    data = load_dataset(tmp_path / "data")
    row = torch.randn(1, 8, generator=torch.Generator().manual_seed(1))
    weight = torch.zeros(30, 8) if kind == "zero" else row.expand(30, 8).contiguous()
    val = data.splits["val"]
    m = evaluate(val, weight, chunk_rows=13, class_chunk=7)
    assert (m["top1"], m["top5"]) == (0.0, 0.0)
    # every score is the same dot product, summed in other orders by the GEMMs of other
    # chunk widths: within 2 gamma_8 |x| |w| of each other, plus the log-sum-exp's rounding
    x_norm = float(torch.from_numpy(np.array(val.features)).norm(dim=1).max())
    tol = 2 * gamma(8) * x_norm * float(row.norm()) + gamma(30 + 4) * math.log(30)
    assert m["loss"] == pytest.approx(math.log(30), rel=0, abs=tol)
    ckpt = tmp_path / "w.pt"
    save_atomic({"format": FORMAT, "weight": weight, "epoch": 0, "algorithm": "scent", "num_classes": 30,
                 "feature_dim": 8, "config": {}}, ckpt)
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--data-dir", str(tmp_path / "data"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["top1"], got["top5"], got["macro_top1"]) == (0.0, 0.0, 0.0)


def test_rows_with_nan_features_are_wrong_in_eval_and_training_evaluation(tmp_path, capsys):
    """A val row whose features hold NaN (let through by --no-check-features) has no
    ranking: it is wrong at every k. NaN compares false, so it used to have rank 0 and
    count as right, and --best-by val_acc followed an inflated number."""
    from conftest import read_jsonl

    from xcent.modelio import load

    synthesize(tmp_path / "data", num_classes=30, feature_dim=8, num_samples=600, seed=2)
    feats = np.load(tmp_path / "data" / "val" / "features.npy", mmap_mode="r+")
    poisoned = [0, 5, 9]
    feats[poisoned, 3] = np.nan
    feats.flush()
    del feats
    data = load_dataset(tmp_path / "data", check_features=False)
    val = data.splits["val"]
    n = val.num_samples
    clean = torch.tensor([i for i in range(n) if i not in poisoned])
    weight = torch.zeros(30, 8).index_add_(0, data.train.labels, torch.from_numpy(np.array(data.train.features)))
    m, m_clean = evaluate(val, weight, chunk_rows=4), evaluate(val, weight, rows=clean)
    assert m_clean["top1"] > 0.2  # many clean rows are right (chance: 1 in 30)
    for k in ("top1", "top5"):  # the poisoned rows add rows, never hits
        assert round(m[k] * n) == round(m_clean[k] * (n - len(poisoned)))
    assert math.isnan(m["loss"])
    stats = per_class_stats(val, weight)
    assert int(stats["correct5"].sum()) == round(m_clean["top5"] * (n - len(poisoned)))
    # the trainer's val figures: the same rule
    assert cli.main(["train", "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"),
                     "--name", "nan", "--epochs", "1", "--batch-size", "64", "--lr", "1.0", "--init", "random",
                     "--no-check-features"]) == 0
    record = read_jsonl(tmp_path / "out" / "nan" / "eval_nan.jsonl")[-1]
    trained = load(tmp_path / "out" / "nan" / "checkpoints" / "epoch_1.pt", resume=False)["weight"]
    want = evaluate(val, trained, rows=clean)
    assert round(record["val_acc"] * n) == round(want["top1"] * (n - len(poisoned)))
