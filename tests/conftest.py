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


def sgd_drift(steps: int, additions: int, momentum: float = 0.0) -> float:
    """How far apart, relative to the size of the weights, two float32 trainings of the
    same steps may drift when they sum in other orders (one process or two, a sparse
    step or a dense ``nn.Linear``): each step's update sums ``additions`` terms (the
    batch's rows, and the D products of the scores feeding them), so it is within
    ``gamma_additions`` of its magnitudes, ``2 gamma`` between the two orders; to first
    order the steps' errors add, and momentum ``m`` carries each into the following
    steps with weights summing to ``1 / (1 - m)``. A worst case: real runs differ by
    ~1e-7 relative, a real fault (a step lost, a row missed) by ~lr * gradient."""
    return 2 * steps * gamma(additions) / (1 - momentum)


def mean_ce_tol(features, weight: torch.Tensor, scale_rel: float = 0.0) -> float:
    """How far two float32 evaluations of the mean full-softmax CE of ``weight`` on
    ``features`` may be apart when their GEMMs sum in other orders (another chunking,
    thread count or process count). Each score is within ``gamma_D |x| |w|`` of exact,
    the log-sum-exp adds ``gamma_{C + 4}`` of its size (at most ``|x| |w| + log C``), and
    a CE (lse - target) is 2-Lipschitz in the scores; a mean keeps the per-row bound.
    ``scale_rel``: the weights may differ by that much relative (a class-mean start whose
    scale was searched on rounded logits: a CE moves by at most 2 scale_rel |x| |w|)."""
    import math

    import numpy as np

    x = torch.from_numpy(np.array(features, dtype=np.float64))
    w = weight.detach().to(torch.float64)
    xw = float(x.norm(dim=1).max()) * float(w.norm(dim=1).max())
    one = 2 * gamma(x.shape[1]) * xw + gamma(w.shape[0] + 4) * (xw + math.log(w.shape[0]))
    return 2 * one + 2 * scale_rel * xw


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
