"""Multi-run comparisons: ``xcent compare`` and ``xcent plot``.

``xcent compare`` composes the trainer (:func:`xcent.train.train`) into the paper's
experiment: every (algorithm, grid point, seed) is one ordinary ``xcent train`` run in
``OUT/NAME`` (NAME = ``scent_seed42``, or ``scent_lr5_gamma12_seed42`` on a grid), run
in sequence, in process. Runs are resumable and independent:

* a run whose ``eval_NAME.jsonl`` reaches the last epoch is skipped;
* an interrupted run continues from its latest checkpoint (``--resume latest``);
* a run that raises (divergence, bad data) is recorded in ``OUT/NAME/compare_failed.json``
  and the others go on; a later call reports it again without rerunning it unless
  ``--retry-failed``;
* a run directory whose saved config differs from the planned run is never replaced:
  the command stops with a one-line error before training anything.

On a grid, the point shown for an algorithm is the one with the lowest final val loss
(mean over seeds; points with a failed seed only if every point has one). The results
go to ``OUT/compare.md``, ``OUT/compare.json`` and ``OUT/compare.png`` (+ ``.pdf``),
each written atomically. ``xcent plot`` draws the same figure from existing run
directories, including the seed code's ``eval_NAME.jsonl`` files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError
from .fileio import atomic_path, write_text_atomic
from .losses import ALGORITHMS

#: The paper's legend order, display names and colours (one per algorithm).
ORDER = ("bsgd", "asgd", "softplus", "umax", "sox", "scent")
LABELS = {"bsgd": "BSGD", "asgd": "ASGD", "softplus": "ASGD (Softplus)", "umax": "U-max", "sox": "SOX",
          "scent": "SCENT"}
COLORS = {"bsgd": "#1f77b4", "asgd": "#ff7f0e", "softplus": "#2ca02c", "umax": "#9467bd", "sox": "#8c564b",
          "scent": "#d62728"}
#: Line styles and markers, so that curves lying on top of each other (the ASGD family
#: often does) still show every algorithm.
STYLES = {"bsgd": ("-", "o"), "asgd": ("-", "s"), "softplus": ("--", "^"), "umax": (":", "v"), "sox": ("-", "D"),
          "scent": ("-", "*")}
_EXTRA_COLORS = ("#17becf", "#bcbd22", "#e377c2", "#7f7f7f", "#393b79", "#637939")

#: The hyper-parameters each algorithm actually uses (keys of the resolved train config).
HPARAMS = {"scent": ("lr", "gamma"), "sox": ("lr", "gamma"), "bsgd": ("lr",), "asgd": ("lr", "gamma"),
           "softplus": ("lr", "gamma", "softplus_rho"), "umax": ("lr", "gamma", "umax_delta")}
SHARED_HPARAMS = ("batch_size", "epochs", "warmup_epochs")

#: Train flags that compare sets itself for each run.
MANAGED = {"name": "--algorithms/--grid", "seed": "--seeds", "algorithm": "--algorithms", "resume": "(automatic)",
           "overwrite": "(automatic)", "out_dir": "--out-dir", "data_dir": "--data-dir", "config": "--config"}

#: Config keys that must agree between a planned run and the run already on disk.
_RUN_KEYS = ("algorithm", "seed", "epochs", "lr", "gamma", "batch_size", "warmup_epochs", "softplus_rho",
             "umax_delta", "train_loss", "train_eval_size")
_SHAPE_KEYS = ("num_classes", "feature_dim", "data_size")

#: Per-run metrics: key -> (markdown column, format).
METRICS = {
    "final_train_loss": ("final train loss", ".4f"),
    "final_val_loss": ("final val loss", ".4f"),
    "best_val_loss": ("best val loss", ".4f"),
    "final_val_top1": ("val top-1", ".4f"),
    "final_val_top5": ("val top-5", ".4f"),
    "test_loss": ("test loss @best val", ".4f"),
    "test_top1": ("test top-1 @best val", ".4f"),
    "seconds_per_epoch": ("s/epoch", ".2f"),
}

FAILED_FILE = "compare_failed.json"
FORMAT = "xcent-compare-v1"

#: The ``--demo`` dataset: unit-norm features, about 5,000 classes, long-tailed.
DEMO_DATA = {"num_classes": 5000, "feature_dim": 64, "num_samples": 50_000, "val_fraction": 0.05,
             "test_fraction": 0.05, "seed": 0, "noise": 0.6, "tail_exponent": 0.8, "normalize": True}
DEMO_EPOCHS = 5
DEMO_CACHE = "compare-demo-v1"


# ----------------------------------------------------------------------------- small helpers


def _fmt(value, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _fmt_hp(value) -> str:
    return "-" if value is None else (format(value, "g") if isinstance(value, float) else str(value))


def mean_std(values) -> dict:
    """``{"mean", "std", "n", "values"}`` over the non-None values; ``std`` is the sample
    standard deviation (n - 1), None for fewer than two values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals), "values": vals}


