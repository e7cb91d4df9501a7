"""Options several subcommands share, declared once (after Polygraphy's tools/args).

An `Option` is one click option's declaration; a command adds it with `OPTION(**overrides)`
(its own help text or default). A `Group` is several options that go together: it adds them to a
command and hands the command one parsed value (a dataclass) in their place, so a subcommand reads
`timing.ep` and `timing.batches` instead of parsing '1,32' itself. Parsing runs inside the
command's `handle_errors` (list `@handle_errors` right under `@click.command`), so a bad value is
one 'error:' line and exit code 2.

    TIMING      --ep --batch --threads --runs     -> TimingArgs    optimize, bench, sweep
    ATTACK      --eps --steps --seed              -> AttackArgs    validate, sweep, sensitivity
    DATA        --data --n                        -> DataArgs      validate, sweep, sensitivity
    INPUT_SHAPES --input-shape (repeatable)       -> {name: dims}  optimize, bench, inspect
    ATTACKS     --attack (repeatable)             -> attack names  validate, sweep, evaluate
    BATCH_SIZE RESTARTS RANDOM_START QUERIES (one option each)         validate, evaluate
    robust_eval_options(n_help): DATA, BATCH_SIZE, ATTACKS, ATTACK, STEP_SIZE, RESTARTS,
                RANDOM_START, QUERIES, --gradient: what attacks a model     validate, evaluate
    SHARDS      --shard-size --ray [ADDRESS] --workers -> ShardArgs    evaluate, validate
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from gdws_onnx.errors import GDWSError
from gdws_onnx.runtime.providers import parse_eps
from gdws_onnx.runtime.session import parse_input_shapes


class Option:
    """One click option, declared once: `decls` and `attrs` as click.option takes them."""

    def __init__(self, *decls: str, **attrs: Any):
        self.decls, self.attrs = decls, attrs
        self.dest: str = click.Option(list(decls)).name  # the command's keyword for it

    def __call__(self, **overrides: Any) -> Callable:
        """The click.option decorator, with `overrides` (help, default, ...) for this command."""
        return click.option(*self.decls, **{**self.attrs, **overrides})


class Group:
    """Options that go together: `GROUP(dest={"help": ...}, ...)` adds them (in order, each with
    its overrides, keyed by the option's keyword) to a command, which receives `name` (or
    `as_name`) = `parse(**their values)` instead of the values."""

    def __init__(self, name: str, parse: Callable[..., Any], *options: Option):
        self.name, self.parse, self.options = name, parse, options

    def __call__(self, as_name: str | None = None, **overrides: dict[str, Any]) -> Callable:
        unknown = set(overrides) - {o.dest for o in self.options}
        if unknown:
            raise TypeError(f"{self.name} has no option {sorted(unknown)}")
        name = as_name or self.name

        def decorate(fn: Callable) -> Callable:
            @functools.wraps(fn)  # shares fn's click parameters: the options below are added to them
            def command(*args, **kwargs):
                kwargs[name] = self.parse(**{o.dest: kwargs.pop(o.dest) for o in self.options})
                return fn(*args, **kwargs)

            for option in reversed(self.options):  # click lists the last added first
                command = option(**overrides.get(option.dest, {}))(command)
            return command

        return decorate


def parse_ints(spec: str, flag: str) -> list[int]:
    """'1,32' -> [1, 32]: positive integers, or GDWSError naming `flag`."""
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise GDWSError(f"{flag} takes comma-separated integers, got {spec!r}") from None
    if not values or min(values) < 1:
        raise GDWSError(f"{flag} takes positive integers, got {spec!r}")
    return values


@dataclass
class TimingArgs:
    """Where and how latency is measured."""

    providers: list[str]  # execution providers by short name (`providers.parse_eps`)
    batches: list[int]
    threads: int | None
    runs: int

    @property
    def ep(self) -> str:
        """The first execution provider (commands that measure on one)."""
        return self.providers[0]

    @classmethod
    def parse(cls, ep: str, batches: str, threads: int | None, runs: int) -> TimingArgs:
        return cls(parse_eps(ep), parse_ints(batches, "--batch"), threads, runs)


@dataclass
class AttackArgs:
    """The PGD budget, its steps and the seed of random starts (and of random inputs)."""

    eps: float
    steps: int
    seed: int


@dataclass
class DataArgs:
    """A data set spec and how many of its first samples to use (None: all)."""

    spec: str | None
    n: int | None


@dataclass
class ShardArgs:
    """How an evaluation is cut into shards and where they run: `ray_address` None = this process,
    "" = Ray at RAY_ADDRESS or a local instance (of `workers` CPUs x threads when started here),
    else that address."""

    shard_size: int
    ray_address: str | None
    workers: int | None


EP = Option("--ep", default="cpu", show_default=True)
BATCH = Option("--batch", "batches", default="1", show_default=True)
THREADS = Option("--threads", type=int, default=None)
RUNS = Option("--runs", type=int, show_default=True)
MAX_ROUNDS = Option("--max-rounds", type=int, default=320, show_default=True,
                    help="Rounds are doubled until the 95% interval of the median ratio decides 'faster' or not; "
                         "at most this many (then: not measurably faster).")
MEASURE_SECONDS = Option("--measure-seconds", type=float, default=10.0, show_default=True,
                         help="Time limit of one latency comparison while adding rounds.")
EPS = Option("--eps", type=float, default=0.1, show_default=True, help="Perturbation budget in pixel units.")
STEPS = Option("--steps", type=int, default=20, show_default=True, help="PGD steps.")
STEP_SIZE = Option("--step-size", type=float, default=None, help="PGD step size (default eps/4).")
SEED = Option("--seed", type=int, default=0, show_default=True)
DATA_SPEC = Option("--data")
N = Option("--n", "n", type=int)
INPUT_SHAPE = Option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D1,D2,...",
                     help="Fix an input's shape (repeatable), e.g. input:1,3,224,224.")
ATTACK_NAMES = Option("--attack", "attacks", multiple=True)  # type: click.Choice of the command's attacks

BATCH_SIZE = Option("--batch-size", type=int, default=128, show_default=True)
RESTARTS = Option("--restarts", type=int, default=1, show_default=True, help="PGD restarts.")
RANDOM_START = Option("--random-start/--no-random-start", default=True, show_default=True)
QUERIES = Option("--queries", type=int, default=1000, show_default=True,
                 help="Square attack iterations. Square also runs on both models whenever one is INT8 (its "
                      "gradients are BPDA's), at about one forward pass of every sample per iteration: the "
                      "slowest part of validating an INT8 model.")
SHARD_SIZE = Option("--shard-size", type=int, default=100, show_default=True,
                    help="Samples per shard; each shard is attacked with a seed derived from --seed and its index, "
                         "so results depend on the shard size, never on the order or the runner.")
RAY = Option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
             help="Run the shards as Ray tasks (pip install \"onnx-gdws[ray]\"): alone, RAY_ADDRESS or a local "
                  "instance; 'auto' a running `ray start` cluster; HOST:PORT that cluster. Put it after the "
                  "arguments, or write --ray=ADDRESS.")
WORKERS = Option("--workers", type=int, default=None,
                 help="With --ray and no cluster: start a local instance with this many workers of --threads "
                      "threads (default: one per CPU).")

TIMING = Group("timing", TimingArgs.parse, EP, BATCH, THREADS, RUNS)
ATTACK = Group("attack", AttackArgs, EPS, STEPS, SEED)
DATA = Group("data", lambda data, n: DataArgs(data, n), DATA_SPEC, N)
INPUT_SHAPES = Group("input_shapes", lambda input_shapes: parse_input_shapes(list(input_shapes)), INPUT_SHAPE)
SHARDS = Group("shards", ShardArgs, SHARD_SIZE, RAY, WORKERS)
ATTACKS = Group("attacks", lambda attacks: tuple(a for a in (attacks or ("pgd",)) if a != "none"), ATTACK_NAMES)


def robust_eval_options(n_help: str) -> Callable:
    """The options of attacking a model, shared by `validate` and `evaluate` (declared once):
    data and --n (`n_help`), batch size, attacks and their settings, the gradient source."""
    from gdws_onnx.eval.attacks import ATTACKS as ATTACK_CHOICES  # the CLI's own lazy import of the attack list
    from gdws_onnx.eval.validation import GRADIENT_CHOICES

    stack = [
        DATA(data={"default": "fashion-mnist:test", "show_default": True,
                   "help": "fashion-mnist[:test|train], a .npz with x (N,C,H,W in [0,1]) and y, or an image folder."},
             n={"default": None, "help": n_help}),
        BATCH_SIZE(),
        ATTACKS(attacks={"type": click.Choice(ATTACK_CHOICES + ("none",)),
                         "help": "Attack(s) to run (repeatable; default pgd). Robust accuracy is the per-sample "
                                 "worst case."}),
        ATTACK(), STEP_SIZE(), RESTARTS(), RANDOM_START(), QUERIES(),
        click.option("--gradient", type=click.Choice(GRADIENT_CHOICES), default="auto", show_default=True,
                     help="Gradient source for white-box attacks."),
    ]

    def decorate(fn: Callable) -> Callable:
        for option in reversed(stack):  # applied bottom-up, so they list in this order
            fn = option(fn)
        return fn

    return decorate
