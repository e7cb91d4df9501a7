"""Help texts say what each option needs (issue 27): a flag that only works with another names it."""

import pytest

from gdws_onnx.cli import main

# (subcommand, flag, what its help must name): the companions OptimizeOptions.validate requires
NEEDS = [
    ("optimize", "--quantize", "--data"),
    ("optimize", "--bias-correction", "--data"),
    ("optimize", "--data-aware", "--data"),
    ("optimize", "--mismatch-budget", "--alphas"),
    ("optimize", "--latency-reduction", "--target latency"),
    ("optimize", "--latency-table", "--target latency"),
    ("optimize", "--data", "--quantize"),  # and the reverse: --data says who uses it
    ("optimize", "--data", "--bias-correction"),
    ("optimize", "--mac-reduction", "--fc"),  # which budget applies to FC layers
    ("optimize", "--error-budget", "--fc"),
    ("optimize", "--cache", "XDG_CACHE_HOME"),
]


def _help(command: str, flag: str) -> str:
    import click

    cmd = main.get_command(click.Context(main), command)
    (param,) = [p for p in cmd.params if flag in getattr(p, "opts", ())]
    return " ".join(param.help.split())


@pytest.mark.parametrize("command,flag,needed", NEEDS, ids=[f"{c} {f} -> {n}" for c, f, n in NEEDS])
def test_help_names_what_the_flag_needs(command, flag, needed):
    assert needed in _help(command, flag)


def test_conflicts_are_reported_before_missing_companions():
    """A conflict (conv=ssvd with a GDWS-only budget) is reported, not the missing --alphas."""
    from click.testing import CliRunner

    r = CliRunner().invoke(main, ["optimize", "models/vgg_small_fgsm.onnx", "-o", "/tmp/never.onnx", "--conv", "ssvd",
                                  "--mismatch-budget", "0.01"])
    assert r.exit_code == 2 and "--conv ssvd" in r.output and "--mismatch-budget" in r.output
    assert "cannot go with" in r.output and "--alphas" not in r.output  # not "--mismatch-budget needs --alphas"
