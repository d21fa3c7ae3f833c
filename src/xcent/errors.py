"""Errors that the command line turns into a one-line message and an exit status.

`UsageError` (exit 2) is bad input: a missing file, a flag out of range, data that
fails validation; `ArgumentError`, a `UsageError` that is also a `ValueError`, is a
bad argument to a library call. `DivergenceError` (exit 3) is a training run that
produced a non-finite value or blew up. Library code raises these; only `xcent.cli`
prints and exits.
"""


class XcentError(Exception):
    """Base of the errors the CLI reports as one line."""

    exit_code = 1


class UsageError(XcentError):
    """Bad input (a file, a flag, a dataset): exit status 2."""

    exit_code = 2


class ArgumentError(UsageError, ValueError):
    """A bad argument to a library function or class (its message names the argument,
    not a command-line flag). A ``ValueError`` too, so that ``except ValueError``
    catches it as it would any invalid value."""


class DivergenceError(XcentError):
    """Training produced a non-finite loss or weight, or blew up (its cross-entropy far
    above log C): exit status 3."""

    exit_code = 3
