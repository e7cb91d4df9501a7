"""`onnx-gdws evaluate MODEL --attack pgd --n 1000 -o result.json [--resume] [--ray [ADDRESS]]`."""

from __future__ import annotations

import os

import click

from gdws_onnx.cli import args
from gdws_onnx.cli.common import handle_errors, progress_reporter, stdout_console
from gdws_onnx.errors import OptionError
from gdws_onnx.eval.validation import ValidateOptions


def runner_of(shards: args.ShardArgs, threads: int | None):
    """The runner `--ray` asks for, connected now (so a missing extra or an unreachable cluster
    fails before any work), or the local one."""
    from gdws_onnx.eval.sharded import LocalRunner

    if shards.workers is not None and shards.workers < 1:
        raise OptionError("{0} must be >= 1", "workers")
    if shards.ray_address is None:
        if shards.workers is not None:
            raise OptionError("{0} needs {1}", "workers", "ray")
        return LocalRunner(threads)
    from gdws_onnx.eval.ray_runner import RayRunner, connect

    threads = threads or 1
    num_cpus = None if shards.workers is None else shards.workers * threads
    address = shards.ray_address or None
    connect(address, num_cpus)
    return RayRunner(address=address, threads=threads, num_cpus=num_cpus)


def percent(v: float | None, interval: list[float] | None = None) -> str:
    """A fraction as 'xx.xx%' with its interval in brackets ('-' for None)."""
    if v is None:
        return "-"
    return f"{100 * v:.2f}%" + (f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "")


@click.command("evaluate")
@handle_errors
@click.argument("model")
@click.option("-o", "--output", required=True, help="The result JSON (what `validate` compares).")
@args.robust_eval_options(n_help="Use the first N samples.")
@args.THREADS(help="Intra-op threads of ONNX Runtime and the gradient source, per worker (default: theirs; "
                   "with --ray: 1).")
@args.SHARDS()
@click.option("--work-dir", default=None,
              help="Folder of finished shards (default: OUTPUT.shards); each is written as soon as it finishes.")
@click.option("--resume", is_flag=True, help="Keep the work folder's finished shards and run only the missing ones.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
def evaluate_cmd(model, output, data: args.DataArgs, attack: args.AttackArgs, shards: args.ShardArgs, work_dir,
                 resume, quiet, **options) -> None:
    """Clean and adversarially robust accuracy of MODEL, per sample, written to -o.

    The samples are cut into shards (--shard-size), each attacked with its own seed derived from
    --seed, so the result is the same however the shards run: one after another here, or as Ray
    tasks with --ray. Every finished shard is kept in the work folder; --resume runs only the
    missing ones. Compare two results with `onnx-gdws validate A.json B.json`.
    """
    from gdws_onnx.eval.sharded import evaluate

    opts = ValidateOptions(data=data.spec, n=data.n, eps=attack.eps, steps=attack.steps, seed=attack.seed,
                           **options)
    opts.check()
    runner = runner_of(shards, opts.threads)
    with progress_reporter(quiet, unit="shards") as factory:
        result = evaluate(model, opts, shard_size=shards.shard_size, work_dir=work_dir or f"{output}.shards",
                          resume=resume, runner=runner, progress=factory)
    result.write(output)
    if not quiet:
        r = result.result
        out = stdout_console()
        out.print(f"{os.path.basename(model)}: clean {percent(r.clean_accuracy, r.clean_accuracy_interval)}, "
                  f"robust {percent(r.robust_accuracy, r.robust_accuracy_interval)} "
                  f"({', '.join(r.robust_accuracy_by_attack) or 'no attack'}; {result.settings.n} samples "
                  f"in {len(result.shards)} shards, {result.runner}) in {result.seconds:.1f} s")
        for w in result.warnings:
            out.print(f"warning: {w}")
        out.print(f"wrote {output}")
