"""The `xcent` command: a thin dispatcher over subcommands.

Each subcommand is a function ``main(argv) -> int`` in a module of this package
(``xcent.cli.<module>``) that parses its flags and calls the library; modules are
imported lazily so that ``xcent train`` does not pay for (or require) the
feature-extraction extras. Library modules hold no command-line code.
`XcentError`s become a one-line ``xcent <cmd>: error: ...`` on stderr and their
exit status (2 for bad input, 3 for divergence). Three more failures get the same
one line here, in one place rather than a try/except in every command:

* a parser error (a flag of the wrong type, a missing required flag): the reason
  first, on one line, then where to find the flags (argparse and jsonargparse print
  ~16 lines of usage first and have no setting to change that);
* a ``--config`` file that is a directory or not UTF-8 text (jsonargparse raises a
  bare ``UnicodeDecodeError`` for a binary file): checked before parsing;
* an output that cannot be written (a full disk, a read-only or forbidden
  directory: ``OSError`` ENOSPC/EDQUOT/EROFS/EACCES/EPERM/EFBIG, see
  :mod:`xcent.fileio`): ``no space left on device while writing PATH``, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from ..errors import UsageError, XcentError
from ..fileio import describe_output_error, why_missing
from ..yamlio import MAX_YAML_BYTES, check_yaml, load_yaml

#: subcommand name -> (module:function, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("xcent.cli.train:main", "train a linear classifier with one of the six algorithms"),
    "eval": ("xcent.cli.evaluate:main", "full-softmax CE and top-1/top-5 of a checkpoint on a split"),
    "synth": ("xcent.cli.data:synth_main", "write a synthetic long-tailed dataset in the layout xcent train reads"),
    "inspect": ("xcent.cli.data:inspect_main", "report a dataset's shape and the settings it suggests"),
    "demo": ("xcent.cli.train:demo_main", "train SCENT on a cached built-in synthetic dataset"),
    "extract": ("xcent.cli.extract:extract_main", "extract features from webdataset image shards"),
    "split": ("xcent.cli.extract:split_main", "split extracted features into train/val/test"),
    "import": ("xcent.cli.reference:import_main", "convert a checkpoint of the reference implementation"),
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


class _ParserError(Exception):
    """A command-line parser's error, carried to :func:`main` instead of exiting."""


@contextmanager
def _one_line_parser_errors():
    """While a command runs, its parsers' errors raise `_ParserError` (so that
    :func:`main` prints the reason first) instead of printing usage and exiting.
    Parsers built with ``exit_on_error=False`` (``xcent compare`` parses train flags
    that way) keep raising their own ``ArgumentError``."""
    import jsonargparse

    originals = {cls: cls.__dict__["error"] for cls in (argparse.ArgumentParser, jsonargparse.ArgumentParser)}

    def error(self, message, *args, **kwargs):
        if not getattr(self, "exit_on_error", True):
            return originals[jsonargparse.ArgumentParser if isinstance(self, jsonargparse.ArgumentParser)
                             else argparse.ArgumentParser](self, message, *args, **kwargs)
        # jsonargparse names a flag 'Parser key "train_eval_size"': say --train-eval-size
        message = re.sub(r'Parser key "([A-Za-z0-9_]+)":?',
                         lambda m: "--" + m.group(1).replace("_", "-") + ":", str(message))
        message = re.sub(r"Not of type Seed: ", "", message)  # xcent's own types (Seed) give the reason
        raise _ParserError(" ".join(message.split()))

    for cls in originals:
        cls.error = error
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.error = original


def _check_config_files(argv: list[str]) -> None:
    """``--config FILE`` must be a readable UTF-8 text file (jsonargparse would raise a
    bare UnicodeDecodeError on a binary one) within the bounds of :mod:`xcent.yamlio`
    (checked here too, so that the message names the file as given). A value that is
    not an existing path must be an inline YAML mapping (jsonargparse accepts one);
    otherwise the message says why the file is not there (missing, a link loop)."""
    for i, arg in enumerate(argv):
        flag, _, value = arg.partition("=")
        if flag not in ("--config", "--config-file"):
            continue
        if not value:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        path = Path(value)
        try:
            exists = bool(value) and path.exists()
        except OSError:  # e.g. an inline YAML text longer than a file name may be
            exists = False
        if not exists:
            if value and "\n" not in value and os.path.lexists(value):  # a broken link, a link loop
                raise UsageError(f"{flag} {value}: {why_missing(value)}")
            shown = value if "\n" not in value and len(value) <= 80 else "(inline YAML)"
            if value and not isinstance(load_yaml(value, f"{flag} {shown}"), dict):
                raise UsageError(f"{flag} {shown}: {why_missing(value)}, nor a YAML mapping given inline")
            continue
        if not path.is_file():
            raise UsageError(f"{flag} {value}: not a file")
        try:
            if path.stat().st_size > MAX_YAML_BYTES:  # read before jsonargparse reads it whole
                raise UsageError(f"{flag} {value}: {path.stat().st_size} bytes, more than the {MAX_YAML_BYTES} "
                                 f"read from a YAML file")
            check_yaml(path.read_bytes().decode("utf-8"), f"{flag} {value}")  # named as given
        except UnicodeDecodeError as exc:
            raise UsageError(f"{flag} {value}: not a UTF-8 text (YAML) file (byte {exc.start})") from None
        except OSError as exc:
            raise UsageError(f"{flag} {value}: cannot be read ({exc.strerror})") from None


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
        _check_config_files(rest)
        with _one_line_parser_errors():
            return int(func(rest) or 0)
    except _ParserError as exc:
        print(f"xcent {name}: error: {exc}\n(xcent {name} --help lists the flags)", file=sys.stderr)
        return 2
    except XcentError as exc:
        print(f"xcent {name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        message = describe_output_error(exc)
        if message is None:
            raise
        print(f"xcent {name}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xcent {name}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
