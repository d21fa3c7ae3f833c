"""The plan of a comparison: which runs, with which ``xcent train`` settings.

Every (algorithm, grid point, seed) is one ordinary ``xcent train`` run in ``OUT/NAME``
(NAME = ``scent_seed42``, or ``scent_lr5_gamma12_seed42`` on a grid). Settings come,
lowest precedence first, from a ``--config`` YAML file (compare keys, train settings for
every run, an ``algorithms:`` section of per-algorithm overrides and a ``grid:``
section), then the command line; per-algorithm overrides and grid points come last.
Every run's train settings are parsed and validated by the trainer's own parser
before anything is trained or written.
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .. import losses
from ..errors import UsageError
from ..fileio import why_missing
from ..limits import check_seed

__all__ = ["DEMO_CACHE", "DEMO_DATA", "DEMO_EPOCHS", "MANAGED", "CompareSettings", "Plan", "RunSpec",
           "load_config_file", "make_plan", "resolve_train", "train_config", "train_keys"]

#: Train settings that compare sets itself for each run (key -> the compare flag to use).
MANAGED = {"name": "--algorithms/--grid", "seed": "--seeds", "algorithm": "--algorithms", "resume": "(automatic)",
           "overwrite": "(automatic)", "out_dir": "--out-dir", "data_dir": "--data-dir", "config": "--config"}

#: The ``--demo`` dataset: unit-norm features, about 5,000 classes, long-tailed.
DEMO_DATA = {"num_classes": 5000, "feature_dim": 64, "num_samples": 50_000, "val_fraction": 0.05,
             "test_fraction": 0.05, "seed": 0, "noise": 0.6, "tail_exponent": 0.8, "normalize": True}
DEMO_EPOCHS = 5
DEMO_CACHE = "compare-demo-v1"


@dataclass
class CompareSettings:
    """What ``xcent compare`` is asked to do (its flags and ``--config`` file, merged).

    ``algorithms``/``seeds`` are lists or comma-separated strings; ``override`` and
    ``grid`` are ``ALG.KEY=VALUE`` / ``ALG.KEY=V1,V2`` entries (later entries win);
    ``train_args`` are ``xcent train`` flags applied to every run."""

    data_dir: str | None = None
    out_dir: str | None = None
    algorithms: str | list[str] | None = None
    seeds: str | list[int] | None = None
    epochs: int | None = None
    override: list[str] = field(default_factory=list)
    grid: list[str] = field(default_factory=list)
    retry_failed: bool = False
    demo: bool = False
    train_args: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)


@dataclass
class RunSpec:
    algorithm: str
    point: dict  # grid point: flag key (underscores) -> value as given
    seed: int
    name: str
    argv: list  # `xcent train` argv, without --resume/--overwrite
    config: dict  # its resolved config


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


# ----------------------------------------------------------------------------- the trainer's settings


def train_keys() -> set[str]:
    """The settings ``xcent train`` accepts (flag ``--a-b`` is key ``a_b``; ``no_x``
    for the negation of a boolean ``--x``)."""
    from ..config import train_parser

    return {s[2:].replace("-", "_") for s in train_parser()._option_string_actions if s.startswith("--")}


def train_config(argv: list[str], what: str):
    """``xcent train`` flags -> the trainer's resolved :class:`xcent.config.TrainConfig`;
    a UsageError naming ``what`` otherwise."""
    from ..config import config_from_argv

    try:
        return config_from_argv(argv)
    except UsageError as exc:
        raise UsageError(f"{what}: {exc}") from None
    except SystemExit:
        raise UsageError(f"{what}: invalid flags") from None


def resolve_train(argv: list[str], what: str) -> dict:
    """:func:`train_config` as a plain dict (the keys of ``OUT/config.yaml``)."""
    return train_config(argv, what).to_dict()


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse_assignment(text: str, flag: str, keys: set[str]) -> tuple[str, str, str]:
    """``alg.key=value`` -> (alg, key with underscores, value)."""
    m = re.fullmatch(r"\s*([A-Za-z_-]+)\.([A-Za-z0-9_-]+)\s*=\s*(.*?)\s*", text)
    if not m:
        raise UsageError(f"{flag} {text}: expected ALGORITHM.KEY=VALUE (e.g. sox.gamma=1e-5)")
    algo, key, value = m.group(1).lower(), m.group(2).replace("-", "_").lower(), m.group(3)
    if algo not in losses.REGISTRY:
        raise UsageError(f"{flag} {text}: unknown algorithm {algo!r}; choose one of {', '.join(losses.REGISTRY)}")
    if key in MANAGED:
        raise UsageError(f"{flag} {text}: {key} is set by xcent compare ({MANAGED[key]})")
    if key not in keys:
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


# ----------------------------------------------------------------------------- the --config file

#: Keys of a --config file that are compare's own (everything else is a train setting).
_COMPARE_KEYS = ("data_dir", "out_dir", "seeds", "epochs", "retry_failed", "demo")


def load_config_file(path: str) -> tuple[dict, CompareSettings]:
    """A compare ``--config`` YAML file -> (its compare keys, to be typed by the
    command's parser; the rest as settings: overrides from ``algorithms:`` and
    ``override:``, grid entries from ``grid:``, every other key a train flag)."""
    from ..yamlio import read_yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: {why_missing(p) if not p.exists() else 'not a file'}")
    data = read_yaml(p, f"--config {path}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of keys to values")
    cfg = {str(k).replace("-", "_"): v for k, v in data.items()}
    where = f"--config {path}"
    rest = CompareSettings()
    algorithms = cfg.pop("algorithms", None)
    if isinstance(algorithms, dict):
        for algo, section in algorithms.items():
            if not isinstance(section, dict | None):
                raise UsageError(f"{where}: algorithms.{algo} must map train flags to values")
            rest.override += [f"{algo}.{k}={_flag_value(v)}" for k, v in (section or {}).items()]
        algorithms = list(algorithms)
    rest.algorithms = algorithms
    entries = cfg.pop("override", None) or cfg.pop("overrides", None) or []
    rest.override += [str(e) for e in (entries if isinstance(entries, list) else [entries])]
    grid = cfg.pop("grid", None) or {}
    if not isinstance(grid, dict) or not all(isinstance(s, dict | None) for s in grid.values()):
        raise UsageError(f"{where}: grid must map algorithms to {{flag: [values]}}")
    rest.grid = [f"{a}.{k}={','.join(map(_flag_value, v if isinstance(v, list) else [v]))}"
                 for a, section in grid.items() for k, v in (section or {}).items()]
    own = {k: cfg.pop(k) for k in _COMPARE_KEYS if k in cfg}
    keys = train_keys()
    for key, value in cfg.items():  # everything else in the file is a train flag for every run
        if key in MANAGED:
            raise UsageError(f"{where}: {key} is set by xcent compare ({MANAGED[key]})")
        if key not in keys:
            raise UsageError(f"{where}: unknown key {key!r} (not a compare key or train flag)")
        if value is not None:
            rest.train_args += [f"--{key.replace('_', '-')}", _flag_value(value)]
    return own, rest


# ----------------------------------------------------------------------------- planning


def _demo_data_dir(data_dir: str | None) -> Path:
    from ..data import cached_synthetic

    return cached_synthetic(data_dir, DEMO_CACHE, DEMO_DATA, announce="xcent compare")


def _run_name(algo: str, point: dict, seed: int) -> str:
    parts = [algo] + [re.sub(r"[^A-Za-z0-9.+-]", "-", f"{k.replace('_', '-')}{v}") for k, v in point.items()]
    return "_".join(parts + [f"seed{seed}"])


def _check_train_args(tokens: list[str], keys: set[str]) -> None:
    for token in tokens:
        if token.startswith("--"):
            key = token[2:].split("=", 1)[0].replace("-", "_")
            if key in MANAGED:
                raise UsageError(f"{token.split('=')[0]}: set by xcent compare; use {MANAGED[key]}")
            if key not in keys:
                raise UsageError(f"{token.split('=')[0]}: unknown flag (not an xcent compare or xcent train flag)")
        elif token.startswith("-") and not re.fullmatch(r"-[0-9.].*", token):
            raise UsageError(f"{token}: unknown flag")


def make_plan(s: CompareSettings) -> Plan:
    """The list of runs of ``s``; every run's train flags are validated here, before
    anything is trained or written."""
    keys = train_keys()
    _check_train_args(s.train_args, keys)
    train_argv = list(s.train_args)
    data_dir, out_dir, algorithms, seeds, epochs = s.data_dir, s.out_dir, s.algorithms, s.seeds, s.epochs
    if s.demo:
        data_dir = str(_demo_data_dir(data_dir))
        out_dir = out_dir or "outputs/compare_demo"
        seeds = seeds or "42"
        epochs = epochs if epochs is not None else DEMO_EPOCHS
        if not any(t.split("=")[0] == "--train-eval-size" for t in train_argv):
            train_argv += ["--train-eval-size", "5000"]
        if not any(t.split("=")[0] == "--init" for t in train_argv):
            # the paper's figure: every curve starts from the reference implementation's
            # random start at log C (a class-mean start begins near the end of the curves)
            train_argv += ["--init", "random"]
    if not data_dir:
        raise UsageError("--data-dir: required (or --demo)")
    if not out_dir:
        raise UsageError("--out-dir: required")
    from ..data import load_dataset

    load_dataset(data_dir, check_features=False)  # a bad --data-dir stops here, not once per run
    algorithms = [a.lower() for a in _split_list(algorithms or list(losses.REGISTRY), "--algorithms")]
    for a in algorithms:
        if a not in losses.REGISTRY:
            raise UsageError(f"--algorithms {a}: unknown; choose from {', '.join(losses.REGISTRY)}")
    if len(set(algorithms)) != len(algorithms):
        raise UsageError(f"--algorithms {','.join(algorithms)}: an algorithm is listed twice")
    seeds = [check_seed(x, "--seeds") for x in _split_list(seeds if seeds is not None else "42", "--seeds")]
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {seeds}: a seed is listed twice")
    if epochs is not None:
        train_argv = ["--epochs", str(epochs)] + train_argv

    overrides: dict[str, dict[str, str]] = {}
    grid: dict[str, dict[str, list[str]]] = {}
    for text in s.override:
        a, k, v = _parse_assignment(text, "--override", keys)
        overrides.setdefault(a, {})[k] = v
    for text in s.grid:
        a, k, v = _parse_assignment(text, "--grid", keys)
        values = _split_list(v, f"--grid {text}")
        if len(set(values)) != len(values):
            raise UsageError(f"--grid {text}: a value is listed twice")
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
        grid_keys = list(grid.get(algo, {}))
        for values in itertools.product(*(grid[algo][k] for k in grid_keys)) if grid_keys else [()]:
            point = dict(zip(grid_keys, values))
            for seed in seeds:
                name = _run_name(algo, point, seed)
                if name in names:
                    raise UsageError(f"--grid: two points of {algo} give the same run name {name}")
                names.add(name)
                argv_run = base + ["--algorithm", algo, "--seed", str(seed), "--name", name]
                for k, v in list(overrides.get(algo, {}).items()) + list(point.items()):
                    argv_run += [f"--{k.replace('_', '-')}", v]
                config = resolve_train(argv_run, f"train flags of run {name}")
                runs.append(RunSpec(algo, point, seed, name, argv_run, config))
    return Plan(str(data_dir), Path(out_dir), algorithms, seeds, train_argv, overrides, grid, runs,
                s.retry_failed, list(s.command))
