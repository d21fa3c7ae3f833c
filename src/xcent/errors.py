"""Errors that the command line turns into a one-line message and an exit status.

`UsageError` (exit 2) is bad input: a missing file, a flag out of range, data that
fails validation. `DivergenceError` (exit 3) is a training run that produced a
non-finite value. Library code raises these; only `xcent.cli` prints and exits.
"""


class XcentError(Exception):
    """Base of the errors the CLI reports as one line."""

    exit_code = 1


class UsageError(XcentError):
    """Bad input (a file, a flag, a dataset): exit status 2."""

    exit_code = 2


class DivergenceError(XcentError):
    """Training produced a non-finite loss or weight: exit status 3."""

    exit_code = 3
