"""The comparison's results: per-run metrics from the JSONL files, the summary
(``compare.json``), the markdown report (``compare.md``) and the figure
(``compare.png``/``.pdf``), which ``xcent plot`` also draws from any run directories.

An algorithm's legend label, colour, marker and line style, and the hyper-parameters
reported for it, come from the algorithm registry (:data:`xcent.losses.REGISTRY`),
in its (the paper's) legend order.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .. import losses
from ..errors import UsageError
from ..fileio import atomic_path, write_text_atomic
from ..yamlio import load_json

__all__ = [
    "FAILED_FILE",
    "FORMAT",
    "METRICS",
    "Curve",
    "algorithm_curve",
    "compare_curves",
    "infer_algorithm",
    "make_figure",
    "mean_std",
    "read_records",
    "render_markdown",
    "start_lines",
    "run_metrics",
    "runs_in",
    "save_figure",
    "sort_curves",
    "summarize",
    "summary_table",
    "write_outputs",
]

#: Shared settings reported once for the whole comparison.
SHARED_HPARAMS = ("batch_size", "epochs", "warmup_epochs")

#: Per-run metrics: key -> (markdown column, format).
METRICS = {
    "start_val_loss": ("start val loss", ".4f"),
    "start_val_top1": ("start val top-1", ".4f"),
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
            record = load_json(line)
        except ValueError:
            raise UsageError(f"{path}: line {i} is not JSON")
        if not isinstance(record, dict) or "epoch" not in record:
            raise UsageError(f"{path}: line {i} has no 'epoch' key")
        records.append(record)
    return records


def run_metrics(records: list[dict]) -> dict:
    """The per-run numbers of the tables, straight from its JSONL records.

    Start values are those of epoch 0 (the initial model; None when the records begin
    later); final values are those of the last record; ``best_val_loss`` is the lowest val loss
    of any epoch (epoch 0 included); the test numbers are those the trainer measured at
    the epoch of best val top-1 (``best_test_loss``/``best_test_acc``), which is
    ``best_val_epoch``; ``seconds_per_epoch`` is the mean training time of epochs >= 1."""
    last = records[-1]
    start = records[0] if records[0]["epoch"] == 0 else {}
    val_losses = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    best_acc = last.get("best_val_acc")
    best_epoch = next((r["epoch"] for r in records if best_acc is not None and r.get("val_acc") == best_acc), None)
    seconds = [r["epoch_seconds"] for r in records if r["epoch"] >= 1 and r.get("epoch_seconds") is not None]
    return {
        "epochs": last["epoch"],
        "start_val_loss": start.get("val_loss"),
        "start_val_top1": start.get("val_acc"),
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
    """The registered algorithm a run name refers to (``glint360k_scent`` -> ``scent``,
    ``tol_u-max`` -> ``umax``), or None. When several match, the one registered last
    wins: a variant is registered after its base, so ``asgd_softplus`` is softplus."""
    tokens = set()
    for name in names:
        tokens.update(t for t in re.split(r"[^a-z0-9]+", name.lower()) if t)
        tokens.update(t.replace("-", "") for t in re.split(r"[^a-z0-9-]+", name.lower()) if t)
    matches = [algo for algo in losses.REGISTRY if algo in tokens]
    return matches[-1] if matches else None


@dataclass
class Curve:
    """The runs (seeds) of one line of the figure."""

    key: str
    label: str
    color: str
    runs: list[list[dict]] = field(default_factory=list)
    failed: bool = False  # drawn from failed runs only (dashed)
    linestyle: str = "-"
    marker: str = "o"


def algorithm_curve(algo: str, runs: list[list[dict]], failed: bool = False) -> Curve:
    """The curve of a registered algorithm, drawn as its registry entry says."""
    spec = losses.get(algo)
    return Curve(algo, spec.label, spec.color, runs, failed, spec.linestyle, spec.marker)


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
    """Registered algorithms in the registry's legend order, then the others by label."""
    rank = {k: i for i, k in enumerate(losses.REGISTRY)}
    return sorted(curves, key=lambda c: (rank.get(c.key, len(rank)), c.label))


def start_lines(curves: list[Curve], key: str) -> list[tuple[float, str | None, str]]:
    """The reference lines of the start (epoch 0) in the panel of ``key``: (value, colour
    or None for the neutral grey, legend label). The runs of a comparison share one start
    (the same data, seed and ``--init``): one grey line; runs that start apart (``xcent
    plot`` of unrelated runs) get one dotted line each in their curve's colour."""
    starts = []
    for curve in sort_curves(curves):
        epochs, mean, _, _ = _band(curve.runs, key)
        if epochs and epochs[0] == 0:
            starts.append((mean[0], curve))
    if not starts:
        return []
    values = [v for v, _ in starts]
    if max(values) - min(values) <= 1e-6 * max(1.0, abs(max(values))):
        return [(values[0], None, "start (epoch 0)")]
    return [(v, curve.color, f"{curve.label} start") for v, curve in starts]


