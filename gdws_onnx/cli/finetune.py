"""`onnx-gdws finetune MODEL -o OUT --data SPEC [--teacher ORIG.onnx] [--attack pgd-3] [--steps N]`."""

from __future__ import annotations

import contextlib
import json
import sys

import click

from gdws_onnx.cli import args
from gdws_onnx.cli.common import flag_of, handle_errors, stderr_console, stdout_console, write_text_atomic
from gdws_onnx.cli.render import finetune_lines
from gdws_onnx.errors import GateFailed, render_text

TRAIN_CHOICES = ("rewritten", "all")  # recover.params.TRAIN_CHOICES (not imported: it loads the library)
LOSS_CHOICES = ("ce", "trades")  # recover.adversary.LOSS_CHOICES


def progress_printer(quiet: bool):
    """A progress callback: a rich bar on a terminal, else a line at every tenth of the steps."""
    if quiet:
        return None, None
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=stderr_console(), transient=True)
        task = {}

        def show(p):
            if "id" not in task:
                task["id"] = bar.add_task("fine-tune", total=p.total)
            bar.update(task["id"], completed=p.step,
                       description=f"fine-tune: loss {p.loss:.4f}, robust acc (train) {100 * p.robust_accuracy:.1f}%")
        return show, bar

    def line(p):
        if p.step == 1 or p.step == p.total or p.step % max(1, p.total // 10) == 0:
            click.echo(f"step {p.step}/{p.total}: loss {p.loss:.4f}, robust acc (train) "
                       f"{100 * p.robust_accuracy:.1f}%", err=True)
    return line, None


@click.command("finetune")
@handle_errors
@click.argument("model")
@click.option("-o", "--output", required=True, help="Path of the fine-tuned model (written only when accepted).")
@click.option("--data", required=True,
              help="Training data: fashion-mnist:train, a .npz with x (N,C,H,W in [0,1]) and y, or an image folder "
                   "(never a test split).")
@click.option("--n", "n", type=int, default=None, help="Use the first N samples of --data.")
@click.option("--holdout", type=int, default=None,
              help="Held-out samples (the last ones of --data) the result is judged on (default 10%, at most 1000).")
@click.option("--teacher", default=None,
              help="The original model: distil its clean soft outputs (RSLAD-style, no labels needed to train).")
@click.option("--attack", default="fgsm-rs", show_default=True, help="Training attack: none, fgsm-rs or pgd-K.")
@click.option("--loss", type=click.Choice(LOSS_CHOICES), default="ce", show_default=True,
              help="Without --teacher: ce (cross-entropy on the adversarial examples' labels) or trades (clean "
                   "cross-entropy + 6 x KL from the clean to the adversarial prediction). A teacher means RSLAD.")
@args.EPS()
@click.option("--train", type=click.Choice(TRAIN_CHOICES), default="rewritten", show_default=True,
              help="Which weights train: the rewritten layers' or all Conv/Gemm/MatMul/BatchNormalization weights.")
@click.option("--epochs", type=float, default=None, help="Passes over the training data (default 1).")
@click.option("--steps", type=int, default=None, help="Training steps (instead of --epochs).")
@click.option("--lr", type=float, default=0.01, show_default=True, help="SGD learning rate (momentum 0.9, cosine).")
@click.option("--batch", type=int, default=128, show_default=True, help="Training batch size.")
@args.SEED()
@args.THREADS(help="Threads of torch and ONNX Runtime (default: theirs).")
@click.option("--eval-steps", type=int, default=10, show_default=True, help="PGD steps of the held-out score.")
@click.option("--allow-worse", is_flag=True, help="Write the result even if its held-out robust accuracy is lower.")
@click.option("--checkpoint-every", type=int, default=50, show_default=True,
              help="Write the training state to OUTPUT.ckpt (atomically) every N steps; removed when the run ends.")
@click.option("--resume", is_flag=True,
              help="Go on from OUTPUT.ckpt, the checkpoint of an interrupted run with the same settings (the result "
                   "is the same as an uninterrupted run's). Without it, a run that finds one is refused.")
@click.option("--report", "report_path", default=None, help="Also write the report as JSON here.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
def finetune_cmd(model, output, teacher, report_path, quiet, **options) -> None:
    """Fine-tune MODEL's float weights against adversarial examples and write the same graph with new values to -o.

    The weights are trained through the torch replica of the graph (SGD, momentum 0.9, cosine
    decay); nodes, names, opsets and metadata are kept. The result is scored on a held-out part of
    --data (clean and PGD accuracy, judged by ONNX Runtime) beside MODEL's score there, and refused
    (exit 1, nothing written) when its robust accuracy is lower, unless --allow-worse.
    """
    from gdws_onnx.graph.model_io import save_model
    from gdws_onnx.recover.finetune import FinetuneOptions, finetune_file

    opts = FinetuneOptions(**options, checkpoint=f"{output}.ckpt")
    opts.check()
    show, bar = progress_printer(quiet)
    with bar or contextlib.nullcontext():
        loaded, result = finetune_file(model, output, opts, teacher, show)
    report = result.report
    if report_path:
        write_text_atomic(report_path, json.dumps(report.to_dict(), indent=2) + "\n")
    if not quiet:
        out = stdout_console()
        for line in finetune_lines(report.to_dict()):
            out.print(line, markup=False)
    if not report.accepted:
        raise GateFailed(f"{render_text(report.reason, flag_of)}; nothing written")
    save_model(result.model, output, external_data=loaded.external_data)
    if not quiet:
        stdout_console().print(f"wrote {output}", markup=False)
