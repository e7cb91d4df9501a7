"""Console rendering of the library's reports: the optimize table and its note lines.

Presentation only: the numbers come from `pipeline.report`; nothing here computes a result."""

from __future__ import annotations

from gdws_onnx.cli.common import flag_of
from gdws_onnx.errors import render_text
from gdws_onnx.pipeline.options import BudgetOptions
from gdws_onnx.pipeline.report import LayerReport, OptimizeReport, VerificationReport


def human(n: float | None) -> str:
    """1234567 -> '1.23M'."""
    if n is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _worst(ratios: dict) -> dict:
    """The measurement (a bench.Ratio dict) of the batch with the highest median."""
    return max(ratios.values(), key=lambda r: r["median"])


def _fold_producers(lat: dict | None) -> dict[str, str]:
    """Producer conv -> the layer whose Gather was folded into it (so it emits that layer's
    gathered channels: its row's MACs and parameters change)."""
    from gdws_onnx.graph.pattern import layer_of

    if not lat:
        return {}
    return {layer_of(t["producer"]): t["layer"] for t in lat.get("fold_trials", []) if t["layer"] in lat["folded"]}


def _status(layer: LayerReport, lat: dict | None, folded_in: str | None) -> str:
    """The status cell: rewritten (realization, measured layer ratio) or skipped (reason), and
    which layer's Gather was folded into this conv (changing its output channels), if any."""
    from gdws_onnx.runtime.bench import format_ratio

    if layer.status == "rewritten":
        text = "rewritten" + (f" ({layer.realization})" if layer.realization else "")
        if layer.family and layer.family != "gdws":
            text = f"rewritten ({layer.family} {layer.realization})"
        measured = (lat or {}).get("layers", {}).get(layer.name)
        if measured and measured["chosen"] is not None:
            text += f", layer ratio {format_ratio(_worst(measured['options'][measured['chosen']]['ratios']))}"
            if layer.speedup_per_mac_cut is not None:
                text += f", speed-up / MAC cut {layer.speedup_per_mac_cut:.2f}"
    else:
        text = f"skipped: {render_text(layer.reason, flag_of)}"
    if folded_in:
        text += f"; output channels changed: {folded_in}'s Gather folded into it"
    return text


def _rank_cell(layer: LayerReport) -> str:
    """Total rank / the rank at which the family is exact: GDWS G / (C x max rank), spatial SVD r / r_max."""
    if layer.family == "ssvd":
        return f"ssvd {layer.total_rank}/{layer.max_rank}"
    return f"{layer.total_rank}/{layer.in_channels * layer.max_rank}"


def optimize_table(report: OptimizeReport):
    """A rich Table: one row per Conv, a totals row. Under --target latency its caption says
    what the ratios are: GDWS / original latency (below 1 is faster), median [interval]."""
    from rich.table import Table

    lat = report.latency
    caption = None
    if lat:
        caption = ("layer ratio = rewritten / original latency of the layer alone (< 1 is faster), median "
                   f"[{lat.get('confidence', 0.95):.0%} confidence interval of the median] over interleaved "
                   f"rounds; a layer is kept only if the whole interval is below {lat.get('layer_threshold', 1):g}")
    families = sorted({layer.family for layer in report.rewritten})
    gdws_only = families == ["gdws"] or (not families and report.options.get("conv", "gdws") == "gdws")
    title = "GDWS rewrite" if gdws_only else f"conv rewrite ({', '.join(families) or 'none'})"
    t = Table(title=title, show_lines=False, caption=caption, caption_justify="left")
    for col, justify in (("conv", "left"), ("kernel", "left"), ("C->M (g)", "left"),
                         ("G/max" if title == "GDWS rewrite" else "rank/max", "right"),
                         ("MACs before", "right"), ("MACs after", "right"), ("params before", "right"),
                         ("params after", "right"), ("rel. err", "right"), ("status", "left")):
        t.add_column(col, justify=justify, overflow="fold")
    folded_into = _fold_producers(lat)
    for layer in report.layers:
        rewritten = layer.status == "rewritten"
        grp = f" ({layer.groups})" if layer.groups > 1 else ""
        t.add_row(
            layer.name, "x".join(map(str, layer.kernel)), f"{layer.in_channels}->{layer.out_channels}{grp}",
            _rank_cell(layer) if rewritten else "-",
            human(layer.macs_before), human(layer.macs_after),
            human(layer.params_before), human(layer.params_after),
            f"{layer.relative_error:.4f}" if rewritten else "-",
            _status(layer, lat, folded_into.get(layer.name)),
        )
    ratio = report.mac_reduction
    t.add_row("total", "", "", "", human(report.conv_macs_before), human(report.conv_macs_after),
              human(sum(x.params_before for x in report.layers)),
              human(sum(x.params_after for x in report.layers)), "",
              f"{len(report.rewritten)}/{len(report.layers)} rewritten"
              + (f", conv MACs / {ratio:.2f}" if ratio else ""), style="bold")
    return t


