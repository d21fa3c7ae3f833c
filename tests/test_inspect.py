"""The data report (xcent inspect) on a constructed dataset, and the synth shape flags."""

import json

import numpy as np
import pytest

from xcent.cli import main as xcent_main
from xcent.data import load_dataset, synthesize, write_split
from xcent.inspect import data_report, format_report


@pytest.fixture()
def constructed(tmp_path):
    # 6 classes: train counts 1, 2, 3, 5, 9, 0 (class 5 has none); train norms 2 and 4
    y = np.repeat(np.arange(5), [1, 2, 3, 5, 9])
    x = np.zeros((20, 3), dtype=np.float32)
    x[:10, 0] = 2.0
    x[10:, 1] = 4.0
    write_split(tmp_path / "train", x, y)
    # val: classes 0, 5, 5 (5 unseen in train); test: 4, 4, 4, 4
    write_split(tmp_path / "val", np.ones((3, 3), np.float32), np.array([0, 5, 5]))
    write_split(tmp_path / "test", np.ones((4, 3), np.float32), np.array([4, 4, 4, 4]))
    return tmp_path


def test_report_of_constructed_dataset(constructed):
    report = data_report(load_dataset(constructed), sample_rows=0)
    assert report["rows"] == {"train": 20, "val": 3, "test": 4}
    assert report["num_classes"] == 6 and report["feature_dim"] == 3
    rpc = report["train_rows_per_class"]
    assert (rpc["min"], rpc["median"], rpc["max"]) == (1, 3, 9)
    assert rpc["classes_with_rows"] == 5 and rpc["classes_without_rows"] == 1
    assert rpc["classes_below_3_rows"] == 2 and rpc["mean"] == 4.0
    norm = report["feature_norm"]
    assert norm["mean"] == pytest.approx(3.0) and norm["mean_sq"] == pytest.approx(10.0)
    assert norm["std"] == pytest.approx(np.std([2.0] * 10 + [4.0] * 10, ddof=1), rel=1e-6)
    assert report["unseen_in_train"]["val"] == {"classes": 1, "rows": 2, "share_of_rows": pytest.approx(2 / 3)}
    assert report["unseen_in_train"]["test"]["rows"] == 0
    text = "\n".join(report["suggestions"])
    assert "--init class-means" in text and "--lr auto" in text and "never seen" in text
    screen = format_report(report)
    assert len(screen.splitlines()) <= 20 and "median 3" in screen


def test_inspect_command_prints_and_writes_json(constructed, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert xcent_main(["inspect", str(constructed), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "train rows/class" in printed and "suggestions:" in printed
    saved = json.loads(out.read_text())
    assert saved["train_rows_per_class"]["max"] == 9
    assert xcent_main(["inspect", str(tmp_path / "missing")]) == 2


def test_synth_rows_per_class_and_feature_norm(tmp_path):
    info = synthesize(tmp_path / "d", num_classes=40, feature_dim=8, rows_per_class=2.5, feature_norm=25.0,
                      val_fraction=0.1, test_fraction=0.0, seed=3)
    assert info["num_samples"] == 100 and info["train"] == 90
    data = load_dataset(tmp_path / "d", splits=("train", "val"))
    norms = np.linalg.norm(np.asarray(data.train.features), axis=1)
    np.testing.assert_allclose(norms, 25.0, rtol=1e-5)
    assert xcent_main(["synth", "--out", str(tmp_path / "e"), "--num-classes", "10", "--rows-per-class", "0.5"]) == 2
