"""`onnx-gdws sensitivity MODEL --data SPEC [--method gradient|forward] [--attack pgd --eps E] -o alphas.npz`."""

from __future__ import annotations

import sys

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gdws_onnx.eval.attacks import AttackSettings
from gdws_onnx.errors import GDWSError
from gdws_onnx.graph.model_io import check_output_path, load_model
from gdws_onnx.alphas.forward import DEFAULT_DRAWS, DEFAULT_NOISE, DEFAULT_WEIGHTING, WEIGHTINGS, forward_alphas
from gdws_onnx.alphas.noise_gain import DEFAULT_MIN_MARGIN, load_samples, noise_gain_alphas, save_alphas
from gdws_onnx.cli import args
from gdws_onnx.cli.common import handle_errors, stderr_console, stdout_console


@click.command("sensitivity")
@handle_errors
@click.argument("model")
@args.DATA(data={"required": True, "help": "fashion-mnist[:test|train], a .npz with x (N,C,H,W in [0,1]) and "
                                           "optional y, or an image folder."},
           n={"default": 1000, "show_default": True, "help": "Use the first N samples."})
@click.option("--method", type=click.Choice(["gradient", "forward"]), default="gradient", show_default=True,
              help="gradient: per-sample weight gradients of the torch replica (exact eq. 8). forward: no torch; "
                   "per-channel input energy times a per-layer sensitivity from weight-noise injection on ONNX Runtime.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@args.THREADS(help="torch (and ONNX Runtime) threads; default: torch's. 1 is fastest on a busy machine.")
@click.option("--attack", type=click.Choice(["none", "pgd"]), default="none", show_default=True,
              help="Compute the alphas at clean inputs or at PGD (L-inf) adversarial inputs.")
@args.ATTACK(as_name="pgd", eps={"help": "PGD budget in pixel units."},
             seed={"help": "PGD random start seed; with --method forward also the weight-noise seed."})
@args.STEP_SIZE()
@click.option("--noise", type=float, default=DEFAULT_NOISE, show_default=True,
              help="--method forward: relative weight noise sigma (per-element std sigma ||W|| / sqrt(size)).")
@click.option("--draws", type=int, default=DEFAULT_DRAWS, show_default=True,
              help="--method forward: noise draws per sample and layer (near-tie samples get more).")
@click.option("--weighting", type=click.Choice(list(WEIGHTINGS)), default=DEFAULT_WEIGHTING, show_default=True,
              help="--method forward: margin = mean squared margin change per unit weight noise (stable; "
                   "allocated best on the zoo VGG); noise-gain = weighted by 1/(2 d^2) as eq. 8, the gradient "
                   "alphas' units (for --mismatch-budget).")
@click.option("--min-margin", type=float, default=DEFAULT_MIN_MARGIN, show_default=True,
              help="Skip margins z_t - z_j below this (near-ties; logit units).")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="Precision of the torch replica (--method gradient).")
