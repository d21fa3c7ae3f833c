"""The device and CPU-thread policy of xcent.device."""

import pytest
import torch

from xcent import device as device_mod
from xcent.classifier import full_softmax_stats
from xcent.device import (
    EVAL_PROBE_BUDGET,
    EVAL_REPROBE_SECONDS,
    PROBE_ROUNDS,
    STEP_PARALLEL_FLOPS,
    ThreadPolicy,
    gemm_probe,
    parse_threads,
    resolve_device,
)
from xcent.errors import UsageError


@pytest.mark.parametrize("value, expected", [("auto", None), (None, None), ("AUTO", None), ("3", 3), (1, 1)])
def test_parse_threads(value, expected):
    assert parse_threads(value) == expected


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5"])
def test_parse_threads_refuses_bad_values_naming_the_flag(value):
    with pytest.raises(UsageError, match=r"^--threads "):
        parse_threads(value)


def test_auto_uses_one_thread_for_small_steps_and_all_for_large_steps():
    policy = ThreadPolicy("auto", max_threads=8)
    small_b = 128
    assert 4 * small_b * small_b * 512 < STEP_PARALLEL_FLOPS
    assert policy.step_threads(small_b, 512) == 1
    large_b = 4096
    assert 4 * large_b * large_b * 512 >= STEP_PARALLEL_FLOPS
    assert policy.step_threads(large_b, 512) == 8


class FakeProbe:
    """Seconds per thread count, as given (changeable), and every call's thread count."""

    def __init__(self, seconds):
        self.seconds, self.calls = dict(seconds), []

    def __call__(self, threads):
        self.calls.append(threads)
        return self.seconds[threads]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


BIG = 1e15  # flops of an evaluation that pays for any probe


@pytest.mark.parametrize("seconds, expected", [({1: 0.005, 8: 0.004}, 8), ({1: 0.004, 8: 0.005}, 1),
                                               ({1: 0.0042, 8: 0.004}, 1)])  # a near tie goes to one thread
def test_auto_evaluation_takes_the_faster_thread_count_of_the_probe(seconds, expected):
    probe = FakeProbe(seconds)
    policy = ThreadPolicy("auto", max_threads=8, probe=probe, clock=FakeClock())
    assert policy.eval_threads(512, BIG) == expected
    # both counts timed the same number of times, interleaved: all rounds when close
    assert probe.calls == [1, 8] * PROBE_ROUNDS
    assert policy.probes[-1]["threads"] == expected


def test_the_probe_stops_after_a_round_that_is_already_clear():
    probe = FakeProbe({1: 0.002, 8: 0.020})  # a loaded machine: the second thread stalls
    policy = ThreadPolicy("auto", max_threads=8, probe=probe, clock=FakeClock())
    assert policy.eval_threads(512, BIG) == 1
    assert probe.calls == [1, 8] and policy.probes[-1]["rounds"] == 1


def test_auto_evaluation_probes_again_only_when_due_and_paid_for():
    probe, clock = FakeProbe({1: 0.004, 8: 0.010}), FakeClock()
    policy = ThreadPolicy("auto", max_threads=8, probe=probe, clock=clock)
    assert policy.eval_threads(512, BIG) == 1
    calls = len(probe.calls)
    probe.seconds = {1: 0.010, 8: 0.004}  # the machine's load changed
    clock.now += EVAL_REPROBE_SECONDS / 2
    assert policy.eval_threads(512, BIG) == 1 and len(probe.calls) == calls  # not due yet: the last choice
    clock.now += EVAL_REPROBE_SECONDS
    assert policy.eval_threads(512, BIG) == 8 and len(probe.calls) == 2 * calls  # due: probed again
    clock.now += 10 * EVAL_REPROBE_SECONDS
    tiny = 1e6  # due by the clock, but such small evaluations do not pay for a probe
    assert policy.eval_threads(512, tiny) == 8 and len(probe.calls) == 2 * calls
    # the probes cost at most the budget's share of the evaluation work they decided
    assert policy.probe_flops <= EVAL_PROBE_BUDGET * (3 * BIG + tiny)


def test_auto_evaluation_too_small_for_a_probe_runs_on_one_thread_until_the_work_adds_up():
    probe = FakeProbe({1: 0.005, 8: 0.004})  # close: all rounds, the probe's full cost
    policy = ThreadPolicy("auto", max_threads=8, probe=probe, clock=FakeClock())
    small = 1e9  # one probe at D = 512 costs ~1.9 GFLOP: more than 3% of this
    assert policy.eval_threads(512, small) == 1 and probe.calls == []
    evaluations = 1
    while not probe.calls:
        threads = policy.eval_threads(512, small)
        evaluations += 1
    # the first probe came as soon as the evaluations so far paid for it, and it decided
    assert threads == 8 and len(policy.probes) == 1
    assert policy.probe_flops <= EVAL_PROBE_BUDGET * small * evaluations
    assert policy.probe_flops > EVAL_PROBE_BUDGET * small * (evaluations - 1)