def _fmt_ms(stat: dict, spec: str) -> str:
    if stat["mean"] is None:
        return "-"
    if stat["std"] is None:
        return _fmt(stat["mean"], spec)
    return f"{_fmt(stat['mean'], spec)} ± {_fmt(stat['std'], spec)}"


def read_records(path: Path) -> list[dict]:
    """The JSON lines of an ``eval_NAME.jsonl`` file (blank lines ignored)."""
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"{path}: cannot be read ({exc.strerror or exc})")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{path}: line {i} is not JSON")
        if not isinstance(record, dict) or "epoch" not in record:
            raise UsageError(f"{path}: line {i} has no 'epoch' key")
        records.append(record)
    return records


def run_metrics(records: list[dict]) -> dict:
    """The per-run numbers of the tables, straight from its JSONL records.

    Final values are those of the last record; ``best_val_loss`` is the lowest val loss
    of any epoch (epoch 0 included); the test numbers are those the trainer measured at
    the epoch of best val top-1 (``best_test_loss``/``best_test_acc``), which is
    ``best_val_epoch``; ``seconds_per_epoch`` is the mean training time of epochs >= 1."""
    last = records[-1]
    val_losses = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    best_acc = last.get("best_val_acc")
    best_epoch = next((r["epoch"] for r in records if best_acc is not None and r.get("val_acc") == best_acc), None)
    seconds = [r["epoch_seconds"] for r in records if r["epoch"] >= 1 and r.get("epoch_seconds") is not None]
    return {
        "epochs": last["epoch"],
        "final_train_loss": last.get("train_loss"),
        "final_val_loss": last.get("val_loss"),
        "best_val_loss": min(val_losses) if val_losses else None,
        "final_val_top1": last.get("val_acc"),
        "final_val_top5": last.get("val_top5"),
        "best_val_epoch": best_epoch,
        "test_loss": last.get("best_test_loss"),
        "test_top1": last.get("best_test_acc"),
        "seconds_per_epoch": statistics.fmean(seconds) if seconds else None,
    }


# ----------------------------------------------------------------------------- the figure


def infer_algorithm(*names: str) -> str | None:
    """The algorithm a run name refers to (``glint360k_scent`` -> ``scent``), or None.
    Tokens are checked most specific first, so ``asgd_softplus`` is softplus."""
    tokens = set()
    for name in names:
        tokens.update(t for t in re.split(r"[^a-z0-9]+", name.lower()) if t)
        tokens.update(t.replace("-", "") for t in re.split(r"[^a-z0-9-]+", name.lower()) if t)
    for algo in ("softplus", "umax", "scent", "sox", "bsgd", "asgd"):
        if algo in tokens:
            return algo
    return None


@dataclass
class Curve:
    """The runs (seeds) of one line of the figure."""

    key: str
    label: str
    color: str
    runs: list[list[dict]] = field(default_factory=list)
    failed: bool = False  # drawn from failed runs only (dashed)


def _band(runs: list[list[dict]], key: str):
    """Epochs, mean, min and max of ``key`` over the runs that have a finite value."""
    by_epoch: dict[int, list[float]] = {}
    for records in runs:
        for r in records:
            v = r.get(key)
            if v is not None and math.isfinite(v):
                by_epoch.setdefault(int(r["epoch"]), []).append(float(v))
    epochs = sorted(by_epoch)
    return (epochs, [statistics.fmean(by_epoch[e]) for e in epochs], [min(by_epoch[e]) for e in epochs],
            [max(by_epoch[e]) for e in epochs])


def sort_curves(curves: list[Curve]) -> list[Curve]:
    rank = {k: i for i, k in enumerate(ORDER)}
    return sorted(curves, key=lambda c: (rank.get(c.key, len(ORDER)), c.label))


def make_figure(curves: list[Curve], title: str | None = None):
    """Two panels (train and val full-CE loss vs epoch), one colour per algorithm in
    the paper's legend order, the mean over seeds as a line and the min-max as a band."""
    # the Agg canvas explicitly, not pyplot: no global backend switch, no GUI, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharex=True)
    panels = (("train_loss", "Train loss"), ("val_loss", "Validation loss"))
    for ax, (key, name) in zip(axes, panels):
        for curve in sort_curves(curves):
            epochs, mean, low, high = _band(curve.runs, key)
            if not epochs:
                continue
            n = len(curve.runs)
            style, marker = STYLES.get(curve.key, ("-", "o"))
            label = curve.label + (" (failed)" if curve.failed else "") + (f" ({n} seeds)" if n > 1 else "")
            ax.plot(epochs, mean, color=curve.color, lw=2.2, ls="--" if curve.failed else style, label=label,
                    marker=marker if len(epochs) <= 20 else None, ms=5)
            if n > 1:
                ax.fill_between(epochs, low, high, color=curve.color, alpha=0.18, lw=0)
        ax.set_title(f"{name} (full softmax CE)", fontsize=13)
        ax.set_xlabel("epoch", fontsize=12)
        ax.set_ylabel("loss", fontsize=12)
        ax.tick_params(labelsize=11)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(handles), 6), fontsize=11,
                   frameon=False)
    if title:
        fig.suptitle(title, fontsize=13)
    return fig