def latency_lines(lat: dict | None) -> list[str]:
    """Plain lines on the measured whole-model latency (--target latency). Every ratio is new /
    old latency, median [confidence interval of the median], with its number of rounds."""
    from gdws_onnx.runtime.bench import format_ratio

    if not lat:
        return []
    env = lat["environment"]

    def ratios(rs: dict) -> str:
        return ", ".join(f"batch {b}: {format_ratio(r, 3)}" + (f" ({r['rounds']} rounds)" if r.get("rounds") else "")
                         for b, r in rs.items())

    lines = [f"latency on {lat['ep']} ({env['cpu']}, threads {env['threads'] or 'default'}, "
             f"onnxruntime {env['ort']}; layer cache hits {lat['cache']['hits']}, misses {lat['cache']['misses']}):"]
    if lat["checks"] or lat.get("fold_trials"):
        lines.append(f"  ratios: new / old latency, median [{lat.get('confidence', 0.95):.0%} confidence interval "
                     "of the median]; faster = the whole interval below 1")
    for step in lat["checks"]:
        tail = f" -> not measurably faster, reverting {step['reverted']}" if step["reverted"] else " -> faster"
        lines.append(f"  {_plural(len(step['rewritten']), 'layer')} rewritten: optimized/original "
                     f"{ratios(step['ratios'])}{tail}")
    for t in lat.get("fold_trials", []):
        verdict = ("folded" if t["layer"] in lat["folded"] else
                   "folded, then undone: the folded model was not measurably faster than the original"
                   if t["folded"] else "kept the Gather")
        lines.append(f"  fold {t['layer']}'s Gather into {t['producer']}: folded/not {ratios(t['ratios'])} -> {verdict}")
    if lat["folded"] and lat["final_ratios"]:
        lines.append(f"  with {_plural(len(lat['folded']), 'Gather')} folded: optimized/original "
                     f"{ratios(lat['final_ratios'])} -> faster")
    if lat["message"]:
        lines.append(f"  {lat['message']}")
    if lat["cache"].get("table"):
        lines.append(f"  on the device: onnx-gdws bench ORIGINAL OPTIMIZED --ep {lat['ep']} "
                     f"--batch {','.join(map(str, lat['batches']))}")
    return lines


def mismatch_lines(report: OptimizeReport) -> list[str]:
    """The predicted top-1 mismatch bound, and the measured disagreement when verified on --data."""
    p = report.predicted_mismatch
    if p is None:
        return []
    budget = f" (budget {report.budget.target:g})" if report.budget.mode == "mismatch" else ""
    line = f"predicted top-1 mismatch (sum alpha * e, first-order bound with noise-gain alphas): {p:.4g}{budget}"
    v = report.verification
    measured = [o for o in v.outputs if o.top1_agreement is not None] if v.ran else []
    if measured and report.options.get("data"):
        line += (f"; measured top-1 disagreement on {v.inputs}: "
                 + ", ".join(f"{1 - o.top1_agreement:.4g}" + (f" ({o.name})" if len(measured) > 1 else "")
                             for o in measured))
    return [line]


def bias_correction_lines(report: OptimizeReport) -> list[str]:
    """One line on what --bias-correction did."""
    bc = report.bias_correction
    if not bc:
        return []
    done = [layer for layer in bc["layers"] if layer["status"] == "corrected"]
    skipped = [f"{layer['name']} ({layer['reason']})" for layer in bc["layers"] if layer["status"] != "corrected"]
    line = (f"bias correction: {len(done)} layer(s) shifted by their mean output error on {bc['inputs']}"
            + (f"; largest shift {max(layer['max_abs_shift'] for layer in done):.3g}" if done else ""))
    return [line] + ([f"  not corrected: {', '.join(skipped)}"] if skipped else [])


