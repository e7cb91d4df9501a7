"""What every subcommand shares: error handling, consoles, atomic text output, shape options."""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from contextlib import contextmanager

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gdws_onnx.errors import GateFailed, GDWSError
from gdws_onnx.runtime.session import parse_input_shapes


def stdout_console() -> Console:
    return Console(highlight=False, emoji=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, emoji=False)


def handle_errors(fn):
    """GDWSError -> one 'error:' line and exit 2; GateFailed -> its message and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GDWSError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except GateFailed as e:
            click.echo(f"FAILED: {e}", err=True)
            sys.exit(1)

    return wrapper


def input_shape_option(fn):
    return click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D1,D2,...",
                        help="Fix an input's shape (repeatable), e.g. input:1,3,224,224.")(fn)


def shapes_from(specs) -> dict[str, list[int]]:
    return parse_input_shapes(list(specs))


def parse_ints(spec: str, flag: str) -> list[int]:
    """'1,32' -> [1, 32]."""
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise GDWSError(f"{flag} takes comma-separated integers, got {spec!r}") from None
    if not values or min(values) < 1:
        raise GDWSError(f"{flag} takes positive integers, got {spec!r}")
    return values


def write_text_atomic(path: str, text: str) -> None:
    """Write text to `path` through a temporary file in the same folder."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".gdws-tmp-", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise GDWSError(f"cannot write {path}: {e}") from None


@contextmanager
def progress_reporter(quiet: bool):
    """A ProgressFactory for long commands: rich bars when stderr is a terminal, one line per task
    on stderr when it is piped (so a log shows what is running), None when quiet."""
    if quiet:
        yield None
    elif sys.stderr.isatty():
        with progress_bars(True) as factory:
            yield factory
    else:
        def factory(desc: str, total: int):
            click.echo(f"{desc}: {total} samples ...", err=True)
            return lambda k: None
        yield factory


@contextmanager
def progress_bars(enabled: bool):
    """A ProgressFactory ((description, total) -> advance(k)) drawing rich bars on stderr, or None."""
    if not enabled:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=stderr_console(), transient=True) as p:
        def factory(desc: str, total: int):
            task = p.add_task(desc, total=total)
            return lambda k: p.advance(task, k)
        yield factory
