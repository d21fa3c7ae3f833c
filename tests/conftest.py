import json
from pathlib import Path

import pytest

from xcent.data import synthesize


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic dataset (60 classes, 16-d, 1,200 rows) shared by tests that only read it."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    synthesize(out, num_classes=60, feature_dim=16, num_samples=1200, val_fraction=0.1, test_fraction=0.1,
               seed=0, noise=0.5)
    return out


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
