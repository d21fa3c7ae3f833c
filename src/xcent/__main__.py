"""`python -m xcent ...` is the same as the `xcent` command."""

from .cli import entry

entry()