def make_figure(curves: list[Curve], title: str | None = None):
    """Two panels (train and val full-CE loss vs epoch), one colour per algorithm in
    the paper's legend order, the mean over seeds as a line and the min-max as a band,
    and the start (epoch 0) as a dotted reference line (:func:`start_lines`)."""
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
            label = curve.label + (" (failed)" if curve.failed else "") + (f" ({n} seeds)" if n > 1 else "")
            ax.plot(epochs, mean, color=curve.color, lw=2.2, ls="--" if curve.failed else curve.linestyle,
                    label=label, marker=curve.marker if len(epochs) <= 20 else None, ms=5)
            if n > 1:
                ax.fill_between(epochs, low, high, color=curve.color, alpha=0.18, lw=0)
        for value, color, label in start_lines(curves, key):
            ax.axhline(value, color=color or "0.35", ls=":", lw=1.6, label=label, zorder=1)
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

# ----------------------------------------------------------------------------- summarising


def _hparams(config: dict, algo: str) -> dict:
    """The hyper-parameters ``algo`` uses (its registry entry's config keys, lr first)."""
    return {k: config.get(k) for k in losses.get(algo).keys}


def summarize(plan) -> dict:
    """compare.json's content, read back from the run directories."""
    from ..train import RunDir
    from ..yamlio import read_yaml

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
                entry["error"] = load_json((run.path / FAILED_FILE).read_text())
            except (OSError, ValueError):
                entry["error"] = {"error": "unknown", "message": "unreadable failure record"}
        elif records and records[-1]["epoch"] >= spec.config["epochs"]:
            entry["status"] = "done"
        elif records:
            entry["status"] = "incomplete"
        if records:
            entry["metrics"] = run_metrics(records)
        if run.config.exists():
            saved = read_yaml(run.config)
            entry["hparams"] = _hparams(saved if isinstance(saved, dict) else {}, spec.algorithm)
        runs.append(entry)

    results = {}
    for algo in plan.algorithms:
        points = []
        for point_key, group in itertools.groupby([r for r in runs if r["algorithm"] == algo],
                                                  key=lambda r: json.dumps(r["point"])):
            group = list(group)
            ok = [r for r in group if r["status"] == "done"]
            points.append({"point": load_json(point_key), "runs": [r["name"] for r in group],
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
            "label": losses.get(algo).label,
            "point": best["point"] if best else None,
            "hparams": best["hparams"] if best else None,
            "runs": [r["name"] for r in chosen],
            "seeds": [r["seed"] for r in ok],
            "metrics": {k: mean_std(r["metrics"][k] for r in ok) for k in METRICS},
            "grid": points if plan.grid.get(algo) else None,
        }
    from ..data import load_dataset

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
    algos = [a for a in losses.REGISTRY if a in summary["results"]]
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


def summary_table(summary: dict) -> str:
    """The terminal summary: one line per algorithm (legend order), means over seeds."""
    lines = [f"{'algorithm':<16} {'seeds':>5} {'train loss':>11} {'val loss':>9} {'val top-1':>9} {'s/epoch':>8}"]
    for algo in losses.REGISTRY:
        res = summary["results"].get(algo)
        if res is None:
            continue
        m = res["metrics"]
        lines.append(f"{res['label']:<16} {len(res['seeds']):>5} {_fmt(m['final_train_loss']['mean']):>11} "
                     f"{_fmt(m['final_val_loss']['mean']):>9} {_fmt(m['final_val_top1']['mean']):>9} "
                     f"{_fmt(m['seconds_per_epoch']['mean'], '.2f'):>8}")
    return "\n".join(lines)


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
        curves.append(algorithm_curve(algo, [read_records(Path(r["jsonl"])) for r in use], failed=not ok))
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

# ----------------------------------------------------------------------------- run discovery (xcent plot)


def runs_in(path: Path) -> list[tuple[Path, str]]:
    """(jsonl file, algorithm or label) of the runs under a RUN_DIR argument."""
    from ..yamlio import read_yaml

    if path.is_file() and path.suffix == ".jsonl":
        return [(path, infer_algorithm(path.stem[5:] if path.stem.startswith("eval_") else path.stem,
                                       path.parent.name) or path.stem)]
    if not path.is_dir():
        raise UsageError(f"{path}: no such run directory")
    summary_file = path / "compare.json"
    if summary_file.exists():  # a compare output: its selected runs
        try:
            summary = load_json(summary_file.read_text())
        except ValueError:
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
                saved = read_yaml(path / "config.yaml")
            except UsageError:
                saved = None
            algo = saved.get("algorithm") if isinstance(saved, dict) else None
        return [(f, algo if algo in losses.REGISTRY and len(files) == 1 else
                 infer_algorithm(f.stem[5:], path.name) or f.stem[5:]) for f in files]
    found = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        if any(sub.glob("eval_*.jsonl")):
            found += runs_in(sub)
    if not found:
        raise UsageError(f"{path}: no eval_*.jsonl in it or in its subdirectories")
    return found



def plot_curves(groups: dict[str, list[list[dict]]]) -> list[Curve]:
    """One curve per group of runs: registered algorithms as the registry draws them,
    other groups (runs whose algorithm is unknown) labelled by name in spare colours."""
    spare = iter(losses.SPARE_COLORS * 10)
    return [algorithm_curve(key, runs) if key in losses.REGISTRY else Curve(key, key, next(spare), runs)
            for key, runs in groups.items()]
