"""`onnx-gdws optimize MODEL -o OUT`."""

from __future__ import annotations

import time

import click

from gdws_onnx.cli import args
from gdws_onnx.cli.common import handle_errors, stderr_console, stdout_console, write_text_atomic
from gdws_onnx.cli.render import optimize_summary
from gdws_onnx.errors import GateFailed
from gdws_onnx.graph.model_io import check_output_path, load_model, save_model
from gdws_onnx.pipeline.optimize import OptimizeOptions, optimize_loaded
from gdws_onnx.pipeline.options import CONV_REWRITES, DEFAULT_AUTO_ERROR_BUDGET, DEFAULT_ERROR_BUDGET, DEFAULT_PAYOFF


PROGRESS_AFTER_S = 2.0  # piped output: steps are reported once a run has taken this long


@click.command("optimize")
@handle_errors
@click.argument("model")
@click.option("-o", "--output", required=True, help="Path of the optimized model.")
@click.option("--error-budget", type=float, default=None,
              help="Per-layer relative weight error ||W - W'||^2 / ||W||^2, 0 <= EPS < 1 (default "
                   f"{DEFAULT_AUTO_ERROR_BUDGET} with --conv auto, spent only where it pays (--payoff), measured safe "
                   "on every robust zoo model; "
                   f"{DEFAULT_ERROR_BUDGET} otherwise); with --fc also each FC weight's.")
@click.option("--payoff", type=float, default=None, metavar="K",
              help=f"--conv auto (and ssvd) under --target latency: a layer takes relative weight error e only in "
                   f"a form that runs at most 1 - K e of its dense time (upper 95 % bound), so error is spent where "
                   f"it buys speed (default {DEFAULT_PAYOFF:g}; 0: any measurably faster form within the budget).")
@click.option("--mac-reduction", type=float, default=None,
              help="Divide the model's total conv MACs by R, ranks allocated across layers (--target macs; "
                   "with --fc, each FC layer's MACs by R too).")
@click.option("--mismatch-budget", type=float, default=None, metavar="P",
              help="0 < P < 1: fewest MACs with the predicted top-1 mismatch sum alpha * e <= P "
                   "(one greedy over all layers; needs --alphas from `onnx-gdws sensitivity`). With --target "
                   "latency: those ranks, each layer in its fastest measured form, kept only where faster.")
@click.option("--uniform-rank", type=int, default=None, metavar="G",
              help="Every input channel keeps G terms (1 = plain depthwise-separable); a baseline, not a budget.")
@click.option("--alphas", type=str, default=None,
              help="Per-layer, per-channel error weights: .json or .npz keyed by conv name.")
@click.option("--target", type=click.Choice(["latency", "macs"]), default=None,
              help="Decide by latency measured on --ep (the default: never returns a slower model), or by MAC "
                   "counts (the default with --mac-reduction or --uniform-rank), for planning on a host that is "
                   "not the device: fewer MACs are not always faster, so --target macs can return a slower model.")
@click.option("--latency-reduction", type=float, default=None,
              help="With --target latency: divide the measured whole-model latency by R.")
@args.TIMING(ep={"help": "Execution provider to measure on (--target latency)."},
             batches={"help": "Batch size(s) to measure at, comma-separated; a layer must win at all of them."},
             threads={"help": "Intra-op threads for measurements (default: ORT's)."},
             runs={"default": 20, "help": "Interleaved rounds a latency comparison starts with (--target latency)."})
@args.MAX_ROUNDS()
@args.MEASURE_SECONDS()
@click.option("--cache", "cache", default=None,
              help="Latency-table cache file (default $XDG_CACHE_HOME/onnx-gdws/latency.json, "
                   "$XDG_CACHE_HOME being ~/.cache when unset; '' disables).")
@click.option("--latency-table", default=None, metavar="TABLE",
              help="With --target latency: layer latencies from `onnx-gdws profile` run on the device, nothing "
                   "timed here (the whole-model check is skipped: run `onnx-gdws bench` there).")
@click.option("--skip-first/--no-skip-first", default=True, show_default=True,
              help="Leave the first conv as it is.")
@click.option("--include", default=None, metavar="REGEX", help="Only convs (and, with --fc, FC layers) whose name matches.")
@click.option("--exclude", default=None, metavar="REGEX", help="Skip convs (and, with --fc, FC layers) whose name matches.")
@click.option("--force", is_flag=True, help="Rewrite eligible convs even where GDWS is not cheaper.")
@click.option("--conv", type=click.Choice(list(CONV_REWRITES)), default=None,
              help="The Conv rewrite. auto (the default under --target latency): per conv, the fastest "
                   "measurably faster form of every family (GDWS, spatial SVD, Tucker-2) within the per-layer "
                   f"error budget (default {DEFAULT_AUTO_ERROR_BUDGET}) where the form pays for it (--payoff); gdws "
                   "(the default under --target macs, or with a GDWS-only option); "
                   "ssvd, spatial SVD (k x 1 then 1 x k convs; under --target macs at --mac-reduction, or per "
                   f"layer at --error-budget, default {DEFAULT_ERROR_BUDGET}; under --target latency as auto "
                   "restricted to spatial SVD); off leaves every conv alone (with --fc: FC layers only).")
@click.option("--fc", type=click.Choice(["off", "kronecker", "lowrank"]), default="off", show_default=True,
              help="Also rewrite Gemm/MatMul layers with constant weights: a sum of Kronecker products (nearest "
                   "by Van Loan-Pitsianis SVD) or plain low rank, at --error-budget (each weight's relative "
                   "squared error) or --mac-reduction (each layer's MACs / R); with --target latency, at the error "
                   "budget, only where measured faster.")
