import json
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from xcent.data import synthesize

#: Devices the device-parametrized tests run on: the CPU always, CUDA where present
#: (benchmarks/device_check.sh runs the suite on a GPU machine).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each device of :data:`DEVICES` in turn; tests that take it are marked ``device``."""
    return torch.device(request.param)


def pytest_collection_modifyitems(items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic dataset (60 classes, 16-d, 1,200 rows) shared by tests that only read it."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    synthesize(out, num_classes=60, feature_dim=16, num_samples=1200, val_fraction=0.1, test_fraction=0.1,
               seed=0, noise=0.5)
    return out


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``, ``u`` the unit roundoff of ``dtype``
    (2^-24 for float32, 2^-53 for float64): a sum or dot product of ``n`` terms
    computed in *any* order (any GEMM kernel, blocking, FMA use or thread count) is
    within ``gamma_n`` times the sum of its terms' magnitudes of the exact value
    (*Accuracy and Stability of Numerical Algorithms*, 2nd ed., section 3.1), so two
    orders of the same sum are within ``2 gamma_n`` of each other. The tolerances of
    tests comparing float results of different summation orders are built from it,
    never from what one machine gave."""
    u = torch.finfo(dtype).eps / 2
    assert n * u < 1
    return n * u / (1 - n * u)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class AllocationRecorder(TorchDispatchMode):
    """Records the size of the largest tensor any op creates (in-place results, which
    reuse memory, excluded): a test's proof that memory does not scale with C or N."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func._schema.name.endswith("_") and "out" not in (kwargs or {}):
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    self.max_numel = max(self.max_numel, t.numel())
        return out
