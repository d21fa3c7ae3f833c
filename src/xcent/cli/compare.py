"""``xcent compare`` and ``xcent plot``: parse flags (jsonargparse) and call
:mod:`xcent.compare`.

``xcent compare`` takes its own flags and passes every other flag to ``xcent train``
for every run: the command line is split by flag name (compare's flags and their
values here, the rest to the trainer's parser, which types and validates them per
run). jsonargparse cannot do that split itself (it refuses ``parse_known_args``), and
the trainer's flags must not be declared twice.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from .. import losses
from ..compare import plan as plan_mod
from ..compare.plan import CompareSettings, Plan, load_config_file, make_plan
from ..compare.report import (
    make_figure,
    plot_curves,
    read_records,
    runs_in,
    save_figure,
    summarize,
    summary_table,
    write_outputs,
)
from ..compare.run import execute
from ..config import parse_error_line
from ..errors import UsageError
from ..fileio import exclusive_lock

__all__ = ["compare_main", "compare_parser", "plan_from_argv", "plot_main", "plot_parser"]


def _parse(parser, argv: list[str]):
    from jsonargparse import ArgumentError

    try:
        return parser.parse_args(argv)
    except ArgumentError as exc:
        raise UsageError(parse_error_line(str(exc))) from None


def compare_parser():
    from jsonargparse import ActionYesNo

    from ..yamlio import argument_parser

    p = argument_parser(
        prog="xcent compare", exit_on_error=False,
        description="Run several algorithms (and seeds, and hyper-parameter grids) with the same `xcent train` "
                    "settings, in sequence and resumably (finished runs are skipped, interrupted ones resume), "
                    "then write OUT/compare.md, compare.json and compare.png (+ .pdf). Any `xcent train` flag "
                    "(e.g. --batch-size 256, --lr 2; --init random for the paper's random start at log C) is "
                    "passed to every run. A --config YAML may hold these keys "
                    "and train flags, plus an `algorithms:` section mapping each algorithm to its overrides, e.g. "
                    "{sox: {gamma: 1e-5}, scent: {}}, and a `grid:` section, e.g. {scent: {lr: [1, 5, 10]}}; "
                    "command-line flags win. Exit status: 0 all runs finished, 1 some run failed (reported), "
                    "2 bad input.")
    p.add_argument("--config", type=str | None, default=None,
                   help="YAML file with compare keys, train flags, `algorithms:` and `grid:`")
    p.add_argument("--data-dir", type=str | None, default=None, help="the dataset (as for xcent train)")
    p.add_argument("--out-dir", type=str | None, default=None,
                   help="where the runs and compare.{md,json,png,pdf} go")
    p.add_argument("--algorithms", type=str | None, default=None,
                   help="comma list (default: every registered algorithm, currently "
                        f"{','.join(losses.REGISTRY)})")
    p.add_argument("--seeds", type=str | None, default=None,
                   help="comma list of seeds, each in [0, 2^32 - 1] (default: 42)")
    p.add_argument("--epochs", type=int | None, default=None, help="epochs of every run (default: xcent train's)")
    p.add_argument("--override", type=str, action="append", default=[], metavar="ALG.KEY=VALUE",
                   help="per-algorithm train flag, e.g. sox.gamma=1e-5 (repeatable)")
    p.add_argument("--grid", type=str, action="append", default=[], metavar="ALG.KEY=V1,V2,...",
                   help="per-algorithm grid, e.g. scent.lr=1,5,10 (repeatable; the product is run)")
    p.add_argument("--retry-failed", action=ActionYesNo(no_prefix="no-"), nargs="?", default=False,
                   help="rerun runs recorded as failed")
    p.add_argument("--demo", action=ActionYesNo(no_prefix="no-"), nargs="?", default=False,
                   help=f"every algorithm on a cached synthetic dataset ({plan_mod.DEMO_DATA['num_classes']} "
                        f"classes, unit-norm features), {plan_mod.DEMO_EPOCHS} epochs, seed 42, from the paper's "
                        "random start (--init random unless given), on a CPU in a few minutes")
    return p


def _split_argv(argv: list[str], own: set[str]) -> tuple[list[str], list[str]]:
    """(compare's tokens, the trainer's tokens): each flag takes the values that follow
    it (tokens that are not flags; a negative number is a value)."""
    mine, theirs, target = [], [], None
    for token in argv:
        is_flag = token.startswith("-") and not re.fullmatch(r"-[0-9.].*", token)
        if is_flag:
            target = mine if token.split("=", 1)[0] in own else theirs
        elif target is None:
            raise UsageError(f"{token}: unexpected argument (flags start with --)")
        target.append(token)
    return mine, theirs


def _file_tokens(own: dict) -> list[str]:
    """A --config file's compare keys as flags (typed by the parser like the command line's)."""
    tokens = []
    for key, value in own.items():
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(map(str, value))
        elif isinstance(value, bool):
            value = "true" if value else "false"
        tokens += [f"--{key.replace('_', '-')}", str(value)]
    return tokens


def plan_from_argv(argv: list[str]) -> Plan:
    """``xcent compare`` flags (and a --config file) -> the plan of runs (nothing written)."""
    parser = compare_parser()
    own_flags = set(parser._option_string_actions)
    mine, theirs = _split_argv(list(map(str, argv)), own_flags)
    args = _parse(parser, mine)
    settings = CompareSettings()
    if args.config:
        file_own, settings = load_config_file(args.config)
        args = _parse(parser, _file_tokens(file_own) + mine)  # the command line wins
    if args.algorithms is not None or settings.algorithms is None:
        settings.algorithms = args.algorithms
    settings.data_dir, settings.out_dir, settings.seeds, settings.epochs = (
        args.data_dir, args.out_dir, args.seeds, args.epochs)
    settings.override += args.override
    settings.grid += args.grid
    settings.retry_failed, settings.demo = bool(args.retry_failed), bool(args.demo)
    settings.train_args += theirs  # after the file's, so they win
    settings.command = list(argv)
    return make_plan(settings)


def compare_main(argv: list[str]) -> int:
    start = time.perf_counter()
    plan = plan_from_argv(argv)
    with exclusive_lock(plan.out_dir, "comparison"):  # one xcent compare per --out-dir
        states = execute(plan)
        summary = summarize(plan)
        summary["wall_seconds"] = time.perf_counter() - start
        paths = write_outputs(summary, plan.out_dir)
    print()
    print(summary_table(summary))
    failed = [n for n, s in states.items() if s != "done"]
    print(f"xcent compare: wrote {', '.join(str(p) for p in paths)} ({summary['wall_seconds']:.0f} s)")
    if failed:
        print(f"xcent compare: {len(failed)} run(s) failed: {', '.join(failed)} (see compare.md)", file=sys.stderr)
        return 1
    return 0


def plot_parser():
    from ..yamlio import argument_parser

    p = argument_parser(
        prog="xcent plot", exit_on_error=False,
        description="Draw the comparison figure (train and val full-CE loss vs epoch, one colour per algorithm, "
                    "mean and min-max band over the runs of an algorithm) from run directories: xcent train runs, "
                    "an xcent compare --out-dir, or the reference implementation's (Optimization-AI/SCENT, `xc/`) "
                    "eval_NAME.jsonl files (the algorithm is read from config.yaml or the run name).")
    p.add_argument("runs", type=str, nargs="+", metavar="RUN_DIR",
                   help="run directories, compare outputs or .jsonl files")
    p.add_argument("--out", type=str, required=True, help="output figure: .png, .pdf or .svg")
    p.add_argument("--title", type=str | None, default=None, help="figure title")
    return p


def plot_main(argv: list[str]) -> int:
    args = _parse(plot_parser(), list(map(str, argv)))
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UsageError(f"--out {out}: expected a .png, .pdf or .svg file name")
    if not out.parent.exists():
        raise UsageError(f"--out {out}: directory {out.parent} does not exist")
    groups: dict[str, list[list[dict]]] = {}
    for arg in args.runs:
        for jsonl, algo in runs_in(Path(arg)):
            records = read_records(jsonl)
            if not records:
                raise UsageError(f"{jsonl}: empty")
            groups.setdefault(algo, []).append(records)
    curves = plot_curves(groups)
    save_figure(make_figure(curves, args.title), out)
    print(f"xcent plot: {sum(len(c.runs) for c in curves)} run(s), {len(curves)} curve(s) -> {out}")
    return 0
