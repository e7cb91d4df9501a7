"""The `onnx-gdws` command: one module per subcommand over the library."""

from __future__ import annotations

import click

from .. import __version__
from .bench import bench_cmd
from .inspect import inspect_cmd
from .optimize import optimize_cmd
from .sensitivity import sensitivity_cmd
from .sweep import sweep_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnx-gdws")
def main() -> None:
    """Rewrite ONNX Conv layers into Generalized Depthwise-Separable form, verified and measured.

    Exit codes: 0 success, 1 a verification or accuracy gate failed, 2 bad usage or input.
    """


main.add_command(optimize_cmd)
main.add_command(inspect_cmd)
main.add_command(__import__('gdws_onnx.cli.validate', fromlist=['validate_cmd']).validate_cmd)
main.add_command(bench_cmd)
main.add_command(sensitivity_cmd)
main.add_command(sweep_cmd)
