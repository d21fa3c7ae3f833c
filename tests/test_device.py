"""The device and CPU-thread policy of xcent.device."""

import pytest
import torch

from xcent.device import STEP_PARALLEL_FLOPS, ThreadPolicy, parse_threads, resolve_device
from xcent.errors import UsageError


@pytest.mark.parametrize("value, expected", [("auto", None), (None, None), ("AUTO", None), ("3", 3), (1, 1)])
def test_parse_threads(value, expected):
    assert parse_threads(value) == expected


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5"])
def test_parse_threads_refuses_bad_values_naming_the_flag(value):
    with pytest.raises(UsageError, match=r"^--threads "):
        parse_threads(value)


def test_auto_uses_one_thread_for_small_steps_and_all_for_large_steps_and_evaluation():
    policy = ThreadPolicy("auto", max_threads=8)
    small_b = 128
    assert 4 * small_b * small_b * 512 < STEP_PARALLEL_FLOPS
    assert policy.step_threads(small_b, 512) == 1
    large_b = 4096
    assert 4 * large_b * large_b * 512 >= STEP_PARALLEL_FLOPS
    assert policy.step_threads(large_b, 512) == 8
    assert policy.eval_threads() == 8


def test_a_number_applies_to_every_phase():
    policy = ThreadPolicy(3, max_threads=8)
    assert policy.step_threads(128, 512) == policy.step_threads(4096, 512) == policy.eval_threads() == 3


def test_use_sets_and_restores_the_thread_count():
    before = torch.get_num_threads()
    with ThreadPolicy.use(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), ThreadPolicy.use(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match=r"^--device nonsense"):
        resolve_device("nonsense")


@pytest.mark.parametrize("flag, step_expected, eval_expected", [("auto", 1, "max"), ("1", 1, 1)])
def test_train_runs_steps_and_evaluations_under_the_policy(tiny_data, tmp_path, monkeypatch, flag, step_expected,
                                                            eval_expected):
    from xcent import train as train_mod
    from xcent.config import config_from_argv

    seen = {"step": set(), "eval": set()}
    real_step, real_eval = train_mod.train_step, train_mod.evaluate

    def step(*args, **kwargs):
        seen["step"].add(torch.get_num_threads())
        return real_step(*args, **kwargs)

    def evaluate(*args, **kwargs):
        seen["eval"].add(torch.get_num_threads())
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", step)
    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    before = torch.get_num_threads()
    with ThreadPolicy.use(2):  # as on a 2-core machine, whatever this one has
        c = config_from_argv(["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "1",
                              "--device", "cpu", "--threads", flag])
        train_mod.train(c, echo=lambda *_: None)
        assert torch.get_num_threads() == 2  # the caller's count is restored
    assert torch.get_num_threads() == before
    assert seen["step"] == {step_expected}
    assert seen["eval"] == {2 if eval_expected == "max" else eval_expected}


def test_train_refuses_a_bad_threads_value(tiny_data, tmp_path, capsys):
    from xcent import cli

    assert cli.main(["train", "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--threads", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("xcent train: error: --threads 0")


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_eval_and_predict_refuse_a_bad_threads_value(tmp_path, capsys, command):
    from xcent import cli

    argv = {"eval": ["eval", "--checkpoint", str(tmp_path / "x.pt"), "--data-dir", str(tmp_path)],
            "predict": ["predict", "--checkpoint", str(tmp_path / "x.pt"), "--features", str(tmp_path / "f.npy")]}
    assert cli.main([*argv[command], "--threads", "-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"xcent {command}: error: --threads -1")
