"""`onnx-gdws bench MODEL [MODEL ...]`: interleaved latency on chosen EPs and batch sizes."""

from __future__ import annotations

import json
from dataclasses import asdict

import click
from rich.table import Table

from gdws_onnx.cli import args
from gdws_onnx.cli.common import handle_errors, stdout_console, write_text_atomic
from gdws_onnx.graph.model_io import load_model
from gdws_onnx.runtime import bench


@click.command("bench")
@handle_errors
@click.argument("models", nargs=-1, required=True)
@args.TIMING(ep={"help": "Execution providers, comma-separated: cpu, cuda, tensorrt, openvino."},
             batches={"help": "Batch sizes, comma-separated."}, threads={"help": "Intra-op threads (default: ORT's)."},
             runs={"default": 50, "help": "Timed rounds (each runs every model once)."})
@click.option("--warmup", type=int, default=10, show_default=True)
@args.INPUT_SHAPES()
@click.option("--profile", is_flag=True, help="Per-conv times from ORT's profiler (first EP and batch).")
@click.option("--report", "report_path", default=None, help="Write a JSON report here.")
def bench_cmd(models, timing: args.TimingArgs, warmup, input_shapes, profile, report_path) -> None:
    """Time MODELS interleaved (A B, B A, ...; spinning off) and report each vs the first.

    Ratios are medians of per-round ratios with their 10-90 % spread and the 95 % confidence
    interval of the median: the only honest comparison on a shared, noisy machine. A model is
    called faster (slower) only when that whole interval lies below (above) 1.
    """
    loaded = [load_model(m) for m in models]
    console = stdout_console()
    result = {"models": list(models), "runs": []}
    for e in timing.providers:
        console.print(environment_line(bench.environment(bench.BenchConfig(ep=e, threads=timing.threads))))
        for b in timing.batches:
            cfg = bench.BenchConfig(ep=e, batch=b, threads=timing.threads, warmup=warmup, runs=timing.runs,
                                    input_shapes=input_shapes)
            stats, ratios = bench.compare_models(list(models), list(models), cfg)
            console.print(ratio_table(stats, ratios, f"{e}, batch {stats[0].batch}, {timing.runs} interleaved rounds"))
            result["runs"].append({"ep": e, "batch": b, "environment": bench.environment(cfg),
                                   "stats": [asdict(s) for s in stats],
                                   "ratios": [asdict(r) for r in ratios]})
    if profile:
        result["profile"] = _profile(loaded, models, bench.BenchConfig(
            ep=timing.ep, batch=timing.batches[0], threads=timing.threads, warmup=warmup, runs=timing.runs,
            input_shapes=input_shapes), console)
    if report_path:
        write_text_atomic(report_path, json.dumps(result, indent=2))


VERDICTS = {"below": "faster", "above": "slower", "undecided": "not distinguishable"}


def ratio_table(stats: list, ratios: list, title: str) -> Table:
    """One batch's timings: each model's median, p90, p99 and throughput, its ratio to the first
    with the 10-90 % spread and the confidence interval of the median, and the verdict that
    interval supports."""
    t = Table(title=title)
    for col in ("model", "median ms", "p90 ms", "p99 ms", "samples/s", "ratio vs first [p10-p90]",
                "95% CI of median", "vs first"):
        t.add_column(col)
    for i, s in enumerate(stats):
        cells = ["-", "-", "-"]
        if i:
            r = ratios[i - 1]
            ci = "too few rounds" if r.ci_low is None else f"[{r.ci_low:.3f}-{r.ci_high:.3f}]"
            cells = [f"{r.median:.3f} [{r.p10:.3f}-{r.p90:.3f}]", ci, VERDICTS[bench.verdict(r, 1.0)]]
        t.add_row(s.name, f"{s.median_ms:.3f}", f"{s.p90_ms:.3f}", f"{s.p99_ms:.3f}", f"{s.throughput:.1f}", *cells)
    return t


def environment_line(env: dict) -> str:
    """What the numbers below were measured on: EP, CPU, threads, spinning, ONNX Runtime version."""
    return (f"{env['ep']} EP on {env['cpu']} ({env['cpus']} logical CPUs), intra-op threads {env['threads']}, "
            f"spinning {env['spinning']}, onnxruntime {env['onnxruntime']}")


def _profile(loaded, names, cfg: bench.BenchConfig, console) -> dict:
    """Per-conv times of each model; with 2+ models, each layer's speed-up next to its MAC cut."""
    per_model = []
    for lm, name in zip(loaded, names):
        times = bench.per_conv_times(lm.model, bench.profile_nodes(name, cfg))
        per_model.append({"times_us": times, "macs": bench.conv_macs(lm.model, cfg.input_shapes)})
    base = per_model[0]
    t = Table(title=f"per-conv kernel time (us, median of {cfg.runs} runs), {cfg.ep}, batch {cfg.batch}")
    t.add_column("conv")
    for name in names:
        t.add_column(name, overflow="fold")
    if len(names) > 1:
        t.add_column("speed-up")
        t.add_column("MAC cut")
        t.add_column("speed-up / MAC cut")
    rows = []
    for layer in sorted(set(base["times_us"]) - {"other"}, key=lambda k: -base["times_us"][k]) + ["other"]:
        cells = [f"{pm['times_us'].get(layer, 0.0):.0f}" for pm in per_model]
        row = {"conv": layer, "times_us": [pm["times_us"].get(layer) for pm in per_model]}
        if len(names) > 1 and layer != "other":
            t0, t1 = base["times_us"].get(layer), per_model[1]["times_us"].get(layer)
            m0, m1 = base["macs"].get(layer), per_model[1]["macs"].get(layer)
            sp = t0 / t1 if t0 and t1 else None
            mc = m0 / m1 if m0 and m1 else None
            row.update(speedup=sp, mac_reduction=mc, efficiency=sp / mc if sp and mc else None)
            cells += [f"{sp:.2f}x" if sp else "-", f"{mc:.2f}x" if mc else "-",
                      f"{sp / mc:.2f}" if sp and mc else "-"]
        elif len(names) > 1:
            cells += ["", "", ""]
        t.add_row(layer, *cells)
        rows.append(row)
    console.print(t)
    return {"ep": cfg.ep, "batch": cfg.batch, "layers": rows}
