"""Exceptions the CLI maps to exit codes: GDWSError -> 2, GateFailed -> 1.

Library messages name the *parameter* a Python caller passed (`error_budget must be in [0, 1)`).
An `OptionError` carries that parameter's name, so the CLI can say it in its own terms
(`--error-budget must be in [0, 1)`) without the library knowing any flag. Texts that are not
errors but name an option (a layer's skip reason: `first conv (skip_first=False to include)`)
are `OptionText`s, rendered the same way (`first conv (--no-skip-first to include)`)."""

from __future__ import annotations


class OptionText(str):
    """A text naming parameters: as a str it names them as parameters (the Python API's terms);
    `render(name_of)` names them as the caller's interface does. A parameter may carry a value
    (`skip_first=False`), which `name_of` renders too (the CLI: `--no-skip-first`)."""

    template: str
    params: tuple[str, ...]

    def __new__(cls, template: str, *params: str) -> OptionText:
        """`template` uses {0}, {1}, ... where the parameters go: OptionText('not matched by {0}', 'include')."""
        text = super().__new__(cls, template.format(*params))
        text.template, text.params = template, params
        return text

    def render(self, name_of) -> str:
        """The text with each parameter written as name_of(parameter)."""
        return self.template.format(*(name_of(p) for p in self.params))


def render_text(text: str, name_of) -> str:
    """`text` with its parameters named by name_of when it is an OptionText; other text as it is."""
    return text.render(name_of) if isinstance(text, OptionText) else str(text)


class GDWSError(Exception):
    """Bad usage or an input that cannot be processed (CLI exit code 2)."""


class OptionError(GDWSError):
    """A bad option value or combination. `params` are the parameter names involved, in the order
    the message names them; str(error) names them as parameters, `render(name_of)` as the CLI does."""

    def __init__(self, message: str, *params: str):
        """`message` uses {0}, {1}, ... where the parameter names go: OptionError('{0} must be >= 1', 'runs')."""
        self.text = OptionText(message, *params)
        super().__init__(str(self.text))

    @property
    def params(self) -> tuple[str, ...]:
        """The parameters the message names, in order."""
        return self.text.params

    def render(self, name_of) -> str:
        """The message with each parameter written as name_of(parameter)."""
        return self.text.render(name_of)


def literal(text: object) -> str:
    """`text` (a path, a value, another error's message) escaped for an OptionError message, so
    that its braces are not taken for placeholders: OptionError(f"cannot read {{0}} {literal(path)}", "data")."""
    return str(text).replace("{", "{{").replace("}", "}}")


class GateFailed(Exception):
    """A verification or accuracy gate failed (CLI exit code 1)."""
