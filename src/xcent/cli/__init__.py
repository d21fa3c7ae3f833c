"""The `xcent` command: a thin dispatcher over subcommands.

Each subcommand is a function ``main(argv) -> int`` in a module of this package
(``xcent.cli.<module>``) that parses its flags and calls the library; modules are
imported lazily so that ``xcent train`` does not pay for (or require) the
feature-extraction extras. Library modules hold no command-line code.
`XcentError`s become a one-line ``xcent <cmd>: error: ...`` on stderr and their
exit status (2 for bad input, 3 for divergence).
"""

from __future__ import annotations

import importlib
import sys

from ..errors import XcentError

#: subcommand name -> (module:function, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("xcent.cli.train:main", "train a linear classifier with one of the six algorithms"),
    "eval": ("xcent.cli.evaluate:main", "full-softmax CE and top-1/top-5 of a checkpoint on a split"),
    "synth": ("xcent.cli.data:synth_main", "write a synthetic long-tailed dataset in the layout xcent train reads"),
    "inspect": ("xcent.cli.data:inspect_main", "report a dataset's shape and the settings it suggests"),
    "demo": ("xcent.cli.train:demo_main", "train SCENT on a cached built-in synthetic dataset"),
    "extract": ("xcent.cli.extract:extract_main", "extract features from webdataset image shards"),
    "split": ("xcent.cli.extract:split_main", "split extracted features into train/val/test"),
    "compare": ("xcent.cli.compare:compare_main", "run several algorithms/seeds and compare them"),
    "plot": ("xcent.cli.compare:plot_main", "draw the comparison figure from existing runs"),
    "predict": ("xcent.cli.predict:predict_main", "top-k classes of new feature vectors"),
    "export": ("xcent.cli.predict:export_main", "export a checkpoint's weight as safetensors"),
}


def _usage() -> str:
    lines = ["usage: xcent <command> [options]   (xcent <command> --help for its flags)", "", "commands:"]
    for name, (_, help_text) in SUBCOMMANDS.items():
        lines.append(f"  {name:<9} {help_text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"xcent: error: unknown command {name!r}\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = SUBCOMMANDS[name][0].split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        print(f"xcent {name}: error: this command is not available ({exc})", file=sys.stderr)
        return 2
    try:
        return int(func(rest) or 0)
    except XcentError as exc:
        print(f"xcent {name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"xcent {name}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
