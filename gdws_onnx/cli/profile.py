"""`onnx-gdws profile MODEL -o layers.json`: the layer latency table, measured on this device."""

from __future__ import annotations

import click

from gdws_onnx.cli import args
from gdws_onnx.cli.common import handle_errors, stderr_console, stdout_console
from gdws_onnx.graph.model_io import load_model
from gdws_onnx.pipeline.options import (
    DEFAULT_AUTO_ERROR_BUDGET,
    DEFAULT_ERROR_BUDGET,
    BudgetOptions,
    RunOptions,
    SelectionOptions,
    TimingOptions,
)
from gdws_onnx.pipeline.profile import ProfileOptions, profile


@click.command("profile")
@handle_errors
@click.argument("model")
@click.option("-o", "--output", required=True, help="Path of the layer latency table (JSON).")
@args.TIMING(ep={"help": "Execution provider to measure on: cpu, cuda, tensorrt, openvino."},
             batches={"help": "Batch size(s) to measure at, comma-separated (optimize may use any of them)."},
             threads={"help": "Intra-op threads for measurements (default: ORT's)."},
             runs={"default": 20, "help": "Interleaved rounds a layer comparison starts with."})
@args.MAX_ROUNDS()
@args.MEASURE_SECONDS(help="Time limit of one layer comparison while adding rounds.")
@click.option("--conv", type=click.Choice(["auto", "gdws", "ssvd"]), default="auto", show_default=True,
              help="Whose forms to measure: auto, every family's (what optimize's default chooses among); ssvd, "
                   "spatial SVD's alone; gdws, the GDWS planner's (optimize --conv gdws --target latency).")
@click.option("--error-budget", type=float, default=None,
              help=f"The budget optimize will be given: auto and ssvd measure the forms on its error ladder "
                   f"(default {DEFAULT_AUTO_ERROR_BUDGET}); gdws also measures the forms it chooses "
                   f"(default {DEFAULT_ERROR_BUDGET}) beside the latency-budget ladder.")
@click.option("--alphas", type=str, default=None, help="Per-channel error weights, as optimize takes them (--conv gdws).")
@click.option("--skip-first/--no-skip-first", default=True, show_default=True, help="Leave the first conv as it is.")
@click.option("--include", default=None, metavar="REGEX", help="Only convs whose name matches.")
@click.option("--exclude", default=None, metavar="REGEX", help="Skip convs whose name matches.")
@args.INPUT_SHAPES()
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
def profile_cmd(model, output, timing: args.TimingArgs, max_rounds, measure_seconds, conv, error_budget, alphas,
                skip_first, include, exclude, input_shapes, quiet) -> None:
    """Time each eligible conv's candidate forms on this device and write the layer latency table.

    Run it on the target device (it needs onnxruntime and numpy only), then on the host:
    onnx-gdws optimize MODEL -o OUT --target latency --latency-table TABLE.
    """
    opts = ProfileOptions(
        timing=TimingOptions(ep=timing.ep, batches=timing.batches, runs=timing.runs, max_rounds=max_rounds,
                             measure_seconds=measure_seconds, cache=""),
        run=RunOptions(input_shapes=input_shapes, threads=timing.threads),
        selection=SelectionOptions(skip_first=skip_first, include=include, exclude=exclude, conv=conv),
        budget=BudgetOptions(target="latency", error_budget=error_budget, alphas=alphas))
    opts.validate()
    loaded = load_model(model)
    with stderr_console().status("profiling..."):
        table = profile(loaded, opts)
    table.save(output)
    if not quiet:
        n = sum(len(ms) for ms in table.layers.values())
        what = "GDWS planner" if table.conv == "gdws" else ", ".join(table.families)
        stdout_console().print(f"measured {n} {what} realizations of {len(table.layers)} convs on {timing.ep} "
                               f"(batch {','.join(map(str, timing.batches))}); wrote {output}")
