"""`onnx-gdws sweep MODEL --data SPEC --attack pgd --eps 0.1 --out DIR`."""

from __future__ import annotations

import shlex
import sys

import click

from gdws_onnx.cli import args
from gdws_onnx.cli.common import flag_of, handle_errors, progress_reporter, stdout_console
from gdws_onnx.cli.evaluate import runner_of
from gdws_onnx.errors import GDWSError, render_text
from gdws_onnx.eval.attacks import ATTACKS
from gdws_onnx.eval.sharded import DEFAULT_SHARD_SIZE
from gdws_onnx.sweep.report import require_matplotlib, summary, time_lines, write_report
from gdws_onnx.sweep.plan import DEFAULT_BUDGETS, DEFAULT_FC_BUDGETS, DEFAULT_PEERS, SweepOptions
from gdws_onnx.sweep.run import sweep


@click.command("sweep")
@handle_errors
@click.argument("model")
@args.DATA(data={"default": "fashion-mnist:test", "show_default": True,
                 "help": "Evaluation data: fashion-mnist[:test|train], a .npz with x and y, or an image folder."},
           n={"default": 500, "show_default": True, "help": "First N samples, the same for every point."})
@args.ATTACKS(attacks={"type": click.Choice(ATTACKS + ("none",)),
                       "help": "Attack(s) for robust accuracy (repeatable; default pgd)."})
@args.ATTACK()
@click.option("--budget", "budgets", multiple=True, metavar="KIND:VALUE",
              help="GDWS budget (repeatable): error:EPS, mac:R or latency:R, or none (no GDWS point). "
                   f"Default: {' '.join(DEFAULT_BUDGETS)}.")
@click.option("--point", "points", multiple=True, metavar="'LABEL: OPTIMIZE FLAGS'",
              help="A named point (repeatable) built by `optimize` with these flags, e.g. "
                   "'fwd 0.005: --alphas a.npz --mismatch-budget 0.005 --width-multiple 16', "
                   "'lat 2x: --target latency --latency-reduction 2' (timed on the sweep's --ep/--batch/--threads) "
                   "or, as spatial SVD, 'e0.1: --conv ssvd --error-budget 0.1'; with --quantize int8 (and "
                   "--data for calibration) it is a GDWS / spatial SVD + INT8 point.")
@click.option("--peer", "peers", multiple=True, metavar="PEER",
              help="Peer (repeatable): dws, uniform:G, ssvd, prune (these two at each GDWS point's MACs; ssvd:R, "
                   "prune:R at conv MACs / R), int8, "
                   "gdws+int8, fc-kronecker, fc-lowrank (Gemm/MatMul layers as Kronecker sums or low rank, convs "
                   f"untouched, at each --fc-budget; not by default), or none. Default: {' '.join(DEFAULT_PEERS)}.")
@click.option("--match-at", "match_at", multiple=True, metavar="POINT",
              help="Place the matched peers (ssvd and prune at the same conv MACs, gdws+int8) only at these GDWS "
                   "points (repeatable, labels as the report names them, e.g. 'gdws error:0.05'). Default: all.")
@click.option("--fc-budget", "fc_budgets", multiple=True, metavar="KIND:VALUE",
              help="Budget of the fc-kronecker / fc-lowrank peers (repeatable), per FC layer: error:EPS (each "
                   "weight's relative squared Frobenius error) or mac:R (each layer's MACs / R). "
                   f"Default: {' '.join(DEFAULT_FC_BUDGETS)}.")
@click.option("--n-quantized", type=int, default=None, metavar="N",
              help="Evaluate the quantized points (INT8, GDWS + INT8: BPDA-PGD and Square) and their reference on "
                   "the first N of the --n samples only (Square costs many forward passes).")
@click.option("--calibration", default=None,
              help="INT8 calibration data (default: fashion-mnist:train for Fashion-MNIST, else --data).")
@args.TIMING(ep={"help": "Execution provider for latency."},
             batches={"default": "1,32", "help": "Batch sizes for latency."},
             threads={"help": "Intra-op threads (default: ORT's)."},
             runs={"default": 50, "help": "Interleaved timing rounds per point."})
@click.option("--skip-first/--no-skip-first", default=True, show_default=True)
@args.SHARDS(shard_size={"default": None, "show_default": False,
                         "help": "Evaluate each point's accuracy in shards of N samples, each seeded from --seed and "
                                 "its index as `evaluate` does (default: in one piece; 100 with --ray). The numbers "
                                 "depend on N, never on where the shards run."},
             ray_address={"help": "Run the accuracy shards as Ray tasks (pip install \"onnx-gdws[ray]\"): alone, "
                                  "RAY_ADDRESS or a local instance; 'auto' a running `ray start` cluster; HOST:PORT "
                                  "that cluster. Latency is always timed here, on this machine. Put it after the "
                                  "arguments, or write --ray=ADDRESS."})