def save_figure(fig, path: Path, fmt: str | None = None) -> None:
    """Save atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".").lower()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=150)


# ----------------------------------------------------------------------------- planning runs


@dataclass
class RunSpec:
    algorithm: str
    point: dict  # grid point: flag key (underscores) -> value as given
    seed: int
    name: str
    argv: list  # `xcent train` argv, without --resume/--overwrite
    config: dict  # its resolved config


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line UsageErrors."""

    def error(self, message):
        raise UsageError(message)


def _train_parser():
    from .train import build_parser

    p = build_parser()
    p.exit_on_error = False
    return p


def _train_flags(parser) -> set[str]:
    return {s[2:].replace("-", "_") for s in parser._option_string_actions if s.startswith("--")}


def _resolve_train(argv: list[str], what: str) -> dict:
    from .train import resolve_config

    try:
        cfg = _train_parser().parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        msg = " ".join(str(exc).split()) if isinstance(exc, argparse.ArgumentError) else "invalid flags"
        raise UsageError(f"{what}: {msg}")
    return resolve_config(cfg)


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse_assignment(text: str, flag: str) -> tuple[str, str, str]:
    """``alg.key=value`` -> (alg, key with underscores, value)."""
    m = re.fullmatch(r"\s*([A-Za-z_-]+)\.([A-Za-z0-9_-]+)\s*=\s*(.*?)\s*", text)
    if not m:
        raise UsageError(f"{flag} {text}: expected ALGORITHM.KEY=VALUE (e.g. sox.gamma=1e-5)")
    algo, key, value = m.group(1).lower(), m.group(2).replace("-", "_").lower(), m.group(3)
    if algo not in ALGORITHMS:
        raise UsageError(f"{flag} {text}: unknown algorithm {algo!r}; choose one of {', '.join(ALGORITHMS)}")
    if key in MANAGED:
        raise UsageError(f"{flag} {text}: {key} is set by xcent compare ({MANAGED[key]})")
    if key not in _train_flags(_train_parser()):
        raise UsageError(f"{flag} {text}: --{key.replace('_', '-')} is not an xcent train flag")
    if value == "":
        raise UsageError(f"{flag} {text}: empty value")
    return algo, key, value


def _split_list(text, flag: str) -> list[str]:
    items = text if isinstance(text, list) else str(text).split(",")
    items = [str(x).strip() for x in items if str(x).strip()]
    if not items:
        raise UsageError(f"{flag}: empty list")
    return items


def _load_config_file(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path}: not valid YAML ({' '.join(str(exc).split())[:160]})")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of keys to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_parser() -> _Parser:
    p = _Parser(prog="xcent compare", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Run several algorithms (and seeds, and hyper-parameter grids) with the same\n"
                            "`xcent train` settings, in sequence and resumably (finished runs are skipped,\n"
                            "interrupted ones resume), then write OUT/compare.md, compare.json and\n"
                            "compare.png (+ .pdf).",
                epilog="Any `xcent train` flag (e.g. --batch-size 256, --lr 2) is passed to every run.\n"
                       "A --config YAML may hold these keys and train flags, plus an `algorithms:` section\n"
                       "mapping each algorithm to its overrides, e.g. {sox: {gamma: 1e-5}, scent: {}},\n"
                       "and a `grid:` section, e.g. {scent: {lr: [1, 5, 10]}}. Command-line flags win.\n"
                       "Exit status: 0 all runs finished, 1 some run failed (reported), 2 bad input.")
    p.add_argument("--config", help="YAML file with compare keys, train flags, `algorithms:` and `grid:`")
    p.add_argument("--data-dir", help="the dataset (as for xcent train)")
    p.add_argument("--out-dir", help="where the runs and compare.{md,json,png,pdf} go")
    p.add_argument("--algorithms", help=f"comma list (default: all six: {','.join(ALGORITHMS)})")
    p.add_argument("--seeds", help="comma list of seeds (default: 42)")
    p.add_argument("--epochs", type=int, help="epochs of every run (default: xcent train's)")
    p.add_argument("--override", action="append", default=[], metavar="ALG.KEY=VALUE",
                   help="per-algorithm train flag, e.g. sox.gamma=1e-5 (repeatable)")
    p.add_argument("--grid", action="append", default=[], metavar="ALG.KEY=V1,V2,...",
                   help="per-algorithm grid, e.g. scent.lr=1,5,10 (repeatable; the product is run)")
    p.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    p.add_argument("--demo", action="store_true",
                   help=f"all six algorithms on a cached synthetic dataset ({DEMO_DATA['num_classes']} classes, "
                        f"unit-norm features), {DEMO_EPOCHS} epochs, seed 42, on a CPU in a few minutes")
    return p


