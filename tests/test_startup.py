"""Start-up stays light: heavy dependencies load only where they are used (no timing here:
tools/startup_time.py measures)."""

import json
import subprocess
import sys

import click
import pytest

HEAVY = ("scipy.stats", "torch", "matplotlib", "onnx_ad")


def _loaded_after(code: str, names: tuple[str, ...]) -> list[str]:
    """Which of `names` are in sys.modules after running `code` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([n for n in {list(names)!r} if n in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_package_and_cli_import_no_heavy_dependency():
    assert _loaded_after("import gdws_onnx, gdws_onnx.cli", HEAVY) == []


def test_library_import_loads_no_cli_library():
    """A Python user of `import gdws_onnx` gets neither click nor rich (they live under cli/)."""
    assert _loaded_after("import gdws_onnx", ("click", "rich", *HEAVY)) == []


def test_decompose_alone_loads_no_runtime_stats_torch_or_attacks():
    names = ("onnxruntime", "scipy.stats", "torch", "gdws_onnx.eval.attacks", "gdws_onnx.eval.gradients")
    assert _loaded_after("import gdws_onnx.core.decompose", names) == []


def test_help_imports_no_subcommand():
    code = ("from gdws_onnx.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    names = ("gdws_onnx.cli.optimize", "gdws_onnx.cli.validate", "gdws_onnx.cli.sweep", "onnxruntime", *HEAVY)
    assert _loaded_after(code, names) == []


def test_profile_runs_on_onnxruntime_and_numpy_alone(tmp_path):
    """`profile` runs on the device: neither torch nor scipy is imported, even while it measures."""
    from builders import small_cnn
    import onnx

    onnx.save(small_cnn(channels=(8, 16), size=6), tmp_path / "m.onnx")
    code = ("from gdws_onnx.cli import main\n"
            f"try:\n    main(['profile', {str(tmp_path / 'm.onnx')!r}, '-o', {str(tmp_path / 't.json')!r}, "
            "'--runs', '3', '--max-rounds', '3', '--threads', '1', '-q'])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code")
    assert _loaded_after(code, ("scipy", "torch", "matplotlib", "onnx_ad")) == []
    assert (tmp_path / "t.json").exists()


def test_optimize_command_loads_no_attack_code():
    names = ("gdws_onnx.eval.attacks", "gdws_onnx.eval.gradients", *HEAVY)
    assert _loaded_after("import gdws_onnx.cli.optimize", names) == []


def test_public_names_resolve_lazily():
    import gdws_onnx
    from gdws_onnx.pipeline.optimize import load_alphas  # noqa: F401 - the submodule first, then the function

    from gdws_onnx import optimize
    assert callable(optimize) and optimize.__module__ == "gdws_onnx.pipeline.optimize"
    for name in gdws_onnx.__all__:
        assert getattr(gdws_onnx, name) is not None
    with pytest.raises(AttributeError):
        gdws_onnx.no_such_name  # noqa: B018


def test_listed_short_helps_match_the_commands():
    """`onnx-gdws --help` lists subcommands without importing them; what it lists must be what
    each command's docstring gives."""
    from gdws_onnx.cli import SUBCOMMANDS, main, short_help

    ctx = click.Context(main)
    for name, (_, _, listed) in SUBCOMMANDS.items():
        cmd = main.get_command(ctx, name)
        assert cmd.name == name
        for limit in (30, 45, 70, 200):
            assert short_help(listed, limit) == cmd.get_short_help_str(limit), (name, limit)


def test_subcommand_help_and_unknown_command(runner):
    from gdws_onnx.cli import main

    r = runner.invoke(main, ["--help"])
    assert r.exit_code == 0 and all(n in r.output for n in ("optimize", "inspect", "validate", "bench", "sweep"))
    r = runner.invoke(main, ["optimize", "--help"])
    assert r.exit_code == 0 and "--mac-reduction" in r.output
    r = runner.invoke(main, ["nope"])
    assert r.exit_code == 2 and "No such command" in r.output
