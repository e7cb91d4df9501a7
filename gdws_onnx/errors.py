"""Exceptions the CLI maps to exit codes: GDWSError -> 2, GateFailed -> 1."""


class GDWSError(Exception):
    """Bad usage or an input that cannot be processed (CLI exit code 2)."""


class GateFailed(Exception):
    """A verification or accuracy gate failed (CLI exit code 1)."""
