"""The whole tree passes the ruff configuration of pyproject.toml (``.ci/run`` runs it too).

Kept as a test so that a landing that breaks the lint fails here, with the fix named:
``ruff check --fix .`` repairs most findings (import order, pyupgrade, simplifications)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    proc = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    hint = "`ruff check .` failed (`ruff check --fix .` fixes most of it)"
    assert proc.returncode == 0, f"{hint}:\n{proc.stdout[-4000:]}"