def finetune_lines(report: dict | None) -> list[str]:
    """A fine-tune's report (FinetuneReport.to_dict(), from `finetune` or `optimize --finetune`) as text."""
    if not report:
        return []
    if "trained" not in report:  # optimize --finetune with nothing rewritten
        return [f"finetune: {report.get('reason', '')}"]
    lines = [f"finetune: trained {len(report['trained'])} initializers ({report['parameters']} weights) on "
             f"{report['train_samples']} samples of {report['data']}: {report['steps']} steps, "
             f"{report['samples_seen']} samples seen, {report['seconds']:.1f} s"]
    if report["loss_first"] is not None:
        lines.append(f"training loss {report['loss_first']:.4f} -> {report['loss_last']:.4f}")
    eps, k = report["options"]["eps"], report["options"]["eval_steps"]
    for name in ("input", "output", "teacher"):
        s = report.get(name)
        if s is not None:
            lines.append(f"held-out ({s['n']} samples) {name}: clean {100 * s['clean_accuracy']:.2f}%, "
                         f"PGD-{k} eps {eps:g} {100 * s['robust_accuracy']:.2f}%")
    if report["max_relative_error"] is not None:
        before = report.get("input_relative_error")
        lines.append(f"ONNX Runtime vs replica: max relative error {report['max_relative_error']:.2e}"
                     + (f" (input {before:.2e})" if before is not None else ""))
    return lines


def verification_lines(v: VerificationReport) -> list[str]:
    """Plain lines describing the verification, for the CLI."""
    if not v.ran:
        return [f"verification skipped: {v.message if v.error is None else v.error.render(flag_of)}"]
    lines = [f"verified in ONNX Runtime on {v.inputs}:"]
    for o in v.outputs:
        top1 = f", top-1 agreement {o.top1_agreement:.1%}" if o.top1_agreement is not None else ""
        lines.append(f"  {o.name}: max abs {o.max_abs:.3g}, mean abs {o.mean_abs:.3g}, "
                     f"relative {o.relative:.3g}{top1}")
    if v.vacuous:
        lines.append("  warning: the verification is vacuous: no output changes with the input (the original gives "
                     "the same values on a second, different input), so agreement does not show that the rewrite "
                     "is right on real inputs")
    elif v.constant_outputs:
        lines.append(f"  warning: {len(v.constant_outputs)} of {len(v.outputs)} outputs do not change with the input "
                     f"({', '.join(v.constant_outputs)}): agreement on them does not show that the rewrite is right "
                     "on real inputs")
    if v.max_error is not None:
        lines.append(f"  gate --max-error {v.max_error:g} (relative): {'PASS' if v.passed else 'FAIL'}")
    if v.message:
        lines.append(f"  {v.message}")
    return lines


def fc_lines(report: OptimizeReport) -> list[str]:
    """One line per Gemm/MatMul layer the FC rewrite touched or skipped, then its parameter total."""
    fc = report.fc
    if fc is None:
        return []
    lines = [f"fc {layer.name}: {layer.structure}, params {human(layer.dense_params)} -> {human(layer.params)}, "
             f"MACs/row {human(layer.dense_macs)} -> {human(layer.macs)}, weight error {layer.error:.3f}"
             + (f" (lowest MACs at this budget: {layer.winner})" if layer.winner else "") for layer in fc.layers]
    lines += [f"fc {name}: skipped: {render_text(why, flag_of)}" for name, why in fc.skipped]
    if fc.layers:
        lines.append(f"fc ({fc.scheme}): {_plural(len(fc.layers), 'layer')} rewritten, params "
                     f"{human(fc.params_before)} -> {human(fc.params_after)} (x{fc.params_before / max(fc.params_after, 1):.2f})")
    return lines + fc_latency_lines(fc.latency)


def fc_latency_lines(lat: dict | None) -> list[str]:
    """Under --target latency: each timed FC layer's ratio per scheme (factored / dense layer alone,
    at the worst batch) and the scheme that won on measured latency; the whole-model checks."""
    from gdws_onnx.runtime.bench import format_ratio

    if not lat:
        return []
    lines = [f"fc latency on {lat['ep']} at batch {','.join(map(str, lat['batches']))}: layer ratio = factored / "
             f"dense layer alone, median [{lat['confidence']:.0%} interval] at the worst batch; kept only if the "
             f"whole interval is below {lat['layer_threshold']:g} at every batch"]
    for name, t in lat["layers"].items():
        forms = ", ".join(f"{o['scheme']} {format_ratio(_worst(o['measured']))}" for o in t["options"])
        lines.append(f"  {name}: {forms}; fastest: {t['winner']}" + ("" if t["kept"] else "; left dense"))
    for step in lat["checks"]:
        ratios = ", ".join(f"batch {b}: {format_ratio(r, 3)}" for b, r in step["ratios"].items())
        tail = f" -> not measurably faster, reverting {step['reverted']}" if step["reverted"] else " -> faster"
        lines.append(f"  {_plural(len(step['rewritten']), 'FC layer')} rewritten: model with / without them "
                     f"{ratios}{tail}")
    if lat["message"]:
        lines.append(f"  {lat['message']}")
    return lines


