"""Absurd input through the real command line: one line naming the flag or the file and
what was asked, exit status 2; never a traceback, an allocation of terabytes, or a hang.

Seeds (:mod:`xcent.limits`), sizes checked against memory before allocating, ``--lr
auto`` without rows to score on, malformed reference checkpoints, YAML alias bombs in
every ``--config`` (:mod:`xcent.yamlio`), labels beyond int64, single-class data,
float64 features beyond float32, symbolic-link loops.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from xcent import cli, limits
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


# ----------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("seed", [HUGE_SEED, "-1", str(2**32), "1.5"])
def test_train_seed_out_of_range_flag_or_yaml(tmp_path, capsys, seed):
    data = make_data(tmp_path / "data")
    code, err = run(capsys, train_args(data, tmp_path / "out", "--seed", seed))
    one_line(code, err, "--seed", seed, "[0, 4294967295]")
    config = tmp_path / "c.yaml"
    config.write_text(f"seed: {seed}\n")
    code, err = run(capsys, train_args(data, tmp_path / "out", "--config", config))
    one_line(code, err, "--seed", seed)
    assert not (tmp_path / "out").exists()


def test_largest_seed_trains(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    assert xcent(*train_args(data, tmp_path / "out", "--seed", str(limits.MAX_SEED))) == 0
    assert f"seed: {limits.MAX_SEED}\n" in (tmp_path / "out" / "scent" / "config.yaml").read_text()


def test_every_command_checks_its_seeds(tmp_path, capsys):
    code, err = run(capsys, ["synth", "--out", tmp_path / "s", "--num-classes", 4, "--num-samples", 40,
                             "--seed", HUGE_SEED])
    one_line(code, err, "--seed", HUGE_SEED)
    code, err = run(capsys, ["synth", "--out", tmp_path / "s", "--seed", "-5"])
    one_line(code, err, "--seed", "-5")
    code, err = run(capsys, ["split", "--in", tmp_path, "--out", tmp_path / "o", "--seed", HUGE_SEED])
    one_line(code, err, "--seed", HUGE_SEED)
    data = make_data(tmp_path / "data")
    code, err = run(capsys, ["compare", "--data-dir", data, "--out-dir", tmp_path / "c", "--seeds", f"1,{HUGE_SEED}"])
    one_line(code, err, "--seeds", HUGE_SEED)
    assert not (tmp_path / "s").exists() and not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- sizes against memory


def test_a_huge_label_is_refused_before_allocating(tmp_path, capsys):
    labels = np.zeros(60, dtype=np.int64)
    labels[7] = HUGE_LABEL
    labels[8] = 1
    data = make_data(tmp_path / "data", labels=labels)
    for command in (["inspect", data], train_args(data, tmp_path / "out")):
        code, err = run(capsys, command)
        one_line(code, err, "labels.npy", f"label {HUGE_LABEL}", "8.0 PiB", "memory")
    assert not (tmp_path / "out").exists()


def test_huge_num_classes_is_refused(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    code, err = run(capsys, train_args(data, tmp_path / "out", "--num-classes", 10**15))
    one_line(code, err, f"--num-classes {10**15}", "memory")
    assert not (tmp_path / "out").exists()


def test_weight_larger_than_memory_is_refused(tmp_path, capsys, monkeypatch):
    # a limit of 1 MiB: 50,000 classes' counts (400 KB) fit, their 6-d weight (1.2 MB) does not
    monkeypatch.setattr(limits, "memory_limit", lambda device=None: (1 << 20, "a 1 MiB test limit"))
    data = make_data(tmp_path / "data")
    code, err = run(capsys, train_args(data, tmp_path / "out", "--num-classes", 50_000))
    one_line(code, err, "--num-classes 50000 with feature dimension 6", "weight (50000 x 6)", "1.1 MiB",
             "a 1 MiB test limit")
    assert not (tmp_path / "out").exists()


def test_memory_limit_is_at_most_the_machine():
    limit, what = limits.memory_limit()
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 1 << 20 < limit <= physical
    assert limits.format_bytes(limit) in what


def test_synth_too_large_for_memory(tmp_path, capsys):
    code, err = run(capsys, ["synth", "--out", tmp_path / "s", "--num-classes", 10**12, "--num-samples", 10**12])
    one_line(code, err, f"--num-samples {10**12}", "memory")
    code, err = run(capsys, ["synth", "--out", tmp_path / "s", "--num-classes", 2, "--num-samples", 4,
                             "--feature-dim", 10**13])
    one_line(code, err, f"--feature-dim {10**13}", "memory")
    assert not (tmp_path / "s").exists()


def test_split_checks_labels_like_every_reader(tmp_path, capsys):
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    labels = np.arange(40, dtype=np.uint64) % 4
    np.save(extracted / "features.npy", np.zeros((40, 3), dtype=np.float32))
    np.save(extracted / "is_cached.npy", np.ones(40, dtype=bool))
    labels[5] = 2**64 - 1
    np.save(extracted / "labels.npy", labels)
    code, err = run(capsys, ["split", "--in", extracted, "--out", tmp_path / "o", "--stratify"])
    one_line(code, err, str(2**64 - 1), "int64")
    labels[5] = HUGE_LABEL
    np.save(extracted / "labels.npy", labels.astype(np.int64))
    code, err = run(capsys, ["split", "--in", extracted, "--out", tmp_path / "o", "--stratify"])
    one_line(code, err, f"label {HUGE_LABEL}", "memory")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- --lr auto


@pytest.mark.parametrize("rows", [2, 6])
def test_lr_auto_without_rows_to_hold_out(tmp_path, capsys, rows):
    data = make_data(tmp_path / "data", labels=np.arange(rows), classes=rows)
    code, err = run(capsys, train_args(data, tmp_path / "out", "--lr", "auto"))
    one_line(code, err, "--lr auto", "two training rows", "--lr")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- xcent import


def reference_checkpoint(path: Path, **changes) -> Path:
    ref = {"model_state": {"fc.weight": torch.randn(5, 6)}, "epoch": 3, "criterion_nu": torch.rand(60),
           "optimizer_state": {"param_groups": [{"lr": 2.0, "initial_lr": 4.0}], "state": {}}}
    ref.update(changes)
    torch.save(ref, path)
    return path


@pytest.mark.parametrize("changes,needle", [
    ({"optimizer_state": {"param_groups": 5, "state": {}}}, "'param_groups' int 5"),
    ({"optimizer_state": {"param_groups": [], "state": [1, 2]}}, "'state' list [1, 2]"),
    ({"optimizer_state": [1]}, "'optimizer_state' is a list"),
    ({"model_state": {"fc.weight": torch.randn(0, 6)}}, "(0, 6)"),
    ({"epoch": 10**30}, f"'epoch' is {10**30}"),
])
def test_import_refuses_malformed_reference_checkpoints(tmp_path, capsys, changes, needle):
    ref = reference_checkpoint(tmp_path / "ref.pt", **changes)
    code, err = run(capsys, ["import", "--checkpoint", ref, "--algorithm", "scent", "--out", tmp_path / "x.pt"])
    one_line(code, err, f"--checkpoint {ref}", needle)
    assert not (tmp_path / "x.pt").exists()


def test_import_writes_what_every_reader_accepts(tmp_path, capsys):
    ref = reference_checkpoint(tmp_path / "ref.pt")
    assert xcent("import", "--checkpoint", ref, "--algorithm", "scent", "--out", tmp_path / "x.pt") == 0
    assert "learning rate 4.0" in capsys.readouterr().out
    data = make_data(tmp_path / "data")
    assert xcent("eval", "--checkpoint", tmp_path / "x.pt", "--data-dir", data) == 0


def test_export_with_an_absurd_epoch_is_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    from xcent.modelio import EXPORT_FORMAT, tensor_checksum

    weight = torch.randn(5, 6)
    header = {"format": EXPORT_FORMAT, "num_classes": "5", "feature_dim": "6", "algorithm": "scent",
              "epoch": str(10**30), "num_samples": "", "checksums": json.dumps({"weight": tensor_checksum(weight)})}
    save_file({"weight": weight}, str(tmp_path / "w.safetensors"), metadata=header)
    np.save(tmp_path / "f.npy", np.zeros((3, 6), dtype=np.float32))
    code, err = run(capsys, ["predict", "--checkpoint", tmp_path / "w.safetensors", "--features", tmp_path / "f.npy",
                             "--out", tmp_path / "p.jsonl"])
    one_line(code, err, "--checkpoint", f"epoch {10**30}")


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


def test_every_parser_reads_yaml_and_json_through_the_bounded_loaders():
    src = Path(__file__).resolve().parents[1] / "src" / "xcent"
    offenders = [str(p.relative_to(src)) for p in src.rglob("*.py") if p.name != "yamlio.py"
                 and (re.search(r"\bArgumentParser\(", p.read_text())
                      or re.search(r"yaml\.(safe_)?load\(|yaml\.load\(|json\.loads?\(", p.read_text()))]
    assert offenders == [], "parse through xcent.yamlio.argument_parser and read YAML/JSON with xcent.yamlio"


def test_config_file_too_large_is_refused_before_reading(tmp_path, capsys):
    config = tmp_path / "big.yaml"
    config.write_text("epochs: 1\n" + "#" * (2 << 20) + "\n")
    code, err = run(capsys, ["train", "--data-dir", tmp_path, "--config", config])
    one_line(code, err, f"--config {config}", "bytes")


# ----------------------------------------------------------------------------- smaller ones


def test_uint64_label_is_not_called_negative(tmp_path, capsys):
    labels = np.arange(60, dtype=np.uint64) % 5
    labels[9] = 2**64 - 1
    data = make_data(tmp_path / "data", labels=labels)
    code, err = run(capsys, ["inspect", data])
    one_line(code, err, "labels.npy", f"label {2**64 - 1}", "int64")
    assert "negative" not in err[0]


def test_single_class_data_does_not_train(tmp_path, capsys):
    data = make_data(tmp_path / "data", labels=np.zeros(60, dtype=np.int64), classes=1)
    code, err = run(capsys, train_args(data, tmp_path / "out"))
    one_line(code, err, f"--data-dir {data}", "at least 2 classes")
    code, err = run(capsys, train_args(data, tmp_path / "out", "--num-classes", 1))
    one_line(code, err, "--num-classes 1", "at least 2 classes")
    assert not (tmp_path / "out").exists()
    assert xcent(*train_args(data, tmp_path / "out", "--num-classes", 2)) == 0  # a class without rows is fine


def test_float64_features_beyond_float32_are_named(tmp_path, capsys):
    ref = reference_checkpoint(tmp_path / "ref.pt")
    assert xcent("import", "--checkpoint", ref, "--algorithm", "scent", "--out", tmp_path / "x.pt") == 0
    features = np.zeros((4, 6))
    features[2, 1] = 1e39  # finite in float64, inf in float32
    np.save(tmp_path / "f.npy", features)
    code, err = run(capsys, ["predict", "--checkpoint", tmp_path / "x.pt", "--features", tmp_path / "f.npy",
                             "--out", tmp_path / "p.jsonl"])
    one_line(code, err, f"--features {tmp_path / 'f.npy'}", "row 2", "float32")
    # the training data's check is the same one
    data = make_data(tmp_path / "data")
    np.save(data / "train" / "features.npy", np.where(np.arange(60)[:, None] == 5, 1e39, 0.5) * np.ones((60, 6)))
    code, err = run(capsys, train_args(data, tmp_path / "out"))
    one_line(code, err, "features.npy", "row 5", "float32")
    assert not (tmp_path / "p.jsonl").exists() and not (tmp_path / "out").exists()


def test_symbolic_link_loops_are_named_as_such(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    loop = data / "train" / "features.npy"
    loop.unlink()
    loop.symlink_to("features.npy")
    code, err = run(capsys, ["inspect", data])
    one_line(code, err, str(loop), "symbolic link loop")
    code, err = run(capsys, ["predict", "--checkpoint", loop, "--features", loop])
    one_line(code, err, f"--checkpoint {loop}", "symbolic link loop")
    config = tmp_path / "c.yaml"
    config.symlink_to("c.yaml")
    code, err = run(capsys, ["train", "--data-dir", data, "--config", config])
    one_line(code, err, f"--config {config}", "symbolic link loop")
    code, err = run(capsys, ["train", "--data-dir", data, "--config", tmp_path / "missing.yaml"])
    one_line(code, err, "missing.yaml", "no such file")


# ----------------------------------------------------------------------------- more numbers, JSON


@pytest.mark.parametrize("setting,needle", [
    ("weight_decay: .inf", "--weight-decay inf"),
    ("dist_timeout: .inf", "--dist-timeout inf"),
    ("dist_timeout: -5", "--dist-timeout -5"),
])
def test_train_floats_out_of_range_in_a_config(tmp_path, capsys, setting, needle):
    data = make_data(tmp_path / "data")
    config = tmp_path / "c.yaml"
    config.write_text(setting + "\n")
    code, err = run(capsys, train_args(data, tmp_path / "out", "--config", config))
    one_line(code, err, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--noise", "1e308"], "overflow float32"),
    (["--noise", "-1"], "--noise -1"),
    (["--feature-norm", "1e6", "--dtype", "float16"], "overflow float16"),
    (["--config", "TAIL"], "--tail-exponent"),
])
def test_synth_never_writes_features_the_reader_refuses(tmp_path, capsys, flags, needle):
    (tmp_path / "tail.yaml").write_text("tail_exponent: -1.0e+308\n")
    flags = [str(tmp_path / "tail.yaml") if f == "TAIL" else f for f in flags]
    code, err = run(capsys, ["synth", "--out", tmp_path / "s", "--num-classes", 10, "--num-samples", 100, *flags])
    one_line(code, err, needle)
    assert not (tmp_path / "s").exists()


DEEP_JSON = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_json_in_a_run_log_is_damage_not_a_traceback(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    assert xcent(*train_args(data, tmp_path / "out", "--epochs", 2)) == 0
    log = tmp_path / "out" / "scent" / "eval_scent.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], DEEP_JSON, *lines[1:]]) + "\n")
    code, err = run(capsys, train_args(data, tmp_path / "out", "--epochs", 3, "--resume", "latest"))
    one_line(code, err, str(log), "line 2")
    # a comparison's compare.json read by xcent plot, and a file at predict's --out
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "compare.json").write_text(DEEP_JSON)
    code, err = run(capsys, ["plot", tmp_path / "cmp", "--out", tmp_path / "fig.png"])
    one_line(code, err, "compare.json")
    ref = reference_checkpoint(tmp_path / "ref.pt")
    assert xcent("import", "--checkpoint", ref, "--algorithm", "scent", "--out", tmp_path / "x.pt") == 0
    np.save(tmp_path / "f.npy", np.zeros((3, 6), dtype=np.float32))
    (tmp_path / "p.jsonl").write_text(DEEP_JSON + "\n")
    code, err = run(capsys, ["predict", "--checkpoint", tmp_path / "x.pt", "--features", tmp_path / "f.npy",
                             "--out", tmp_path / "p.jsonl"])
    one_line(code, err, "p.jsonl")
    assert (tmp_path / "p.jsonl").read_text() == DEEP_JSON + "\n"
