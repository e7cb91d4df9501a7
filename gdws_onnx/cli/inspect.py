"""`onnx-gdws inspect MODEL`."""

from __future__ import annotations

import json

import click
from rich.table import Table

from gdws_onnx.pipeline.inspection import CUT_ERROR, TOP_RANKS, inspect_model, model_cut, to_dicts
from gdws_onnx.cli.render import human
from gdws_onnx.cli import args
from gdws_onnx.cli.common import flag_of, handle_errors, stdout_console
from gdws_onnx.errors import render_text


@click.command("inspect")
@handle_errors
@click.argument("model")
@args.INPUT_SHAPES()
@click.option("--error", type=float, default=CUT_ERROR, show_default=True,
              help="Relative weight error ||W - W'||^2 / ||W||^2 at which to report each method's MAC cut.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect_cmd(model: str, input_shapes, error: float, as_json: bool) -> None:
    """Per-conv shapes, MACs, eligibility, per-channel spectrum summary, and how far GDWS, spatial
    SVD and Tucker-2 can cut each conv's MACs at the same weight error.

    'top-r energy' is the fraction of ||W||_F^2 kept when every input channel keeps its
    r largest singular values: high at low r means GDWS can cut much at little error.
    'GDWS cut', 'spatial SVD cut' and 'Tucker-2 cut' are the conv's MACs before / after that
    family at the fewest terms whose relative weight error ||W - W'||^2 / ||W||^2 is at most
    --error (1.00: it would not be cheaper; -: it does not apply). The largest cut says which
    family has the most room in the weights; MACs are not time, so `optimize --target latency`
    times the candidates of every family and keeps the fastest.
    """
    infos = inspect_model(model, input_shapes, error)
    if as_json:
        click.echo(json.dumps(to_dicts(infos), indent=2))
        return
    if not infos:
        click.echo("the model has no Conv node (in its top-level graph): nothing to rewrite")
        return
    t = Table(title=f"Convs of {model} (cut: conv MACs before / after at relative weight error {error:g})")
    for col in ("conv", "kernel", "C->M (g)", "stride", "dil.", "MACs", "params", "max rank",
                *(f"top-{r} energy" for r in TOP_RANKS), "GDWS cut", "spatial SVD cut", "Tucker-2 cut", "eligible"):
        t.add_column(col, overflow="fold")
    for i in infos:
        t.add_row(i.name, "x".join(map(str, i.kernel)),
                  f"{i.in_channels}->{i.out_channels}" + (f" ({i.groups})" if i.groups > 1 else ""),
                  ",".join(map(str, i.strides)), ",".join(map(str, i.dilations)), human(i.macs),
                  human(i.params), str(i.max_rank),
                  *(f"{i.energy_kept[f'top{r}']:.1%}" if i.energy_kept else "-" for r in TOP_RANKS),
                  *(_cut(i.cut_at_error[m]) for m in ("gdws", "spatial_svd", "tucker")),
                  "yes" if i.eligible else f"no: {render_text(i.reason, flag_of)}")
    console = stdout_console()
    console.print(t)
    eligible = [i for i in infos if i.eligible]
    console.print(f"{len(infos)} convs, {len(eligible)} eligible; total conv MACs "
                  f"{human(sum(i.macs for i in infos) if all(i.macs is not None for i in infos) else None)}")
    cuts = {m: model_cut(infos, m) for m in ("gdws", "spatial_svd", "tucker")}
    if all(c is not None for c in cuts.values()):
        console.print(f"at weight error {error:g} in every conv: conv MACs / {cuts['gdws']:.2f} by GDWS, "
                      f"/ {cuts['spatial_svd']:.2f} by spatial SVD, / {cuts['tucker']:.2f} by Tucker-2 (each conv "
                      "where it applies and is cheaper; what the error costs in accuracy is for validate to say)")


def _cut(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