def _demo_data_dir(data_dir: str | None) -> Path:
    from .data import cached_synthetic

    return cached_synthetic(data_dir, DEMO_CACHE, DEMO_DATA, announce="xcent compare")


@dataclass
class Plan:
    data_dir: str
    out_dir: Path
    algorithms: list
    seeds: list
    train_argv: list  # flags applied to every run
    overrides: dict  # algorithm -> {key: value}
    grid: dict  # algorithm -> {key: [values]}
    runs: list  # RunSpec
    retry_failed: bool
    command: list


def _run_name(algo: str, point: dict, seed: int) -> str:
    parts = [algo] + [re.sub(r"[^A-Za-z0-9.+-]", "-", f"{k.replace('_', '-')}{v}") for k, v in point.items()]
    return "_".join(parts + [f"seed{seed}"])


def make_plan(argv: list[str]) -> Plan:
    """Parse ``xcent compare`` flags (and a --config file) into the list of runs; every
    run's train flags are validated here, before anything is trained."""
    args, extra = build_parser().parse_known_args(argv)
    cfg = _load_config_file(args.config) if args.config else {}

    train_argv: list[str] = []
    overrides: dict[str, dict[str, str]] = {}
    grid: dict[str, dict[str, list[str]]] = {}
    train_keys = _train_flags(_train_parser())

    algorithms_cfg = cfg.pop("algorithms", None)
    if isinstance(algorithms_cfg, dict):
        for algo, section in algorithms_cfg.items():
            for key, value in (section or {}).items():
                a, k, v = _parse_assignment(f"{algo}.{key}={_flag_value(value)}", f"--config {args.config}: algorithms")
                overrides.setdefault(a, {})[k] = v
        algorithms_cfg = list(algorithms_cfg)
    for entry in cfg.pop("override", None) or cfg.pop("overrides", None) or []:
        a, k, v = _parse_assignment(str(entry), f"--config {args.config}: override")
        overrides.setdefault(a, {})[k] = v
    grid_cfg = cfg.pop("grid", None) or {}
    if not isinstance(grid_cfg, dict):
        raise UsageError(f"--config {args.config}: grid must map algorithms to {{flag: [values]}}")
    grid_entries = [f"{a}.{k}={','.join(map(_flag_value, v if isinstance(v, list) else [v]))}"
                    for a, section in grid_cfg.items() for k, v in (section or {}).items()]
    cfg_data_dir, cfg_out_dir = cfg.pop("data_dir", None), cfg.pop("out_dir", None)
    cfg_seeds, cfg_epochs = cfg.pop("seeds", None), cfg.pop("epochs", None)
    data_dir = args.data_dir or cfg_data_dir
    out_dir = args.out_dir or cfg_out_dir
    algorithms = args.algorithms or algorithms_cfg
    seeds = args.seeds or cfg_seeds
    epochs = args.epochs if args.epochs is not None else cfg_epochs
    for key, value in cfg.items():  # everything else in the file is a train flag for every run
        if key in MANAGED:
            raise UsageError(f"--config {args.config}: {key} is set by xcent compare ({MANAGED[key]})")
        if key not in train_keys:
            raise UsageError(f"--config {args.config}: unknown key {key!r} (not a compare key or train flag)")
        if value is not None:
            train_argv += [f"--{key.replace('_', '-')}", _flag_value(value)]

    # flags not known to compare go to every run (after the file's, so they win)
    for token in extra:
        if token.startswith("--"):
            key = token[2:].split("=", 1)[0].replace("-", "_")
            if key in MANAGED:
                raise UsageError(f"{token.split('=')[0]}: set by xcent compare; use {MANAGED[key]}")
            if key not in train_keys:
                raise UsageError(f"{token.split('=')[0]}: unknown flag (not an xcent compare or xcent train flag)")
        elif token.startswith("-") and not re.fullmatch(r"-[0-9.].*", token):
            raise UsageError(f"{token}: unknown flag")
    train_argv += extra

    if args.demo:
        data_dir = str(_demo_data_dir(data_dir))
        out_dir = out_dir or "outputs/compare_demo"
        algorithms = algorithms or ",".join(ALGORITHMS)
        seeds = seeds or "42"
        epochs = epochs if epochs is not None else DEMO_EPOCHS
        if not any(t.split("=")[0] == "--train-eval-size" for t in train_argv):
            train_argv += ["--train-eval-size", "5000"]
    if not data_dir:
        raise UsageError("--data-dir: required (or --demo)")
    if not out_dir:
        raise UsageError("--out-dir: required")
    from .data import load_dataset

    load_dataset(data_dir, check_features=False)  # a bad --data-dir stops here, not once per run
    algorithms = [a.lower() for a in _split_list(algorithms or ",".join(ALGORITHMS), "--algorithms")]
    for a in algorithms:
        if a not in ALGORITHMS:
            raise UsageError(f"--algorithms {a}: unknown; choose from {', '.join(ALGORITHMS)}")
    if len(set(algorithms)) != len(algorithms):
        raise UsageError(f"--algorithms {','.join(algorithms)}: an algorithm is listed twice")
    try:
        seeds = [int(s) for s in _split_list(seeds if seeds is not None else "42", "--seeds")]
    except ValueError:
        raise UsageError(f"--seeds {seeds}: expected integers, e.g. 42,43,44")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {seeds}: a seed is listed twice")
    if epochs is not None:
        train_argv = ["--epochs", str(epochs)] + train_argv

    for text in args.override:
        a, k, v = _parse_assignment(text, "--override")
        overrides.setdefault(a, {})[k] = v
    for text, flag in [(g, f"--config {args.config}: grid") for g in grid_entries] + [(g, "--grid") for g in args.grid]:
        a, k, v = _parse_assignment(text, flag)
        values = _split_list(v, f"{flag} {text}")
        if len(set(values)) != len(values):
            raise UsageError(f"{flag} {text}: a value is listed twice")
        grid.setdefault(a, {})[k] = values

    for source in (overrides, grid):
        for a in list(source):
            if a not in algorithms:
                print(f"xcent compare: note: {a} is not in --algorithms; its overrides/grid are ignored",
                      file=sys.stderr)
                del source[a]

    base = ["--data-dir", str(data_dir), "--out-dir", str(out_dir)] + train_argv
    runs, names = [], set()
    for algo in algorithms:
        keys = list(grid.get(algo, {}))
        for values in itertools.product(*(grid[algo][k] for k in keys)) if keys else [()]:
            point = dict(zip(keys, values))
            for seed in seeds:
                name = _run_name(algo, point, seed)
                if name in names:
                    raise UsageError(f"--grid: two points of {algo} give the same run name {name}")
                names.add(name)
                argv_run = base + ["--algorithm", algo, "--seed", str(seed), "--name", name]
                for k, v in list(overrides.get(algo, {}).items()) + list(point.items()):
                    argv_run += [f"--{k.replace('_', '-')}", v]
                config = _resolve_train(argv_run, f"train flags of run {name}")
                runs.append(RunSpec(algo, point, seed, name, argv_run, config))
    return Plan(str(data_dir), Path(out_dir), algorithms, seeds, train_argv, overrides, grid, runs,
                args.retry_failed, list(argv))