@click.option("-o", "--output", required=True, help="Alphas file (.npz keyed by conv name); metadata goes "
              "to OUTPUT.meta.json.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
def sensitivity_cmd(model, data: args.DataArgs, method, batch_size, threads, attack, pgd: args.AttackArgs,
                    step_size, noise, draws, weighting, min_margin, dtype, output, quiet) -> None:
    """Noise-gain weights alpha_{l,c} of every conv (GDWS paper eq. 8) for `optimize --alphas`.

    alpha_{l,c} = mean over samples of sum_{j != top} ||d(z_top - z_j)/dW_{l,c}||^2 / (2 (z_top - z_j)^2 n),
    n = (M/groups) K, from torch gradients in eval semantics. With these weights,
    sum_l sum_c alpha_{l,c} ||W_{l,c} - Q_{l,c}||^2 bounds (to first order) the fraction of
    samples whose top-1 changes: see `optimize --mismatch-budget`.

    --method forward (no torch): alpha_{l,c} = per-channel input patch energy x a per-layer
    sensitivity measured by injecting Gaussian noise into one layer's weights at a time on ONNX
    Runtime; its layer totals estimate the same sums (see gdws_onnx/alphas/forward.py).
    """
    if not output.endswith(".npz"):
        raise GDWSError(f"-o must name an .npz file, got {output}")
    if batch_size < 1 or pgd.steps < 0 or pgd.eps < 0 or (threads is not None and threads < 1):
        raise GDWSError("--batch-size and --threads must be >= 1, --steps and --eps >= 0")
    if draws < 1 or not noise > 0:
        raise GDWSError("--draws must be >= 1 and --noise > 0")
    check_output_path(output, model)
    loaded = load_model(model)
    ds = load_samples(data.spec, data.n)
    settings = None
    if attack == "pgd":
        settings = AttackSettings(name="pgd", eps=pgd.eps, steps=pgd.steps, step_size=step_size, seed=pgd.seed)
    show = sys.stderr.isatty() and not quiet
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=stderr_console(), transient=True, disable=not show) as p:
        if method == "forward":
            task = p.add_task("forward passes", total=None)
            result = forward_alphas(loaded.model, ds.x, y=ds.y, noise=noise, draws=draws, seed=pgd.seed,
                                    weighting=weighting, min_margin=min_margin, batch_size=max(batch_size, 1),
                                    threads=threads, attack=settings,
                                    progress=lambda k, total: p.update(task, total=total, advance=k))
        else:
            task = p.add_task("gradients", total=len(ds))
            result = noise_gain_alphas(loaded.model, ds.x, y=ds.y, batch_size=batch_size, attack=settings,
                                       min_margin=min_margin, dtype=dtype, threads=threads,
                                       progress=lambda k: p.advance(task, k))
    result.settings.update(model=model, data=ds.name, n=len(ds))
    meta = save_alphas(result, output)
    if quiet:
        return
    out = stdout_console()
    where = "clean inputs" if settings is None else (
        f"PGD inputs (eps {pgd.eps:g}, {pgd.steps} steps; accuracy there {result.attack['accuracy_on_inputs']:.1%})")
    what = "noise-gain alphas" if method == "gradient" else f"forward ({weighting}) alphas"
    t = Table(title=f"{what}, {result.samples} samples of {ds.name} at {where}")
    for col in ("conv", "C->M (g)", "kernel", "mean alpha", "min", "max", "max/min", "top-1% samples' share"):
        t.add_column(col, justify="left" if col in ("conv", "C->M (g)", "kernel") else "right")
    for info, row in zip(result.layers, result.summary()):
        grp = f" ({info.groups})" if info.groups > 1 else ""
        t.add_row(info.name, f"{info.in_channels}->{info.out_channels}{grp}", "x".join(map(str, info.kernel_shape)),
                  f"{row['mean']:.4g}", f"{row['min']:.3g}", f"{row['max']:.3g}", f"{row['max_min_ratio']:.3g}",
                  f"{row['top1pct_share']:.0%}")
    out.print(t)
    if result.skipped_convs:
        out.print(f"no alphas for {len(result.skipped_convs)} conv(s) with run-time weights: "
                  f"{', '.join(list(result.skipped_convs)[:3])}")
    if method == "forward":
        out.print(f"{result.skipped_terms} near-tie margin terms (< {min_margin:g}) skipped; "
                  f"{result.timings['total']:.2f} s ({result.settings['ort_runs']} ONNX Runtime runs); "
                  "layer totals +- their noise standard error: " + ", ".join(
                      f"{result.layer_total[i.name]:.3g}+-{result.noise_std[i.name]:.2g}" for i in result.layers))
    else:
        out.print(f"{result.skipped_terms} near-tie margin terms (< {min_margin:g}) skipped; "
                  f"{result.timings['total']:.2f} s ({result.timings['gradients']:.2f} s gradients)")
    out.print(f"wrote {output} and {meta}")
