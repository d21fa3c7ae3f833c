"""Quality after a small budget: tuned defaults vs --lr auto vs --init class-means vs both vs an lr grid.

On generated data shapes that differ the way real data do (feature norm 1 vs 25,
about 3 vs about 40 rows per class, noise low vs high; 60,000 rows each, so 54,000
training rows: 20,000 classes at 3 rows per class, like the text-embedding case of
issue 14 scaled down, 1,500 at 40, Glint-like; the same shapes as ``xcent synth
--num-classes C --rows-per-class R --feature-norm F --noise N``), every variant trains
scent for ``--epochs`` (3) epochs through ``xcent.train`` and reports the val CE and
top-1 of the last epoch:

  (a) random        --init random, the tuned lr (the reference implementation's start)
  (b) lr auto       --init random --lr auto
  (c) class means   --init class-means, the tuned lr
  (d) both          --init class-means --lr auto
  (e) oracle        --init random, the best val CE over an lr grid (10^(k/2) around
                    the data-scaled guess), i.e. what a user's grid search would find

plus the untrained model (log C, what the random start scores) and the class-mean classifier alone (epoch 0 of
(c)). The bar (issue 14): (d) gains at least 90% of the oracle's CE improvement over
the untrained model on every shape, and is never worse than the class-mean
classifier alone. A diverged run counts as CE = inf. The cost of ``--lr auto``: the
search's training rows (exact, from ``lr_search.jsonl``) and training seconds as a
share of one epoch's (the issue's bound: 20%), its scoring seconds apart.

    python benchmarks/quality.py --threads 1            # four shapes, about 8 minutes on a shared 2-core machine
    python benchmarks/quality.py --threads 1 --demo     # also xcent demo's data (a few minutes more)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_common_args, setup, table, temp_dir, verdict  # noqa: E402

from xcent.cli.train import DEMO_DATA  # noqa: E402
from xcent.config import config_from_argv  # noqa: E402
from xcent.data import synthesize  # noqa: E402
from xcent.errors import DivergenceError  # noqa: E402
from xcent.losses import DEFAULTS  # noqa: E402
from xcent.lr_search import SAFETY  # noqa: E402
from xcent.train import train  # noqa: E402

#: name -> xcent.data.synthesize arguments (val 10%, no test: more val rows per class)
SHAPES = {
    "unit, 3 rows/class, low noise (text-like)": {"num_classes": 20_000, "rows_per_class": 3, "noise": 1.0},
    "norm 25, 40 rows/class, high noise (face-like)": {"num_classes": 1500, "rows_per_class": 40, "noise": 2.0,
                                                           "feature_norm": 25.0},
    "unit, 40 rows/class, high noise": {"num_classes": 1500, "rows_per_class": 40, "noise": 2.0},
    "norm 25, 3 rows/class, low noise": {"num_classes": 20_000, "rows_per_class": 3, "noise": 1.0,
                                         "feature_norm": 25.0},
}
COMMON = {"feature_dim": 64, "val_fraction": 0.1, "test_fraction": 0.0, "seed": 1}


def run(data_dir: Path, out: Path, name: str, epochs: int, *extra) -> dict:
    argv = ["--data-dir", str(data_dir), "--out-dir", str(out), "--name", name, "--epochs", str(epochs),
            "--overwrite", "true", "--train-eval-size", "5000", "--save-frequency", str(epochs), *map(str, extra)]
    start = time.perf_counter()
    diverged = False
    try:
        train(config_from_argv(argv), echo=lambda *_: None)
    except DivergenceError:
        diverged = True
    records = [json.loads(line) for line in (out / name / f"eval_{name}.jsonl").read_text().splitlines()]
    last = records[-1]
    result = {"val_loss": math.inf if diverged else last["val_loss"], "val_acc": 0.0 if diverged else last["val_acc"],
              "epoch0_val_loss": records[0]["val_loss"], "epoch0_val_acc": records[0]["val_acc"],
              "best_val_loss": min(r["val_loss"] for r in records), "diverged": diverged,
              "epoch_seconds": records[1]["epoch_seconds"] if len(records) > 1 else math.nan,
              "seconds": time.perf_counter() - start}
    search = out / name / "lr_search.jsonl"
    if search.exists():
        chosen = [json.loads(line) for line in search.read_text().splitlines()][-1]
        result.update(lr=chosen["lr"], rule=chosen["rule"], search_train_seconds=chosen["train_seconds"],
                      search_eval_seconds=chosen["eval_seconds"], search_rows=chosen["rows_trained"],
                      epoch_rows=chosen["num_samples"], search_epoch_share=chosen["epoch_share"])
    return result


def bench_shape(name: str, data_dir: Path, out: Path, epochs: int) -> dict:
    tuned = DEFAULTS["scent"]["lr"]
    res = {"a": run(data_dir, out, "a", epochs, "--init", "random"),
           "b": run(data_dir, out, "b", epochs, "--init", "random", "--lr", "auto"),
           "c": run(data_dir, out, "c", epochs, "--init", "class-means"),
           "d": run(data_dir, out, "d", epochs, "--init", "class-means", "--lr", "auto")}
    guess = res["b"].get("lr", tuned) * SAFETY  # the search's best candidate (the choice is one step below)
    grid = {}
    for k in range(-5, 3):
        lr = guess * 10 ** (k / 2)
        grid[lr] = run(data_dir, out, f"e{k}", epochs, "--init", "random", "--lr", lr)
    best_lr = min(grid, key=lambda lr: grid[lr]["val_loss"])
    res["e"] = dict(grid[best_lr], lr=best_lr)
    res["grid"] = {f"{lr:.4g}": r["val_loss"] for lr, r in grid.items()}
    num_classes = SHAPES.get(name, DEMO_DATA)["num_classes"]
    res["untrained"] = math.log(num_classes)  # N(0, 0.01^2) weights: val CE log C to 3 decimals
    res["class_means_alone"] = res["c"]["epoch0_val_loss"]
    gain_oracle = res["untrained"] - res["e"]["val_loss"]
    gain_d = res["untrained"] - res["d"]["val_loss"]
    res["d_share_of_oracle_gain"] = gain_d / gain_oracle if gain_oracle > 0 else math.inf
    res["met_90"] = gain_d >= 0.9 * gain_oracle
    res["met_not_worse_than_class_means"] = res["d"]["val_loss"] <= res["class_means_alone"] + 1e-9
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--demo", action="store_true", help="also xcent demo's data (2,000 classes, 100,000 rows)")
    p.add_argument("--json", type=str, default=None, help="write all results as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the generated data and runs")
    a = p.parse_args()
    setup(a)
    shapes = dict(SHAPES)
    results = {}
    with temp_dir("xcent-quality-", keep=a.keep) as root:
        if a.demo:
            shapes["xcent demo's data"] = None
        for name, params in shapes.items():
            data_dir = root / f"data{len(results)}"
            if params is None:
                synthesize(data_dir, **DEMO_DATA)
            else:
                synthesize(data_dir, **COMMON, **params)
            start = time.perf_counter()
            results[name] = bench_shape(name, data_dir, root / f"runs{len(results)}", a.epochs)
            print(f"{name}: {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    rows = []
    for name, r in results.items():
        ce = {key: r[key]["val_loss"] for key in "abcde"}
        rows.append([name, r["untrained"], r["class_means_alone"], ce["a"], ce["b"], ce["c"], ce["d"], ce["e"],
                     f"{r['e']['lr']:.3g}", f"{r['d_share_of_oracle_gain']:.0%}",
                     verdict(r["met_90"] and r["met_not_worse_than_class_means"])])
    print(table(["shape", "untrained", "class means alone", "(a) random, tuned lr", "(b) lr auto", "(c) class means",
                 "(d) both", "(e) oracle", "oracle lr", "(d) share of oracle gain", "bar"], rows,
                title=f"val CE after {a.epochs} epochs (scent, batch 128; diverged = inf)"))
    rows = [[name, r["a"]["val_acc"], r["b"]["val_acc"], r["c"]["epoch0_val_acc"], r["c"]["val_acc"],
             r["d"]["val_acc"], r["e"]["val_acc"]] for name, r in results.items()]
    print(table(["shape", "(a)", "(b)", "class means alone", "(c)", "(d)", "(e)"], rows, title="val top-1"))
    rows = []
    for name, r in results.items():
        for key in ("b", "d"):
            s = r[key]
            if "search_rows" in s:
                train_s, epoch_s = s["search_train_seconds"], s["epoch_seconds"]
                rows.append([name, key, f"{s['lr']:.4g}", s["rule"], f"{s['search_rows']:,} / {s['epoch_rows']:,}",
                             f"{s['search_epoch_share']:.3f}", f"{train_s:.2f} / {epoch_s:.2f}",
                             f"{train_s / epoch_s:.3f}", f"{s['search_eval_seconds']:.2f}"])
    print(table(["shape", "run", "chosen lr", "rule", "search rows / epoch rows", "share", "search s / epoch s",
                 "share", "scoring s"], rows, title="--lr auto cost (training of the search vs one epoch's training)"))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