# ----------------------------------------------------------------------------- running


def _same_value(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def run_state(spec: RunSpec, out_dir: Path) -> str:
    """``done``, ``failed``, ``resume`` (has a checkpoint), ``partial`` (started, no
    checkpoint) or ``new``. Raises UsageError if the directory holds a different run."""
    import yaml

    from .train import RunDir

    run = RunDir(out_dir, spec.name)
    if not run.path.exists():
        return "new"
    if run.config.exists():
        try:
            saved = yaml.safe_load(run.config.read_text()) or {}
        except yaml.YAMLError:
            raise UsageError(f"{run.config}: not valid YAML; move the run directory away")
        diffs = [k for k in _RUN_KEYS if not _same_value(saved.get(k), spec.config.get(k))]
        diffs += [k for k in _SHAPE_KEYS if spec.config.get(k) is not None
                  and not _same_value(saved.get(k), spec.config.get(k))]
        if saved.get("data_dir") is not None and \
                Path(str(saved["data_dir"])).resolve() != Path(str(spec.config["data_dir"])).resolve():
            diffs.append("data_dir")
        if diffs:
            detail = ", ".join(f"{k} {saved.get(k)!r} vs {spec.config.get(k)!r}" for k in diffs[:3])
            raise UsageError(f"{run.path}: holds a run with other settings ({detail}); use another --out-dir "
                             f"or move it away")
    elif run.holds_run():
        raise UsageError(f"{run.path}: holds a run without config.yaml; use another --out-dir or move it away")
    if (run.path / FAILED_FILE).exists():
        return "failed"
    records = read_records(run.jsonl) if run.jsonl.exists() else []
    if records and records[-1]["epoch"] >= spec.config["epochs"]:
        return "done"
    from . import modelio as ckpt_io

    return "resume" if ckpt_io.latest(run.checkpoints) is not None else ("partial" if run.holds_run() else "new")


def execute(plan: Plan, echo=print) -> dict[str, str]:
    """Run the plan in sequence; returns run name -> final state (done / failed)."""
    from . import modelio as ckpt_io
    from .train import RunDir, build_parser, resolve_config, train

    states = {spec.name: run_state(spec, plan.out_dir) for spec in plan.runs}  # all checked before any training
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    todo = [s for s in plan.runs if states[s.name] not in ("done",) and
            not (states[s.name] == "failed" and not plan.retry_failed)]
    echo(f"xcent compare: {len(plan.runs)} runs in {plan.out_dir}: {len(todo)} to run, "
         f"{sum(v == 'done' for v in states.values())} finished, "
         f"{sum(v == 'failed' for v in states.values())} failed before")
    for i, spec in enumerate(plan.runs, 1):
        state, run = states[spec.name], RunDir(plan.out_dir, spec.name)
        if state == "done":
            echo(f"[{i}/{len(plan.runs)}] {spec.name}: finished, skipped")
            continue
        if state == "failed" and not plan.retry_failed:
            echo(f"[{i}/{len(plan.runs)}] {spec.name}: failed before, skipped (--retry-failed reruns it)")
            continue
        (run.path / FAILED_FILE).unlink(missing_ok=True)
        resume = ckpt_io.latest(run.checkpoints) is not None
        argv_run = spec.argv + (["--resume", "latest"] if resume else ["--overwrite", "true"])
        echo(f"[{i}/{len(plan.runs)}] {spec.name}: {'resuming' if resume else 'training'}")
        try:
            train(resolve_config(build_parser().parse_args(argv_run)), echo=echo)
            states[spec.name] = "done"
        except Exception as exc:  # a failed run is recorded; the others go on
            message = " ".join(str(exc).split()) or type(exc).__name__
            run.path.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run.path / FAILED_FILE, json.dumps({"error": type(exc).__name__, "message": message}))
            echo(f"[{i}/{len(plan.runs)}] {spec.name}: FAILED ({type(exc).__name__}: {message})")
            states[spec.name] = "failed"
    return states


