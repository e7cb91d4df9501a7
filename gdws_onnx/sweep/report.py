"""A sweep's report: the table, Pareto plots (matplotlib PNGs), report.md and a self-contained
report.html. Every number shown is read from the SweepResult (the JSON), nothing else."""

from __future__ import annotations

import base64
import importlib.util
import html
import os
from dataclasses import dataclass

from gdws_onnx.errors import GDWSError
from gdws_onnx.files import write_text_atomic
from gdws_onnx.sweep.results import PointResult, SweepResult

METHOD_NAMES = {
    "original": "original", "gdws": "GDWS", "dws": "DWS (g=1)", "uniform": "uniform-rank GDWS",
    "ssvd": "spatial SVD", "prune": "filter pruning (L1)", "int8": "INT8 (ORT static, QDQ)", "gdws+int8": "GDWS + INT8",
    "ssvd+int8": "spatial SVD + INT8", "fc-kronecker": "FC: Kronecker sums", "fc-lowrank": "FC: low rank",
}
MARKERS = {"original": "*", "gdws": "o", "dws": "v", "uniform": "^", "ssvd": "s", "prune": "X", "int8": "D",
           "gdws+int8": "P", "ssvd+int8": "p", "fc-kronecker": "<", "fc-lowrank": ">"}
FC_METHODS = ("fc-kronecker", "fc-lowrank")  # rewrite Gemm/MatMul layers only: their conv MACs are the original's
COLUMNS = ("point", "method", "conv MACs /", "params", "file KB", "clean %", "robust %", "agreement %")
FC_COLUMN = "FC MACs /"  # after "conv MACs /", only in a sweep with FC points


def ok_points(sweep: SweepResult) -> list[PointResult]:
    return [p for p in sweep.points if p.status == "ok"]


def baseline(sweep: SweepResult) -> PointResult:
    for p in sweep.points:
        if p.method == "original":
            return p
    raise ValueError("the sweep has no 'original' point")


def batches(sweep: SweepResult) -> list[str]:
    return [f"b{b}" for b in sweep.options["batches"]]


def pareto(points: list[PointResult], batch: str) -> list[PointResult]:
    """Points no other point beats on both robust accuracy (higher) and latency ratio (lower),
    sorted by latency."""
    pts = [p for p in points if p.robust is not None and batch in p.latency]
    front = [p for p in pts if not any(
        q.robust >= p.robust and q.latency[batch][0] <= p.latency[batch][0]
        and (q.robust > p.robust or q.latency[batch][0] < p.latency[batch][0]) for q in pts)]
    return sorted(front, key=lambda p: p.latency[batch][0])


def reference(sweep: SweepResult, p: PointResult) -> PointResult:
    """The original's evaluation a point is compared with (same attacks)."""
    return next((q for q in sweep.points if q.key == p.reference and q.status == "ok"), baseline(sweep))


def within(sweep: SweepResult, p: PointResult, max_drop_pp: float) -> bool:
    """Clean and robust accuracy (robust: when the reference has it) each at most max_drop_pp points
    below the reference's."""
    ref = reference(sweep, p)
    metrics = ("clean", "robust") if ref.robust is not None else ("clean",)
    return all(getattr(p, m) is not None and getattr(p, m) >= getattr(ref, m) - max_drop_pp / 100 - 1e-12
               for m in metrics)


def best_within(sweep: SweepResult, methods: tuple[str, ...], batch: str, max_drop_pp: float = 1.0
                ) -> PointResult | None:
    """The fastest point (median ratio at `batch`) of `methods` within max_drop_pp points of the
    original's clean and robust accuracy."""
    cands = [p for p in ok_points(sweep) if p.method in methods and batch in p.latency and within(sweep, p, max_drop_pp)]
    return min(cands, key=lambda p: p.latency[batch][0]) if cands else None


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def ordered(points: list[PointResult]) -> list[PointResult]:
    """Grouped by method (original first), each method by increasing conv-MAC, then FC-MAC, reduction."""
    order = list(METHOD_NAMES)
    return sorted(points, key=lambda p: (order.index(p.method) if p.method in order else len(order),
                                         p.conv_mac_reduction or 1.0, p.fc_mac_reduction or 1.0))


