"""Absurd input through the real command line: one line naming the flag or the file and
what was asked, exit status 2; never a traceback, an allocation of terabytes, or a hang.

YAML alias bombs in every ``--config`` (:mod:`xcent.yamlio`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest

from xcent import cli
from xcent.data import write_split
from xcent.yamlio import MAX_YAML_NODES, YamlLimitError, check_yaml, load_yaml

HUGE_SEED = "123456789012345678901234567890"
HUGE_LABEL = 2**50  # one 8-byte count per class: 8 PiB, more than any machine


def make_data(root: Path, n_train=60, n_val=20, dim=6, classes=5, seed=0, labels=None) -> Path:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n_train) if labels is None else labels
    write_split(root / "train", rng.standard_normal((len(y), dim)).astype(np.float32), y)
    write_split(root / "val", rng.standard_normal((n_val, dim)).astype(np.float32), rng.integers(0, classes, n_val))
    return root


def xcent(*args) -> int:
    return cli.main([str(a) for a in args])


def run(capsys, args) -> tuple[int, list[str]]:
    code = xcent(*args)
    return code, capsys.readouterr().err.strip().splitlines()


def one_line(code, err, *needles):
    # a parser's error is followed by where to find the flags (docs/reliability.md)
    assert code == 2 and (len(err) == 1 or len(err) == 2 and err[1].endswith("--help lists the flags)")), (code, err)
    for needle in needles:
        assert needle in err[0], err[0]


@contextlib.contextmanager
def deadline(seconds: int, more_memory: int = 2 << 30):
    """Fail (rather than hang, or grow until the machine kills something) if the block
    runs longer than ``seconds`` or maps ``more_memory`` bytes more than it has now."""
    import resource

    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")

    mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limits_before = resource.getrlimit(resource.RLIMIT_AS)
    hard = limits_before[1]
    cap = mapped + more_memory if hard == resource.RLIM_INFINITY else min(mapped + more_memory, hard)
    previous = signal.signal(signal.SIGALRM, expired)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_AS, limits_before)
        signal.signal(signal.SIGALRM, previous)


def train_args(data, out, *extra):
    return ["train", "--data-dir", data, "--out-dir", out, "--epochs", "1", "--batch-size", "16", *extra]


# ----------------------------------------------------------------------------- YAML


def bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("command", [
    ["train", "--data-dir", "DATA", "--out-dir", "OUT"],
    ["demo", "--data-dir", "DATA", "--out-dir", "OUT"],
    ["synth", "--out", "OUT"],
    ["compare", "--data-dir", "DATA", "--out-dir", "OUT"],
])
def test_yaml_alias_bomb_in_any_config_is_refused_at_once(tmp_path, capsys, command):
    data = make_data(tmp_path / "data")
    config = tmp_path / "bomb.yaml"
    # under a key compare knows (the grid), so that no unknown key stops it first
    config.write_text(bomb() + ("grid: {scent: {lr: *a8}}\n" if command[0] == "compare" else ""))
    args = [str(data) if a == "DATA" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    with deadline(20):
        code, err = run(capsys, args + ["--config", config])
    one_line(code, err, f"--config {config}", "alias")
    assert not (tmp_path / "out").exists()


def test_yaml_bomb_as_a_flag_value_or_inline_config(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    with deadline(20):
        code, err = run(capsys, train_args(data, tmp_path / "out", "--lr", bomb()))
        one_line(code, err, "alias")
        code, err = run(capsys, train_args(data, tmp_path / "out", "--config", bomb()))
        one_line(code, err, "--config (inline YAML)", "alias")


def test_bounded_loader_limits():
    with pytest.raises(YamlLimitError, match="alias"):
        check_yaml(bomb(6), "x")  # 9^6 = 531,441 values
    assert load_yaml(bomb(5), "x")["a4"][8][8][8][8][8] == "lol"  # 9^5 = 59,049: within MAX_YAML_NODES
    with pytest.raises(YamlLimitError, match="recursive"):
        check_yaml("a: &a [1, *a]\n", "x")
    with pytest.raises(YamlLimitError, match="deeply"):
        check_yaml("a: " + "[" * 20000 + "]" * 20000, "x")
    with pytest.raises(YamlLimitError, match="characters"):
        check_yaml("a: " + "x" * (1 << 21), "x")
    # anchors used as intended still load, shared values included
    shared = load_yaml("base: &b {lr: 2, gamma: 0.5}\nscent: *b\nsox: *b\n", "x")
    assert shared["sox"] == shared["scent"] == {"lr": 2, "gamma": 0.5}
    assert MAX_YAML_NODES >= 10_000


def test_compare_config_with_anchors_still_works(tmp_path):
    from xcent.cli.compare import plan_from_argv

    data = make_data(tmp_path / "data")
    config = tmp_path / "c.yaml"
    config.write_text("algorithms: {scent: &c {lr: 3.0}, sox: *c}\nepochs: 1\n")
    plan = plan_from_argv(["--config", str(config), "--data-dir", str(data), "--out-dir", str(tmp_path / "o")])
    assert [r.config["lr"] for r in plan.runs] == [3.0, 3.0]


def test_every_parser_reads_yaml_through_the_bounded_loader():
    src = Path(__file__).resolve().parents[1] / "src" / "xcent"
    offenders = [str(p.relative_to(src)) for p in src.rglob("*.py") if p.name != "yamlio.py"
                 and (re.search(r"\bArgumentParser\(", p.read_text())
                      or re.search(r"yaml\.(safe_)?load\(|yaml\.load\(", p.read_text()))]
    assert offenders == [], "parse through xcent.yamlio.argument_parser and read YAML with xcent.yamlio"


def test_config_file_too_large_is_refused_before_reading(tmp_path, capsys):
    config = tmp_path / "big.yaml"
    config.write_text("epochs: 1\n" + "#" * (2 << 20) + "\n")
    code, err = run(capsys, ["train", "--data-dir", tmp_path, "--config", config])
    one_line(code, err, f"--config {config}", "bytes")
