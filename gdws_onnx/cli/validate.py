"""`onnx-gdws validate ORIGINAL OPTIMIZED --data fashion-mnist:test --attack pgd --eps 0.1`."""

from __future__ import annotations

import click
from rich.table import Table

from gdws_onnx.cli import args
from gdws_onnx.cli.common import handle_errors, progress_reporter, stdout_console, write_text_atomic
from gdws_onnx.errors import GateFailed
from gdws_onnx.eval.attacks import ATTACKS
from gdws_onnx.eval.validation import GRADIENT_CHOICES, ValidateOptions, validate


def _pct(v, interval=None) -> str:
    if v is None:
        return "-"
    s = f"{100 * v:.2f}%"
    return s + (f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "")


@click.command("validate")
@handle_errors
@click.argument("original")
@click.argument("optimized")
@args.DATA(data={"default": "fashion-mnist:test", "show_default": True,
                 "help": "fashion-mnist[:test|train], a .npz with x (N,C,H,W in [0,1]) and y, or an image folder."},
           n={"default": None, "help": "Use the first N samples (same for both models)."})
@click.option("--batch-size", type=int, default=128, show_default=True)
@args.ATTACKS(attacks={"type": click.Choice(ATTACKS + ("none",)),
                       "help": "Attack(s) to run (repeatable; default pgd). Robust accuracy is the per-sample worst "
                               "case."})
@args.ATTACK()
@args.STEP_SIZE()
@click.option("--restarts", type=int, default=1, show_default=True, help="PGD restarts.")
@click.option("--random-start/--no-random-start", default=True, show_default=True)
@click.option("--queries", type=int, default=1000, show_default=True, help="Square attack iterations.")
@click.option("--gradient", type=click.Choice(GRADIENT_CHOICES), default="auto", show_default=True,
              help="Gradient source for white-box attacks.")
@click.option("--max-drop-clean", type=float, default=None, metavar="PP",
              help="Gate: exit 1 if clean accuracy drops by more than PP percentage points.")
@click.option("--max-drop-robust", type=float, default=None, metavar="PP",
              help="Gate: exit 1 if robust accuracy drops by more than PP percentage points.")
@args.THREADS(help="Intra-op threads of ONNX Runtime and the gradient source (default: theirs). "
                   "1 is fastest on a busy machine.")
@click.option("--report", "report_path", default=None, help="Write a JSON report here.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors and gate failures.")
def validate_cmd(original, optimized, data: args.DataArgs, attack: args.AttackArgs, report_path, quiet,
                 **options) -> None:
    """Clean and adversarially robust accuracy of ORIGINAL vs OPTIMIZED on the same samples.

    Each model is attacked with its own gradients (white-box), checked first against ONNX
    Runtime; every adversarial example is re-scored in ONNX Runtime.
    """
    opts = ValidateOptions(data=data.spec, n=data.n, eps=attack.eps, steps=attack.steps, seed=attack.seed,
                           **options)
    opts.check()
    with progress_reporter(quiet) as factory:
        report = validate(original, optimized, opts, progress=factory)
    if report_path:
        write_text_atomic(report_path, report.to_json())
    if not quiet:
        out = stdout_console()
        # the attacks that ran, by name: those asked for, then any validate() added (Square beside
        # the BPDA gradients of a QDQ model)
        shown = list(dict.fromkeys(a for r in (report.original, report.optimized)
                                   for a in r.robust_accuracy_by_attack))
        t = Table(title=f"{report.data['spec']}, n={report.data['n']}, eps={attack.eps:g} "
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
        for w in report.warnings:
            out.print(f"warning: {w}")
        if report_path:
            out.print(f"wrote {report_path}")
    if not report.passed:
        raise GateFailed("; ".join(report.gates["failures"]))