def has_fc(sweep: SweepResult) -> bool:
    """Whether the sweep has FC points (and so its table an FC-MAC column)."""
    return any(p.method in FC_METHODS for p in sweep.points)


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def table_rows(sweep: SweepResult) -> list[list[str]]:
    """The table behind the plots, one row per point (failed points say why)."""
    rows = []
    fc = has_fc(sweep)
    for p in ordered(sweep.points):
        name = METHOD_NAMES.get(p.method, p.method)
        if p.status != "ok":
            rows.append([p.label, name, "failed: " + p.error.replace("|", "/")[:120]] +
                        [""] * (len(table_header(sweep)) - 3))
            continue
        cells = [p.label, name, _ratio(p.conv_mac_reduction), *([_ratio(p.fc_mac_reduction)] if fc else []),
                 f"{p.parameters}", f"{p.file_bytes / 1024:.0f}", _pct(p.clean), _pct(p.robust), _pct(p.agreement)]
        for b in batches(sweep):
            m, lo, hi = p.latency.get(b, [None] * 3)[:3]
            cells.append("-" if m is None else f"{m:.2f} [{lo:.2f}-{hi:.2f}]")
        rows.append(cells)
    return rows


def table_header(sweep: SweepResult) -> list[str]:
    cols = [*COLUMNS[:3], *([FC_COLUMN] if has_fc(sweep) else []), *COLUMNS[3:]]
    return [*cols, *[f"latency ratio {b} [p10-p90]" for b in batches(sweep)]]


def md_table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: the header row, the rule, one line per row of cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown_table(sweep: SweepResult) -> str:
    return md_table(table_header(sweep), table_rows(sweep))


TIME_PHASES = ("build", "reference", "clean", "gradient_check")  # then the attacks, then "timing"


def time_header(sweep: SweepResult) -> list[str]:
    attacks = sorted({k for p in sweep.points for k in p.phases if k.startswith("attack ")})
    return ["point", "total s", *[k.replace("_", " ") + " s" for k in TIME_PHASES],
            *[f"{k} s" for k in attacks], "timing s"]


def time_rows(sweep: SweepResult) -> list[list[str]]:
    """Wall time of each point and of each of its phases (seconds, from the JSON)."""
    keys = [*TIME_PHASES, *[h[:-2] for h in time_header(sweep)[2 + len(TIME_PHASES):-1]], "timing"]
    rows = []
    for p in ordered(sweep.points):
        rows.append([p.label, f"{p.seconds:.1f}",
                     *["-" if k not in p.phases else f"{p.phases[k]:.1f}" for k in keys]])
    return rows


def time_lines(sweep: SweepResult) -> list[str]:
    """Where the time went, in sentences (above the wall-time table)."""
    total = sum(p.seconds for p in sweep.points)
    out = [f"This run took {sweep.seconds:.0f} s; the points' own build-and-measure times add up to {total:.0f} s "
           "(a point finished by an earlier run keeps that run's times)."]
    by_phase: dict[str, float] = {}
    for p in sweep.points:
        for k, v in p.phases.items():
            by_phase[k] = by_phase.get(k, 0.0) + v
    if by_phase:
        out.append("Summed over points: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in
                                                      sorted(by_phase.items(), key=lambda kv: -kv[1])) + ".")
    return out


def summary(sweep: SweepResult) -> list[str]:
    """Plain sentences: the best point of each method within 1 point of the original's clean and
    robust accuracy, per batch, and which one wins (faster only with a confidence bound)."""
    base = baseline(sweep)
    metric = "robust" if base.robust is not None else "clean"
    criterion = "clean and robust" if base.robust is not None else "clean"
    out = [f"Original: clean {_pct(base.clean)} %, robust {_pct(base.robust)} % "
           f"({', '.join(sweep.options['attacks']) or 'no attack'}, eps {sweep.options['eps']:g}, "
           f"n = {sweep.options['n']})."]
    sq = next((p for p in ok_points(sweep) if p.key == "original+square"), None)
    if sq is not None:
        out.append(f"With Square added (the reference of the INT8 points, which are attacked with BPDA "
                   f"gradients and Square): robust {_pct(sq.robust)} %.")
    methods = sorted({p.method for p in ok_points(sweep)} - {"original"}, key=list(METHOD_NAMES).index)
    for b in batches(sweep):
        best = {m: best_within(sweep, (m,), b) for m in methods}
        parts = []
        for m, p in best.items():
            if p is None:
                parts.append(f"{METHOD_NAMES[m]}: no point within 1 pt")
            else:
                parts.append(f"{METHOD_NAMES[m]}: {p.latency[b][0]:.2f}x latency ({p.label}{unchanged_note(p)}, "
                             f"{metric} {_pct(getattr(p, metric))} %)")
        winners = [p for p in best.values() if p is not None]
        line = f"Batch {b[1:]}, fastest within 1 pt of the original's {criterion} accuracy: " + "; ".join(parts) + "."
        if winners:
            w = min(winners, key=lambda p: p.latency[b][0])
            line += (f" Best overall: {w.label} ({METHOD_NAMES[w.method]}{unchanged_note(w)}), "
                     f"{speed_verdict(w.latency[b])}.")
        out.append(line)
    return out


