"""Exceptions the CLI maps to exit codes: GDWSError -> 2, GateFailed -> 1.

Library messages name the *parameter* a Python caller passed (`error_budget must be in [0, 1)`).
An `OptionError` carries that parameter's name, so the CLI can say it in its own terms
(`--error-budget must be in [0, 1)`) without the library knowing any flag."""

from __future__ import annotations


class GDWSError(Exception):
    """Bad usage or an input that cannot be processed (CLI exit code 2)."""


class OptionError(GDWSError):
    """A bad option value or combination. `params` are the parameter names involved, in the order
    the message names them; str(error) names them as parameters, `render(name_of)` as the CLI does."""

    def __init__(self, message: str, *params: str):
        """`message` uses {0}, {1}, ... where the parameter names go: OptionError('{0} must be >= 1', 'runs')."""
        self.template = message
        self.params = params
        super().__init__(self.render(lambda p: p))

    def render(self, name_of) -> str:
        """The message with each parameter written as name_of(parameter)."""
        return self.template.format(*(name_of(p) for p in self.params))


def literal(text: object) -> str:
    """`text` (a path, a value, another error's message) escaped for an OptionError message, so
    that its braces are not taken for placeholders: OptionError(f"cannot read {{0}} {literal(path)}", "data")."""
    return str(text).replace("{", "{{").replace("}", "}}")


class GateFailed(Exception):
    """A verification or accuracy gate failed (CLI exit code 1)."""