@click.option("--retime", is_flag=True,
              help="Re-measure the latency of finished points (keeps their accuracy), e.g. on a quieter machine.")
@click.option("--retry-failed", is_flag=True,
              help="Rebuild points that failed before (by default a rerun keeps a failure recorded under the "
                   "same settings, since it would fail again).")
@click.option("--out", "out_dir", required=True, help="Folder for points/, models/, sweep.json and the report.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
def sweep_cmd(model, data: args.DataArgs, attack: args.AttackArgs, budgets, points, peers, fc_budgets,
              timing: args.TimingArgs, shards: args.ShardArgs, out_dir, quiet, **options) -> None:
    """Optimize MODEL at a ladder of budgets, build the peers, measure every point the same way
    (clean and robust accuracy, MACs, size, interleaved latency ratio) and write a report.

    Resumable: each point is saved to OUT/points/ when measured; a rerun skips finished points
    (and only re-times them when the latency settings changed or --retime is given) and points
    that failed under the same settings (unless --retry-failed is given)."""
    require_matplotlib()  # fail before hours of measuring, not after
    opts = SweepOptions(data=data.spec, n=data.n, eps=attack.eps, steps=attack.steps, seed=attack.seed,
                        budgets=tuple(b for b in (budgets or DEFAULT_BUDGETS) if b != "none"),
                        points=tuple(parse_point(p) for p in points),
                        peers=tuple(p for p in (peers or DEFAULT_PEERS) if p != "none"),
                        fc_budgets=tuple(fc_budgets) or DEFAULT_FC_BUDGETS,
                        ep=timing.ep, batches=tuple(timing.batches), runs=timing.runs, threads=timing.threads,
                        shard_size=shards.shard_size or (DEFAULT_SHARD_SIZE if shards.ray_address is not None
                                                         else None),
                        **options)
    opts.check()
    runner = runner_of(shards, timing.threads) if shards.ray_address is not None or shards.workers else None
    # plain text: no markup, no wrapping; parameters named as flags
    log = None if quiet else (lambda s: click.echo(f"[sweep] {render_text(s, flag_of)}", err=True))
    command = "onnx-gdws sweep " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else ""
    with progress_reporter(quiet) as factory:
        result = sweep(model, out_dir, opts, command=command, progress=factory, log=log, runner=runner)
    files = write_report(result, out_dir)
    if quiet:
        return
    out = stdout_console()
    for line in summary(result) + time_lines(result):
        out.print(line)
    failed = [p.label for p in result.points if p.status != "ok"]
    if failed:
        out.print(f"{len(failed)} point(s) failed (see the report): {', '.join(failed)}")
    out.print(f"wrote {files.markdown}, {files.html}, {out_dir}/sweep.json")


def parse_point(spec: str) -> tuple[str, dict]:
    """'LABEL: OPTIMIZE FLAGS' -> (label, the optimize() keyword options those flags set), parsed
    by `onnx-gdws optimize`'s own options, so a point reads exactly like the command that builds it."""
    from gdws_onnx.cli.optimize import optimize_cmd

    label, sep, flags = spec.partition(":")
    if not sep or not label.strip():
        raise GDWSError(f"--point {spec!r}: expected 'LABEL: OPTIMIZE FLAGS'")
    stub = ["MODEL", "-o", "OUT"]
    try:
        given = optimize_cmd.make_context("optimize", [*stub, *shlex.split(flags)]).params
    except (click.UsageError, ValueError) as e:
        raise GDWSError(f"--point {spec!r}: {e}") from None
    defaults = optimize_cmd.make_context("optimize", stub).params
    params = {k: v for k, v in given.items() if v != defaults[k]}
    fixed = sorted(k for k in params if k in POINT_CLI_FIXED)
    if fixed:
        raise GDWSError(f"--point {spec!r}: {', '.join(flag_of(k) for k in fixed)} "
                        "not per point (the sweep sets or does not use it)")
    return label.strip(), params


# optimize flags a point may not set: the sweep's own --ep/--batch/--threads time every point, and
# the output, report and verification belong to a standalone optimize run
POINT_CLI_FIXED = {"output", "report_path", "overwrite_input", "quiet", "ep", "batches", "threads", "verify",
                   "max_error", "input_shapes"}