def unchanged_note(p: PointResult) -> str:
    """'; no conv rewritten: INT8 alone' (or ': the original') for a GDWS point whose rewrite kept
    no layer (conv MACs unchanged, e.g. --target latency found none faster); '' otherwise."""
    if p.method not in ("gdws", "gdws+int8") or p.conv_mac_reduction is None or abs(p.conv_mac_reduction - 1) > 1e-9:
        return ""
    return "; no conv rewritten: " + ("INT8 alone" if p.method == "gdws+int8" else "the original")


def speed_verdict(latency: list[float]) -> str:
    """'faster than the original' only when the 95 % CI of the median ratio lies below 1 (points
    timed before the CI was stored: their 10-90 % spread), 'slower' when it lies above 1, else
    'not measurably faster'."""
    lo, hi = latency[3:5] if len(latency) >= 5 else latency[1:3]
    if hi < 1:
        return "faster than the original"
    if lo > 1:
        return "slower than the original"
    return "not measurably faster than the original"


def require_matplotlib() -> None:
    """Raise GDWSError naming the extra to install when matplotlib (the report's plots) is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise GDWSError("the sweep report draws its plots with matplotlib: pip install 'onnx-gdws[report]'")


def plot(sweep: SweepResult, out_dir: str) -> list[str]:
    """Robust accuracy vs latency ratio (one panel per batch) and clean accuracy vs conv-MAC
    reduction; returns the PNG paths."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    pts = ok_points(sweep)
    bs = batches(sweep)
    paths = []
    fig, axes = plt.subplots(1, len(bs), figsize=(5.5 * len(bs), 4.2), squeeze=False)
    for ax, b in zip(axes[0], bs):
        for m in METHOD_NAMES:
            sel = [p for p in pts if p.method == m and p.robust is not None and b in p.latency]
            if sel:
                ax.scatter([p.latency[b][0] for p in sel], [100 * p.robust for p in sel], marker=MARKERS[m],
                           label=METHOD_NAMES[m], s=60 if m == "original" else 36)
        front = pareto(pts, b)
        if front:
            ax.step([p.latency[b][0] for p in front], [100 * p.robust for p in front], where="post",
                    color="gray", lw=1, ls="--", label="Pareto front")
        ax.axvline(1.0, color="k", lw=0.6)
        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(f"latency ratio to original, batch {b[1:]} (log; < 1 is faster)")
        ax.set_ylabel("robust accuracy %")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{os.path.basename(sweep.model)}: robust accuracy vs measured latency ({sweep.options['ep']} EP)")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "robust_vs_latency.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for m in METHOD_NAMES:
        if m in FC_METHODS:  # convs untouched: all at 1, their FC MACs are in the table
            continue
        sel = [p for p in pts if p.method == m and p.conv_mac_reduction]
        if sel:
            ax.scatter([p.conv_mac_reduction for p in sel], [100 * p.clean for p in sel], marker=MARKERS[m],
                       label=METHOD_NAMES[m])
    ax.set_xlabel("conv MAC reduction (original / point)")
    ax.set_ylabel("clean accuracy %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "clean_vs_macs.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def environment_lines(sweep: SweepResult) -> list[str]:
    e = sweep.environment
    v = e.get("versions", {})
    return [f"CPU: {e.get('cpu')} ({e.get('cpus')} logical CPUs); EP: {e.get('ep')}; intra-op threads: "
            f"{e.get('threads')}; spinning {e.get('spinning')}",
            "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
            f"Model: {sweep.model} (sha256 {sweep.model_sha256[:16]}...)",
            f"Data: {sweep.options['data']}, first {sweep.options['n']} samples; INT8 calibration: "
            f"{sweep.options.get('calibration') or 'default (see sweep.json)'}",
            "Latency: each point timed interleaved with the original (order alternating), "
            f"{sweep.options['runs']} rounds; median ratio [p10-p90]."]


def notes(sweep: SweepResult) -> list[str]:
    out = list(sweep.extra_attacks)
    if any(p.gradient_source and "bpda" in p.gradient_source for p in ok_points(sweep)):
        out.append("INT8 models are attacked with straight-through (BPDA) gradients through "
                   "QuantizeLinear/DequantizeLinear, plus the Square attack on ONNX Runtime; their robust "
                   "accuracy is the per-sample worst case of both.")
    if has_fc(sweep):
        out.append("FC points (fc-kronecker, fc-lowrank) rewrite only the Gemm/MatMul layers, as sums of Kronecker "
                   "products or plain low rank (optimized with the conv rewrite off and that FC scheme), and leave "
                   "the convs as they are (conv MACs / 1.00). Their budgets are per FC layer: error:E = each weight's relative squared "
                   "Frobenius error, mac:R = each layer's MACs / R; a layer whose factors would not cut its MACs "
                   "is left dense. 'FC MACs /' = the original's Gemm/MatMul MACs per sample / the point's, "
                   "counted on the graph; 'params' counts the whole model.")
    if any(p.method == "prune" for p in sweep.points):
        out.append("Filter pruning drops the smallest-L1 filters with no fine-tuning and keeps every pruned width "
                   "a multiple of 8 (ORT's CPU convs are much slower at other widths), so its MAC reductions "
                   "overshoot the GDWS points they are matched with.")
    general = any("straight-through (BPDA)" in line for line in out)
    for p in sweep.points:
        for w in p.warnings:
            if general and "straight-through (BPDA)" in w:
                continue  # said once above
            out.append(w if w.startswith(f"{p.label}:") else f"{p.label}: {w}")
    return out


def markdown(sweep: SweepResult, images: list[str]) -> str:
    lines = [f"# GDWS trade-off sweep: {os.path.basename(sweep.model)}", ""]
    lines += summary(sweep) + [""]
    lines += [f"![{os.path.splitext(os.path.basename(i))[0]}]({os.path.basename(i)})" for i in images] + [""]
    lines += ["## Points", "", markdown_table(sweep), ""]
    lines += ["## Wall time", ""] + time_lines(sweep) + ["", md_table(time_header(sweep), time_rows(sweep)), ""]
    lines += ["## Environment", ""] + [f"- {s}" for s in environment_lines(sweep)] + [""]
    if notes(sweep):
        lines += ["## Notes", ""] + [f"- {s}" for s in notes(sweep)] + [""]
    lines += ["## Reproduce", "", "```", sweep.command or "(run through the Python API)", "```", ""]
    return "\n".join(lines)


def _img_tag(path: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img alt="{html.escape(os.path.basename(path))}" src="data:image/png;base64,{data}">'


def _html_rows(rows: list[list[str]]) -> str:
    return "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)


def html_report(sweep: SweepResult, images: list[str]) -> str:
    """One file, no external resources: plots embedded as data URIs."""
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in table_header(sweep))
    body = _html_rows(table_rows(sweep))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>GDWS sweep: {e(os.path.basename(sweep.model))}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;"
        "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}</style>",
        "</head><body>",
        f"<h1>GDWS trade-off sweep: {e(os.path.basename(sweep.model))}</h1>",
        *[f"<p>{e(s)}</p>" for s in summary(sweep)],
        *[_img_tag(i) for i in images],
        "<h2>Points</h2>", f"<table><tr>{head}</tr>{body}</table>",
        "<h2>Wall time</h2>", *[f"<p>{e(s)}</p>" for s in time_lines(sweep)],
        "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in time_header(sweep)) + "</tr>"
        + _html_rows(time_rows(sweep)) + "</table>",
        "<h2>Environment</h2><ul>", *[f"<li>{e(s)}</li>" for s in environment_lines(sweep)], "</ul>",
    ]
    if notes(sweep):
        parts += ["<h2>Notes</h2><ul>", *[f"<li>{e(s)}</li>" for s in notes(sweep)], "</ul>"]
    parts += ["<h2>Reproduce</h2>", f"<pre>{e(sweep.command or '(run through the Python API)')}</pre>",
              "</body></html>"]
    return "\n".join(parts)


@dataclass
class ReportFiles:
    markdown: str
    html: str
    images: list[str]


def write_report(sweep: SweepResult, out_dir: str) -> ReportFiles:
    """report.md, report.html and the PNGs into out_dir."""
    images = plot(sweep, out_dir)
    md = os.path.join(out_dir, "report.md")
    page = os.path.join(out_dir, "report.html")
    for path, text in ((md, markdown(sweep, images)), (page, html_report(sweep, images))):
        write_text_atomic(path, text)
    return ReportFiles(md, page, images)
