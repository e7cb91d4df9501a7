"""The `onnx-gdws` command: one module per subcommand over the library, each imported only when
that subcommand runs (or its own --help is asked for), so `onnx-gdws --help` starts fast."""

from __future__ import annotations

import importlib

import click

from gdws_onnx import __version__

# name -> (module, command attribute, the command's short help as `onnx-gdws --help` lists it;
# tests/test_startup.py checks these against the commands' own docstrings)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "optimize": ("gdws_onnx.cli.optimize", "optimize_cmd",
                 "Replace eligible Conv nodes of MODEL by factorized forms (GDWS, spatial SVD, Tucker-2) and "
                 "write the result to -o."),
    "inspect": ("gdws_onnx.cli.inspect", "inspect_cmd",
                "Per-conv shapes, MACs, eligibility, per-channel spectrum summary, and how far GDWS, spatial "
                "SVD and Tucker-2 can cut each conv's MACs at the same weight error."),
    "validate": ("gdws_onnx.cli.validate", "validate_cmd",
                 "Clean and adversarially robust accuracy of ORIGINAL vs OPTIMIZED on the same samples."),
    "evaluate": ("gdws_onnx.cli.evaluate", "evaluate_cmd",
                 "Clean and adversarially robust accuracy of MODEL, per sample, written to -o."),
    "bench": ("gdws_onnx.cli.bench", "bench_cmd",
              "Time MODELS interleaved (A B, B A, ...; spinning off) and report each vs the first."),
    "sensitivity": ("gdws_onnx.cli.sensitivity", "sensitivity_cmd",
                    "Noise-gain weights alpha_{l,c} of every conv (GDWS paper eq."),
    "profile": ("gdws_onnx.cli.profile", "profile_cmd",
                "Time each eligible conv's candidate forms on this device and write the layer latency table."),
    "finetune": ("gdws_onnx.cli.finetune", "finetune_cmd",
                 "Fine-tune MODEL's float weights against adversarial examples and write the same graph with new "
                 "values to -o."),
    "sweep": ("gdws_onnx.cli.sweep", "sweep_cmd",
              "Optimize MODEL at a ladder of budgets, build the peers, measure every point the same way "
              "(clean and robust accuracy, MACs, size, interleaved latency ratio) and write a report."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use. Its own --help lists them from
    the short helps in `lazy` without importing them."""

    def __init__(self, *args, lazy: dict[str, tuple[str, str, str]], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module, attr, _ = self.lazy[cmd_name]
            self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            if name in self.commands:
                cmd = self.commands[name]
                if not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(limit)))
            else:
                rows.append((name, short_help(self.lazy[name][2], limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def short_help(text: str, limit: int) -> str:
    """What click lists for a command whose help is `text`, at `limit` characters (click's own
    public shortening, through a stand-in command: its helper for this is deprecated)."""
    return click.Command("listed", help=text).get_short_help_str(limit)


@click.group(cls=LazyGroup, lazy=SUBCOMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnx-gdws")
def main() -> None:
    """Rewrite ONNX Conv layers into Generalized Depthwise-Separable form, verified and measured.

    Exit codes: 0 success, 1 a verification or accuracy gate failed, 2 bad usage or input.
    """