def test_no_probe_for_a_number_one_core_or_another_device():
    probe = FakeProbe({1: 0.010, 2: 0.004, 8: 0.004})
    assert ThreadPolicy(2, max_threads=8, probe=probe).eval_threads(512, BIG) == 2
    assert ThreadPolicy("auto", max_threads=1, probe=probe).eval_threads(512, BIG) == 1
    assert ThreadPolicy("auto", max_threads=8, probe=probe, device="meta").eval_threads(512, BIG) == 8
    assert probe.calls == []


def test_evaluation_runs_the_block_with_the_choice_and_restores_the_count():
    before = torch.get_num_threads()
    probe = FakeProbe({1: 0.004, 2: 0.010})
    with ThreadPolicy("auto", max_threads=2, probe=probe).evaluation(512, BIG) as threads:
        assert threads == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_the_real_probe_restores_the_thread_count_and_times_something():
    before = torch.get_num_threads()
    probe = gemm_probe(16)
    assert probe(1) > 0 and probe(2) > 0
    assert torch.get_num_threads() == before
    policy = ThreadPolicy("auto", max_threads=2)
    assert policy.eval_threads(16, BIG) in (1, 2) and len(policy.probes) == 1
    assert torch.get_num_threads() == before


def test_evaluation_gives_the_same_bits_at_one_and_two_threads():
    """What lets ``auto`` pick a thread count by timing: the count splits the work, it
    does not change what is summed (so runs and resumed runs agree bitwise)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3000, 64, generator=gen)
    x, y = torch.randn(300, 64, generator=gen), torch.randint(0, 3000, (300,), generator=gen)
    results = []
    for threads in (1, 2):
        with ThreadPolicy.use(threads):
            results.append(full_softmax_stats(x, y, weight))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_number_applies_to_every_phase():
    policy = ThreadPolicy(3, max_threads=8)
    assert policy.step_threads(128, 512) == policy.step_threads(4096, 512) == policy.eval_threads(512, BIG) == 3


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


@pytest.mark.parametrize("flag, faster, step_expected, eval_expected, start",
                         [("auto", 2, 1, 2, []), ("auto", 1, 1, 1, []), ("1", 2, 1, 1, []),
                          # the start's phases too: class-mean init scoring, lr-search steps and scoring
                          ("auto", 2, 1, 2, ["--init", "class-means", "--lr", "auto"])])
def test_train_runs_steps_and_evaluations_under_the_policy(tiny_data, tmp_path, monkeypatch, flag, faster,
                                                            step_expected, eval_expected, start):
    from xcent import train as train_mod
    from xcent.config import config_from_argv

    # a probe that finds `faster` threads faster, and a budget that lets tiny evaluations pay for it
    monkeypatch.setattr(device_mod, "gemm_probe", lambda *_: FakeProbe({faster: 0.001, 3 - faster: 0.002}))
    monkeypatch.setattr(device_mod, "EVAL_PROBE_BUDGET", float("inf"))
    seen = {"step": set(), "eval": set()}
    real_step, real_eval = train_mod.train_step, train_mod.evaluate

    def step(*args, **kwargs):
        seen["step"].add(torch.get_num_threads())
        return real_step(*args, **kwargs)

    def evaluate(*args, **kwargs):
        seen["eval"].add(torch.get_num_threads())
        return real_eval(*args, **kwargs)

    from xcent import init as init_mod

    real_stats = init_mod.scale_grid_stats

    def stats(*args, **kwargs):
        seen["eval"].add(torch.get_num_threads())
        return real_stats(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", step)
    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    monkeypatch.setattr(init_mod, "scale_grid_stats", stats)
    before = torch.get_num_threads()
    with ThreadPolicy.use(2):  # as on a 2-core machine, whatever this one has
        c = config_from_argv(["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "1",
                              "--device", "cpu", "--threads", flag, *start])
        train_mod.train(c, echo=lambda *_: None)
        assert torch.get_num_threads() == 2  # the caller's count is restored
    assert torch.get_num_threads() == before
    assert seen["step"] == {step_expected}
    assert seen["eval"] == {eval_expected}
    # the probe's choice is in the run's log (auto only: a number is not probed)
    logged = "".join(p.read_text() for p in tmp_path.rglob("out.log"))
    assert (f"evaluation threads: {faster} (probe" in logged) == (flag == "auto")


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