# ----------------------------------------------------------------------------- summarising


def _hparams(config: dict, algo: str) -> dict:
    return {k: config.get(k) for k in HPARAMS[algo]}


def summarize(plan: Plan) -> dict:
    """compare.json's content, read back from the run directories."""
    import yaml

    from .train import RunDir

    runs = []
    for spec in plan.runs:
        run = RunDir(plan.out_dir, spec.name)
        entry = {"name": spec.name, "algorithm": spec.algorithm, "seed": spec.seed, "point": spec.point,
                 "path": str(run.path), "jsonl": str(run.jsonl), "status": "missing", "error": None,
                 "metrics": None, "hparams": _hparams(spec.config, spec.algorithm)}
        records = read_records(run.jsonl) if run.jsonl.exists() else []
        if (run.path / FAILED_FILE).exists():
            entry["status"] = "failed"
            try:
                entry["error"] = json.loads((run.path / FAILED_FILE).read_text())
            except (OSError, json.JSONDecodeError):
                entry["error"] = {"error": "unknown", "message": "unreadable failure record"}
        elif records and records[-1]["epoch"] >= spec.config["epochs"]:
            entry["status"] = "done"
        elif records:
            entry["status"] = "incomplete"
        if records:
            entry["metrics"] = run_metrics(records)
        if run.config.exists():
            saved = yaml.safe_load(run.config.read_text()) or {}
            entry["hparams"] = _hparams(saved, spec.algorithm)
        runs.append(entry)

    results = {}
    for algo in plan.algorithms:
        points = []
        for point_key, group in itertools.groupby([r for r in runs if r["algorithm"] == algo],
                                                  key=lambda r: json.dumps(r["point"])):
            group = list(group)
            ok = [r for r in group if r["status"] == "done"]
            points.append({"point": json.loads(point_key), "runs": [r["name"] for r in group],
                           "done": len(ok), "failed": sum(r["status"] == "failed" for r in group),
                           "final_val_loss": mean_std(r["metrics"]["final_val_loss"] for r in ok),
                           "hparams": (ok or group)[0]["hparams"]})
        eligible = [p for p in points if p["done"] and not p["failed"]] or [p for p in points if p["done"]]
        best = min(eligible, key=lambda p: p["final_val_loss"]["mean"]) if eligible else None
        for p in points:
            p["selected"] = p is best
        chosen = [r for r in runs if r["name"] in best["runs"]] if best else []
        ok = [r for r in chosen if r["status"] == "done"]
        results[algo] = {
            "label": LABELS[algo],
            "point": best["point"] if best else None,
            "hparams": best["hparams"] if best else None,
            "runs": [r["name"] for r in chosen],
            "seeds": [r["seed"] for r in ok],
            "metrics": {k: mean_std(r["metrics"][k] for r in ok) for k in METRICS},
            "grid": points if plan.grid.get(algo) else None,
        }
    from .data import load_dataset

    data = load_dataset(plan.data_dir, check_features=False)
    return {
        "format": FORMAT,
        "command": ["xcent", "compare"] + plan.command,
        "data_dir": plan.data_dir,
        "data": {"num_classes": data.num_classes, "feature_dim": data.feature_dim,
                 "train_rows": data.train.num_samples, "val_rows": data.splits["val"].num_samples,
                 "test_rows": data.splits["test"].num_samples if "test" in data.splits else 0},
        "epochs": plan.runs[0].config["epochs"] if plan.runs else None,
        "shared": {k: plan.runs[0].config.get(k) for k in SHARED_HPARAMS} if plan.runs else {},
        "algorithms": plan.algorithms,
        "seeds": plan.seeds,
        "train_args": plan.train_argv,
        "overrides": plan.overrides,
        "grid": plan.grid,
        "results": results,
        "runs": runs,
        "std": "sample standard deviation over seeds (n - 1); null for one seed",
    }


