"""The generated parts of the docs match the code: docs/cli.md is the --help of every command
as the parsers print it, and the table in docs/algorithms.md is the algorithm registry."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIX = "run python scripts/gen_docs.py"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_page_is_current():
    gen = _generator()
    page = gen.OUT.read_text()
    made_with = re.search(r"\(Python (\d+\.\d+)\)", page)
    assert made_with, f"docs/cli.md lacks its generator header: {FIX}"
    if made_with.group(1) != gen.python_version():
        pytest.skip(f"docs/cli.md was made with Python {made_with.group(1)}; argparse formats help per version")
    assert page == gen.render(), f"docs/cli.md is stale: {FIX}"


def test_algorithm_table_is_the_registry():
    gen = _generator()
    page = gen.ALGORITHMS.read_text()
    assert page == gen.render_algorithms(page), f"the table in docs/algorithms.md is stale: {FIX}"
    from xcent.losses import REGISTRY

    table = page.split(gen.TABLE_START)[1].split(gen.TABLE_END)[0]
    assert [line.split("`")[1] for line in table.strip().splitlines()[2:]] == list(REGISTRY)


def test_every_command_is_documented_from_its_own_help():
    gen = _generator()
    from xcent.cli import SUBCOMMANDS

    page = gen.OUT.read_text()
    for name in SUBCOMMANDS:
        assert f"\n## xcent {name}\n" in page
    train_help = gen.command_help(["train", "--help"])
    assert train_help.startswith("usage: xcent train")
    for flag in ("--data-dir", "--algorithm", "--epochs", "--resume"):
        assert flag in train_help
    with pytest.raises(RuntimeError, match="exited with 2"):
        gen.command_help(["no-such-command"])
