"""`python -m vlmkit ...`: the same command line as `vlmkit ...`."""

from vlmkit.cli import entry

entry()
