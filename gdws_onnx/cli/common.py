"""What every subcommand shares: error handling (library parameters named as flags), consoles,
atomic text output, progress. The options several commands share are in `args.py`."""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gdws_onnx.errors import GateFailed, GDWSError, OptionError
from gdws_onnx.files import write_text_atomic  # noqa: F401 - the commands import it from here


def stdout_console() -> Console:
    return Console(highlight=False, emoji=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, emoji=False)


FLAGS: dict[str, str] = {  # library parameter -> CLI flag, where the flag is not the kebab-case name
    "attacks": "--attack",
    "batches": "--batch",
    "budgets": "--budget",
    "fc_budgets": "--fc-budget",
    "input_shapes": "--input-shape",
    "peers": "--peer",
    "points": "--point",
}


def flag_of(param: str) -> str:
    """The CLI flag of a library parameter: FLAGS, else `--` + the kebab-case name. A parameter
    with a value (`OptionText`) is the flag that sets it: `skip_first=False` -> `--no-skip-first`,
    `force=True` -> `--force`, `conv=off` -> `--conv off`."""
    name, eq, value = param.partition("=")
    flag = FLAGS.get(name, "--" + name.replace("_", "-"))
    if not eq or value == "True":
        return flag
    return "--no-" + flag[2:] if value == "False" else f"{flag} {value}"


def handle_errors(fn):
    """GDWSError -> one 'error:' line and exit 2 (an OptionError naming flags: `flag_of`);
    GateFailed -> its message and exit 1. List it right under @click.command, so that it also
    covers the option groups' parsing (`args.Group`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OptionError as e:
            click.echo(f"error: {e.render(flag_of)}", err=True)
            sys.exit(2)
        except GDWSError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except GateFailed as e:
            click.echo(f"FAILED: {e}", err=True)
            sys.exit(1)

    return wrapper


@contextmanager
def progress_reporter(quiet: bool, unit: str = "samples"):
    """A ProgressFactory for long commands: rich bars when stderr is a terminal, one line per task
    on stderr when it is piped (so a log shows what is running: 'task: TOTAL UNIT ...'), None when
    quiet."""
    if quiet:
        yield None
    elif sys.stderr.isatty():
        with progress_bars(True) as factory:
            yield factory
    else:
        def factory(desc: str, total: int):
            click.echo(f"{desc}: {total} {unit} ...", err=True)
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
