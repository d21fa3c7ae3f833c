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