@click.option("--quantize", type=click.Choice(["off", "int8"]), default="off", show_default=True,
              help="After the rewrites, quantize to INT8 (ONNX Runtime static QDQ: per-channel int8 weights, uint8 "
                   "activations, MinMax calibration on the first 256 samples of --data, which it needs); --conv off "
                   "for INT8 alone. Reports which convs ORT runs as int8 kernels (QLinearConv).")
@click.option("--mixed-precision/--no-mixed-precision", default=True, show_default=True,
              help="With --quantize int8 on the CPU EP: leave float the convs whose INT8 kernel ORT's profiler finds "
                   "slower than their float kernel (a first conv with one input channel), one at a time, each only "
                   "where the whole model then measures faster (interleaved, at every --batch), and the conv after each "
                   "one kept. It times on this machine whatever --target: on a host that is not the device, "
                   "--no-mixed-precision (every conv INT8).")
@click.option("--finetune", type=float, default=None, metavar="EPOCHS",
              help="Recovery after the rewrites, before --quantize: fine-tune every conv/FC weight for EPOCHS passes "
                   "over --data (training data with labels, never a test split; needs the [validate] extra), "
                   "distilling the original (RSLAD-style; SGD lr 0.02), as `onnx-gdws finetune` does; refused "
                   "(exit 1, nothing written) when worse than the rewrite on a held-out split. Minutes of CPU, not "
                   "seconds.")
@click.option("--finetune-attack", default="pgd-2", show_default=True,
              help="With --finetune: the training attack, none, fgsm-rs or pgd-K.")
@click.option("--finetune-eps", type=float, default=0.1, show_default=True,
              help="With --finetune: the L-inf budget of its training attack and held-out PGD score, in pixel units.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare original and optimized outputs in ONNX Runtime.")
@args.DATA_SPEC(default=None, help="Inputs from real data: .npz with 'x' (or arrays named after inputs), or a data "
                                  "set (fashion-mnist[:test|train], an image folder). The verification runs on its "
                                  "first 256 samples (random inputs without it); --quantize, --bias-correction and "
                                  "--data-aware need it for calibration, --finetune for training.")
@click.option("--bias-correction", is_flag=True,
              help="Shift each rewritten conv's bias by its mean output error on --data (first 1000 samples of "
                   "a data set spec, or the whole .npz), layer by layer on the rewritten model's own activations.")
@click.option("--data-aware", "data_aware", type=float, default=None, metavar="LAMBDA",
              help="Truncate each channel in the metric (1 - LAMBDA) I + LAMBDA S_c / s, S_c the second moment of "
                   "its input patches on --data: a blend of weight error and output error (0.5 measured best).")
@click.option("--width-multiple", type=int, default=1, show_default=True, metavar="N",
              help="Round each rewritten layer's GDWS width (depthwise channels) to a multiple of N: up with the "
                   "next best terms, or down under --mac-reduction. ORT's CPU convs are much faster at multiples "
                   "of 8 (measured: tools/width_multiple.py). With --conv ssvd: every rank a multiple of N (whole "
                   "blocks under --mac-reduction); 16 keeps ORT's CPU convs in their blocked layout on AVX-512 "
                   "(measured: tools/ssvd_blocks.py).")
@args.INPUT_SHAPES()
@click.option("--max-error", type=float, default=None,
              help="Gate: fail (exit 1, no output written) if any output's relative error exceeds TOL.")
@args.SEED(help="Seed of random verification inputs.")
@click.option("--report", "report_path", default=None, help="Write a JSON report here.")
@click.option("--overwrite-input", is_flag=True, help="Allow -o to be the input file.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
def optimize_cmd(model, output, timing: args.TimingArgs, input_shapes, report_path, overwrite_input, quiet,
                 **options) -> None:
    """Replace eligible Conv nodes of MODEL by factorized forms (GDWS, spatial SVD, Tucker-2) and write the result to -o."""
    start = time.perf_counter()
    opts = OptimizeOptions(**options, input_shapes=input_shapes, ep=timing.ep, batches=timing.batches,
                           threads=timing.threads, runs=timing.runs)
    opts.validate()
    check_output_path(output, model, overwrite_input)
    err = stderr_console()
    with err.status("optimizing...") as status:
        start_step = time.perf_counter()

        def progress(step: str) -> None:
            """On a terminal, the spinner names the step; piped, a line per step once the run has
            taken PROGRESS_AFTER_S (a quick run, or a refusal, prints nothing but its result)."""
            elapsed = time.perf_counter() - start_step
            line = f"optimizing: {step} ({elapsed:.0f} s)"
            if err.is_terminal:
                status.update(line)
            elif not quiet and elapsed >= PROGRESS_AFTER_S:
                err.print(line)

        opts.run.progress = progress
        t0 = time.perf_counter()
        loaded = load_model(model)
        load_time = time.perf_counter() - t0
        optimized, report = optimize_loaded(loaded, opts)
    report.timings = {"load": load_time, **report.timings}
    out = stdout_console()
    if not quiet:
        for line in optimize_summary(report, model, output, opts.budget):
            out.print(line)
    if not report.verification.passed:
        report.timings["total"] = time.perf_counter() - start
        if report_path:
            write_text_atomic(report_path, report.to_json())
        raise GateFailed(f"verification gate failed; {output} was not written")
    t0 = time.perf_counter()
    save_model(optimized, output, external_data=loaded.external_data)
    report.timings["save"] = time.perf_counter() - t0
    report.timings["total"] = time.perf_counter() - start
    if report_path:
        write_text_atomic(report_path, report.to_json())
    if not quiet:
        out.print(f"wrote {output}")