def render_markdown(summary: dict) -> str:
    d = summary["data"]
    algos = [a for a in ORDER if a in summary["results"]]
    cols = list(METRICS)
    lines = [
        "# Algorithm comparison",
        "",
        f"Data: `{summary['data_dir']}` ({d['num_classes']} classes, dim {d['feature_dim']}, "
        f"{d['train_rows']} train / {d['val_rows']} val / {d['test_rows']} test rows). "
        f"{summary['epochs']} epochs, batch size {summary['shared'].get('batch_size')}, "
        f"seeds {', '.join(map(str, summary['seeds']))}.",
        "",
        f"Command: `{' '.join(summary['command'])}`",
        "",
        "Losses are the full softmax cross-entropy over all classes. Cells are mean ± std over seeds "
        "(sample std); *final* is the last epoch; *best val loss* is the lowest val loss of any epoch; "
        "the test numbers are those at the epoch of best val top-1 (where the trainer evaluates test).",
        "",
        "## Summary",
        "",
        "| algorithm | seeds | " + " | ".join(METRICS[c][0] for c in cols) + " | hyper-parameters |",
        "|---|---|" + "---|" * len(cols) + "---|",
    ]
    for a in algos:
        res = summary["results"][a]
        hp = ", ".join(f"{k} {_fmt_hp(v)}" for k, v in (res["hparams"] or {}).items())
        lines.append(f"| {res['label']} | {len(res['seeds'])} | "
                     + " | ".join(_fmt_ms(res["metrics"][c], METRICS[c][1]) for c in cols) + f" | {hp} |")
    by_name = {r["name"]: r for r in summary["runs"]}
    for a in algos:
        res = summary["results"][a]
        lines += ["", f"## {res['label']}", ""]
        hp = ", ".join(f"{k} = {_fmt_hp(v)}" for k, v in (res["hparams"] or {}).items())
        lines += [f"Hyper-parameters: {hp or '-'}" + (" (best grid point)" if res["grid"] else ""), ""]
        lines += ["| seed | run | status | " + " | ".join(METRICS[c][0] for c in cols) + " |",
                  "|---|---|---|" + "---|" * len(cols)]
        for name in res["runs"]:
            r = by_name[name]
            m = r["metrics"] or {}
            lines.append(f"| {r['seed']} | `{name}` | {r['status']} | "
                         + " | ".join(_fmt(m.get(c), METRICS[c][1]) for c in cols) + " |")
        if len(res["seeds"]) > 1:
            lines.append("| mean ± std | | | " + " | ".join(_fmt_ms(res["metrics"][c], METRICS[c][1]) for c in cols)
                         + " |")
        if res["grid"]:
            keys = list(res["grid"][0]["point"])
            lines += ["", "Grid (selected: lowest final val loss, mean over seeds):", "",
                      "| " + " | ".join(keys) + " | final val loss | finished | failed | selected |",
                      "|" + "---|" * (len(keys) + 4)]
            for p in res["grid"]:
                lines.append("| " + " | ".join(str(p["point"][k]) for k in keys)
                             + f" | {_fmt_ms(p['final_val_loss'], '.4f')} | {p['done']} | {p['failed']} | "
                             + ("**yes**" if p["selected"] else "") + " |")
    failed = [r for r in summary["runs"] if r["status"] != "done"]
    if failed:
        lines += ["", "## Runs that did not finish", ""]
        for r in failed:
            err = r["error"] or {}
            why = f"{err.get('error')}: {err.get('message')}" if err else r["status"]
            lines.append(f"- `{r['name']}` ({r['status']}): {why}")
    return "\n".join(lines) + "\n"


def compare_curves(summary: dict) -> list[Curve]:
    """The figure's curves: the selected runs of each algorithm (finished ones; the
    failed ones, dashed, only if none finished)."""
    curves = []
    by_name = {r["name"]: r for r in summary["runs"]}
    for algo, res in summary["results"].items():
        runs = [by_name[n] for n in res["runs"]] or [r for r in summary["runs"] if r["algorithm"] == algo]
        ok = [r for r in runs if r["status"] == "done"]
        use = ok or [r for r in runs if r["metrics"]]
        if not use:
            continue
        curves.append(Curve(algo, LABELS[algo], COLORS[algo], [read_records(Path(r["jsonl"])) for r in use],
                            failed=not ok))
    return curves


def _figure_title(summary: dict) -> str:
    d = summary["data"]
    return (f"{Path(summary['data_dir']).name}: {d['num_classes']} classes, {summary['epochs']} epochs, "
            f"{len(summary['seeds'])} seed{'s' if len(summary['seeds']) > 1 else ''}"
            + (" (band: min-max over seeds)" if len(summary["seeds"]) > 1 else ""))


