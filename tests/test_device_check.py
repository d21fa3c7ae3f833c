"""benchmarks/device_check.sh, the one device-check command, end to end at its smallest
size on the CPU (--quick): every part runs and lands in the table and the JSON."""

import json
import os
import subprocess
from pathlib import Path

import torch

from xcent.losses import ALGORITHMS

ROOT = Path(__file__).resolve().parent.parent


def test_device_check_runs_every_part_and_writes_the_table_as_json(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), str(tmp_path / "out"),
                           "--device", "cpu", "--skip-tests", "--quick"],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert report["device"] == "CPU" and report["torch"] == torch.__version__
    steps = [r for r in report["rows"] if r["part"] == "train step"]
    precisions = {r["precision"] for r in steps}
    assert "fp32" in precisions
    # every algorithm at every batch size and precision, with a positive speed
    assert sorted((r["algorithm"], r["precision"]) for r in steps) == sorted(
        (name, p) for name in ALGORITHMS for p in precisions)
    assert all(r["batch_size"] == 128 and r["samples_per_second"] > 0 for r in steps)
    evaluation = [r for r in report["rows"] if r["part"] == "evaluation"]
    assert len(evaluation) == 1 and evaluation[0]["rows"] == 256 and evaluation[0]["seconds"] > 0
    epoch = [r for r in report["rows"] if r["part"] == "xcent train, 1 epoch"]
    assert len(epoch) == 1 and "error" not in epoch[0] and epoch[0]["samples_per_second"] > 0
    assert epoch[0]["val_loss"] > 0
    # the printed table has one line per row of the JSON
    table = proc.stdout[proc.stdout.index("device check: CPU"):]
    assert sum(line.startswith("|") for line in table.splitlines()) == len(report["rows"]) + 2
