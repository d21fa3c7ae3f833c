"""End to end: ``xcent synth`` + one epoch of ``xcent train``, wall time split into
training, evaluation and the rest (start-up, loading and validating the data,
checkpoints).

    python benchmarks/end_to_end.py             # 36,023 classes, 200,000 rows: ~2 minutes
    python benchmarks/end_to_end.py --full      # Glint360K shape: 360,232 classes, 2,000,000 rows

The data is synthetic (``xcent synth``, long-tailed, float16, 512-d) with val and test
splits of 0.5% each; the trainer evaluates the initial model (epoch 0) and the model
after the epoch (val, test when val improves, and ``--train-eval-size`` training rows),
all with full-softmax CE over every class.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as cm  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=36_023)
    p.add_argument("--rows", type=int, default=200_000, help="training rows")
    p.add_argument("--dim", type=int, default=cm.FEATURE_DIM)
    p.add_argument("--held-fraction", type=float, default=0.005, help="val and test fraction each")
    p.add_argument("--train-eval-size", type=int, default=10_000)
    p.add_argument("--algorithm", default="scent")
    p.add_argument("--full", action="store_true", help="360,232 classes, 2,000,000 training rows")
    p.add_argument("--tmp", default=None)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the children")
    a = p.parse_args(argv)
    if a.full:
        a.classes, a.rows = cm.GLINT_CLASSES, 2_000_000
    env = cm.child_env("end_to_end.py", argv, a.threads)
    total = round(a.rows / (1 - 2 * a.held_fraction))
    with cm.temp_dir(base=a.tmp) as tmp:
        cm.check_disk(tmp, total * a.dim * 2)
        data = tmp / "data"
        synth = cm.run_watched([sys.executable, "-m", "xcent", "synth", "--out", str(data), "--num-classes",
                                str(a.classes), "--feature-dim", str(a.dim), "--num-samples", str(total),
                                "--val-fraction", str(a.held_fraction), "--test-fraction", str(a.held_fraction),
                                "--dtype", "float16"], env=env)
        if synth["returncode"] != 0:
            print(synth["output"][-3000:])
            raise SystemExit("xcent synth failed")
        print(synth["output"].strip().splitlines()[0])
        train = cm.run_watched([sys.executable, "-m", "xcent", "train", "--data-dir", str(data), "--out-dir",
                                str(tmp / "out"), "--algorithm", a.algorithm, "--epochs", "1", "--device", "cpu",
                                "--train-eval-size", str(a.train_eval_size), "--name", "e2e"], env=env)
        if train["returncode"] != 0:
            print(train["output"][-3000:])
            raise SystemExit("xcent train failed")
        recs = cm.read_jsonl(tmp / "out" / "e2e" / "eval_e2e.jsonl")
    training = sum(r.get("epoch_seconds", 0.0) for r in recs)
    evaluation = sum(r.get("eval_seconds", 0.0) for r in recs)
    rest = train["wall"] - training - evaluation
    last = recs[-1]
    held = round(a.held_fraction * total)
    print(f"\n[7] xcent train, 1 epoch of {a.rows:,} rows, {a.classes:,} classes, dim {a.dim}, float16; "
          f"val/test {held:,} rows each, train-eval subset {a.train_eval_size:,}")
    rows = [["training (the epoch's steps)", training, training / train["wall"]],
            ["evaluation (epochs 0 and 1: train subset, val, test)", evaluation, evaluation / train["wall"]],
            ["start-up, data loading and validation, checkpoint (I/O)", rest, rest / train["wall"]],
            ["total xcent train", train["wall"], 1.0],
            ["(xcent synth, writing the data; not part of training)", synth["wall"], "-"]]
    print(cm.table(["phase", "seconds", "share"], rows))
    print(f"training throughput {last.get('samples_per_second', 0):,.0f} samples/s; after 1 epoch: val loss "
          f"{last['val_loss']:.3f}, val top-1 {last['val_acc']:.4f}; peak RSS {cm.gib(train['max_rss'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
