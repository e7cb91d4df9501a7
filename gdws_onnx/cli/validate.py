"""`onnx-gdws validate ORIGINAL OPTIMIZED --data fashion-mnist:test --attack pgd --eps 0.1`, of two
models or of two `evaluate` results (`validate a.json b.json c.json --markdown`: docs/results.md's AutoAttack table)."""

from __future__ import annotations

import click
from rich.table import Table

from gdws_onnx.cli import args
from gdws_onnx.cli.common import handle_errors, progress_reporter, stdout_console, write_text_atomic
from gdws_onnx.cli.evaluate import runner_of
from gdws_onnx.errors import GateFailed, GDWSError
from gdws_onnx.eval.validation import ValidateOptions, ValidationReport, validate


def _pct(v, interval=None) -> str:
    if v is None:
        return "-"
    s = f"{100 * v:.2f}%"
    return s + (f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "")


@click.command("validate")
@handle_errors
@click.argument("original")
@click.argument("optimized")
@click.argument("more", nargs=-1)
@args.robust_eval_options(n_help="Use the first N samples (same for both models).")
@click.option("--max-drop-clean", type=float, default=None, metavar="PP",
              help="Gate: exit 1 if clean accuracy drops by more than PP percentage points.")
@click.option("--max-drop-robust", type=float, default=None, metavar="PP",
              help="Gate: exit 1 if robust accuracy drops by more than PP percentage points.")
@args.THREADS(help="Intra-op threads of ONNX Runtime and the gradient source (default: theirs). "
                   "1 is fastest on a busy machine.")
@args.SHARDS(shard_size={"help": "With --ray, or against a result file: samples per shard (see `evaluate`)."})
@click.option("--report", "report_path", default=None, help="Write a JSON report here.")
@click.option("--markdown", is_flag=True,
              help="Result files only: print a markdown table, the first file the reference.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors and gate failures.")
def validate_cmd(original, optimized, more, data: args.DataArgs, attack: args.AttackArgs, shards: args.ShardArgs,
                 report_path, markdown, quiet, **options) -> None:
    """Clean and adversarially robust accuracy of ORIGINAL vs OPTIMIZED on the same samples.

    Each model is attacked with its own gradients (white-box), checked first against ONNX
    Runtime; every adversarial example is re-scored in ONNX Runtime. ORIGINAL and OPTIMIZED may
    also be `evaluate` results (.json): two results are compared as they are (same samples and
    settings required); a model beside a result is evaluated under the result's settings (the
    attack flags are then not used). More result files and --markdown print a table of all of
    them against the first.
    """
    from gdws_onnx.eval.results import is_result_file

    paths = [original, optimized, *more]
    files = [is_result_file(p) for p in paths]
    if (more or markdown) and not all(files):
        raise GDWSError("more than two inputs, and --markdown, take `evaluate` result files (.json) only")
    opts = ValidateOptions(data=data.spec, n=data.n, eps=attack.eps, steps=attack.steps, seed=attack.seed,
                           **options)
    opts.check()
    if markdown or more:
        from gdws_onnx.eval.results import load_result, markdown_table

        named = [(p.rsplit("/", 1)[-1].removesuffix(".json"), load_result(p)) for p in paths]
        click.echo(markdown_table(named))
        return
    with progress_reporter(quiet) as factory:
        if any(files) or shards.ray_address is not None:
            report = _sharded_report(original, optimized, opts, shards, factory)
        else:
            report = validate(original, optimized, opts, progress=factory)
    if report_path:
        write_text_atomic(report_path, report.to_json())
    if not quiet:
        _print(report, report.attacks[0]["eps"] if report.attacks else attack.eps, report_path)
    if not report.passed:
        raise GateFailed("; ".join(report.gates["failures"]))


def _sharded_report(original: str, optimized: str, opts: ValidateOptions, shards: args.ShardArgs,
                    progress) -> ValidationReport:
    """Both sides as `evaluate` results (read from a file, or evaluated in shards, with Ray if asked,
    under the other side's settings when that one is a file) and their paired comparison."""
    from gdws_onnx.eval.results import compare_results, is_result_file, load_result
    from gdws_onnx.eval.sharded import evaluate, quantized_pair

    loaded = {p: load_result(p) for p in (original, optimized) if is_result_file(p)}
    if len(loaded) == 2:
        return compare_results(loaded[original], loaded[optimized], opts.max_drop_clean, opts.max_drop_robust)
    if loaded:
        settings = next(iter(loaded.values())).settings
        eval_opts, shard_size, pair = settings.options(threads=opts.threads), settings.shard_size, \
            settings.quantized_pair
    else:
        eval_opts, shard_size = opts, shards.shard_size
        pair = quantized_pair(original, optimized)
    runner = runner_of(shards, opts.threads)
    results = [loaded.get(p) or evaluate(p, eval_opts, shard_size=shard_size, runner=runner, progress=progress,
                                         quantized_pair=pair)
               for p in (original, optimized)]
    return compare_results(*results, opts.max_drop_clean, opts.max_drop_robust)


def _print(report: ValidationReport, eps: float, report_path: str | None) -> None:
    """The report as the console table and lines `validate` prints."""
    out = stdout_console()
    # the attacks that ran, by name: those asked for, then any validate() added (Square beside
    # the BPDA gradients of a QDQ model)
    shown = list(dict.fromkeys(a for r in (report.original, report.optimized)
                               for a in r.robust_accuracy_by_attack))
    t = Table(title=f"{report.data['spec']}, n={report.data['n']}, eps={eps:g} "
                    f"({', '.join(shown) or 'no attack'})")
    for col in ("model", "clean acc. [95% CI]", "robust acc. [95% CI]",
                *(f"{a}" for a in shown), "gradient"):
        t.add_column(col)
    for label, r in (("original", report.original), ("optimized", report.optimized)):
        t.add_row(label, _pct(r.clean_accuracy, r.clean_accuracy_interval),
                  _pct(r.robust_accuracy, r.robust_accuracy_interval),
                  *(_pct(r.robust_accuracy_by_attack.get(a)) for a in shown), r.gradient_source or "-")
    out.print(t)
    e = report.output_error
    out.print(f"agreement {_pct(report.agreement, report.agreement_interval)}; logits max abs "
              f"{e['max_abs']:.3g}, mean abs {e['mean_abs']:.3g}, relative {e['relative']:.3g}, "
              f"min cosine {e['cosine_min']:.6f}")
    c = report.clean_difference_test
    line = f"clean drop {report.clean_drop_pp:+.2f} pp (McNemar p={c['p_value']:.3g})"
    if report.robust_drop_pp is not None:
        line += (f"; robust drop {report.robust_drop_pp:+.2f} pp "
                 f"(McNemar p={report.robust_difference_test['p_value']:.3g})")
    out.print(line)
    if report.robust_change is not None:
        c = report.robust_change
        out.print(f"robust samples lost / gained {c['lost']} / {c['gained']}: change {100 * c['change']:+.1f} pp "
                  f"[{100 * c['low']:+.1f} to {100 * c['high']:+.1f}]")
    for w in report.warnings:
        out.print(f"warning: {w}")
    if report_path:
        out.print(f"wrote {report_path}")