def quantize_lines(report: OptimizeReport) -> list[str]:
    """One line on the INT8 step: how it was calibrated, how many convs are QDQ-wrapped, how many
    ORT runs as int8 kernels (of them the GDWS convs); then the convs that stay float, if any."""
    q = report.quantize
    if q is None:
        return []
    k = q.int8_kernels
    gdws = f" ({k['gdws_int8']}/{k['gdws_convs']} GDWS convs)" if k["gdws_convs"] else ""
    transposes = q.op_counts.get("Transpose", 0)
    line = (f"int8: {q.method} ({q.calibration}); {q.convs_quantized}/{len(q.convs)} convs QDQ-wrapped; ORT CPU runs "
            f"{k['int8']}/{k['convs']} as int8 kernels{gdws}"
            + (f"; {transposes} layout Transposes in ORT's graph" if transposes else ""))
    floats = [f"{c['name']} ({c['kernel']})" for c in k["not_int8"]]
    mixed = [f"  mixed precision: {q.mixed_precision.summary()}"] if q.mixed_precision is not None else []
    return [line] + ([f"  not int8: {', '.join(floats)}"] if floats else []) + mixed


def spatial_svd_table(ssvd: dict):
    """A rich Table of the spatial SVD (conv="ssvd"): one row per Conv, a totals row."""
    from rich.table import Table

    t = Table(title="spatial SVD rewrite (k x 1 conv to r channels, then 1 x k)")
    for col, justify in (("conv", "left"), ("r/max", "right"), ("MACs before", "right"), ("MACs after", "right"),
                         ("params before", "right"), ("params after", "right"), ("rel. err", "right"),
                         ("status", "left")):
        t.add_column(col, justify=justify, overflow="fold")
    layers = ssvd["layers"]
    for layer in layers:
        rewritten = layer["status"] == "rewritten"
        t.add_row(layer["name"], f"{layer['rank']}/{layer['max_rank']}" if rewritten else "-",
                  human(layer["macs_before"]), human(layer["macs_after"]),
                  human(layer.get("params_before")), human(layer.get("params_after")),
                  f"{layer['relative_error']:.4f}" if rewritten else "-",
                  "rewritten" if rewritten else f"skipped: {render_text(layer['reason'], flag_of)}")
    done = sum(layer["status"] == "rewritten" for layer in layers)
    r = ssvd["mac_reduction"]
    params = [sum(layer.get(k) or 0 for layer in layers) for k in ("params_before", "params_after")]
    t.add_row("total", "", human(ssvd["macs_before"]), human(ssvd["macs_after"]), *map(human, params), "",
              f"{done}/{len(layers)} rewritten" + (f", conv MACs / {r:.2f}" if r else ""), style="bold")
    return t


def family_lines(report: OptimizeReport) -> list[str]:
    """Which family won where, when more than one could (conv="auto"): one line."""
    fams = report.families
    if report.options.get("conv") != "auto" or not report.layers:
        return []
    won = "; ".join(f"{name} {len(convs)}" for name, convs in sorted(fams.items(), key=lambda kv: -len(kv[1])))
    dense = len(report.layers) - len(report.rewritten)
    return [f"families: {won or 'none'} (convs rewritten by each); {dense} dense"]


def optimize_summary(report: OptimizeReport, model: str, output: str, budget: BudgetOptions) -> list:
    """What `optimize` prints before it writes: the table (a rich Table; none for a model without
    convs), then plain note lines."""
    lines: list = []
    if report.spatial_svd is not None:
        lines.append(spatial_svd_table(report.spatial_svd))
    elif report.layers:
        lines.append(optimize_table(report))
    lines += family_lines(report)
    if report.budget.message:
        lines.append(f"note: {report.budget.message}")
    lines += (fc_lines(report) + latency_lines(report.latency) + verification_lines(report.verification)
              + mismatch_lines(report) + bias_correction_lines(report) + finetune_lines(report.finetune)
              + quantize_lines(report))
    if budget.target == "macs" and report.rewritten:
        lines.append("note: ranks were chosen by MAC count, not by time: fewer MACs often run slower "
                     f"(depthwise and Gather are memory-bound). Time it: onnx-gdws bench {model} {output}; "
                     + ("widths that are multiples of 8 run much faster on ORT's CPU EP: --width-multiple 8; "
                        if budget.width_multiple == 1 else "")
                     + "or let measurements decide: --target latency")
    return lines