def write_outputs(summary: dict, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "compare.json", json.dumps(summary, indent=1) + "\n")
    write_text_atomic(out_dir / "compare.md", render_markdown(summary))
    fig = make_figure(compare_curves(summary), _figure_title(summary))
    save_figure(fig, out_dir / "compare.png")
    save_figure(fig, out_dir / "compare.pdf")
    return [out_dir / f"compare.{ext}" for ext in ("md", "json", "png", "pdf")]


def compare_main(argv: list[str]) -> int:
    start = time.perf_counter()
    plan = make_plan(argv)
    states = execute(plan)
    summary = summarize(plan)
    summary["wall_seconds"] = time.perf_counter() - start
    paths = write_outputs(summary, plan.out_dir)
    print()
    print(f"{'algorithm':<16} {'seeds':>5} {'train loss':>11} {'val loss':>9} {'val top-1':>9} {'s/epoch':>8}")
    for algo in ORDER:
        res = summary["results"].get(algo)
        if res is None:
            continue
        m = res["metrics"]
        print(f"{res['label']:<16} {len(res['seeds']):>5} {_fmt(m['final_train_loss']['mean']):>11} "
              f"{_fmt(m['final_val_loss']['mean']):>9} {_fmt(m['final_val_top1']['mean']):>9} "
              f"{_fmt(m['seconds_per_epoch']['mean'], '.2f'):>8}")
    failed = [n for n, s in states.items() if s != "done"]
    print(f"xcent compare: wrote {', '.join(str(p) for p in paths)} ({summary['wall_seconds']:.0f} s)")
    if failed:
        print(f"xcent compare: {len(failed)} run(s) failed: {', '.join(failed)} (see compare.md)", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- xcent plot


def _runs_in(path: Path) -> list[tuple[Path, str]]:
    """(jsonl file, algorithm or label) of the runs under a RUN_DIR argument."""
    import yaml

    if path.is_file() and path.suffix == ".jsonl":
        return [(path, infer_algorithm(path.stem[5:] if path.stem.startswith("eval_") else path.stem,
                                       path.parent.name) or path.stem)]
    if not path.is_dir():
        raise UsageError(f"{path}: no such run directory")
    summary_file = path / "compare.json"
    if summary_file.exists():  # a compare output: its selected runs
        try:
            summary = json.loads(summary_file.read_text())
        except json.JSONDecodeError:
            raise UsageError(f"{summary_file}: not JSON")
        by_name = {r["name"]: r for r in summary.get("runs", [])}
        found = []
        for algo, res in summary.get("results", {}).items():
            for name in res.get("runs", []):
                r = by_name.get(name)
                jsonl = path / name / f"eval_{name}.jsonl"
                if r and r.get("status") == "done" and jsonl.exists():
                    found.append((jsonl, algo))
        if found:
            return found
    files = sorted(path.glob("eval_*.jsonl"))
    if files:
        algo = None
        if (path / "config.yaml").exists():
            try:
                algo = (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("algorithm")
            except yaml.YAMLError:
                algo = None
        return [(f, algo if algo in ALGORITHMS and len(files) == 1 else
                 infer_algorithm(f.stem[5:], path.name) or f.stem[5:]) for f in files]
    found = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        if any(sub.glob("eval_*.jsonl")):
            found += _runs_in(sub)
    if not found:
        raise UsageError(f"{path}: no eval_*.jsonl in it or in its subdirectories")
    return found


def plot_main(argv: list[str]) -> int:
    p = _Parser(prog="xcent plot", allow_abbrev=False,
                description="Draw the comparison figure (train and val full-CE loss vs epoch, one colour per "
                            "algorithm, mean and min-max band over the runs of an algorithm) from run "
                            "directories: xcent train runs, an xcent compare --out-dir, or the seed code's "
                            "eval_NAME.jsonl files (the algorithm is read from config.yaml or the run name).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, compare outputs or .jsonl files")
    p.add_argument("--out", required=True, help="output figure: .png, .pdf or .svg")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UsageError(f"--out {out}: expected a .png, .pdf or .svg file name")
    if not out.parent.exists():
        raise UsageError(f"--out {out}: directory {out.parent} does not exist")
    groups: dict[str, list[list[dict]]] = {}
    for arg in args.runs:
        for jsonl, algo in _runs_in(Path(arg)):
            records = read_records(jsonl)
            if not records:
                raise UsageError(f"{jsonl}: empty")
            groups.setdefault(algo, []).append(records)
    curves, extra = [], iter(_EXTRA_COLORS * 10)
    for key, runs in groups.items():
        if key in ALGORITHMS:
            curves.append(Curve(key, LABELS[key], COLORS[key], runs))
        else:
            curves.append(Curve(key, key, next(extra), runs))
    fig = make_figure(curves, args.title)
    save_figure(fig, out)
    print(f"xcent plot: {sum(len(c.runs) for c in curves)} run(s), {len(curves)} curve(s) -> {out}")
    return 0
