"""Verification that cannot fail says so: outputs that do not change with the input are flagged."""

import json
import os

import numpy as np
import onnx
from builders import input_blind_cnn, small_cnn
from conftest import LIGHT_ZOO
from click.testing import CliRunner

from gdws_onnx import optimize
from gdws_onnx.cli import main
from gdws_onnx.cli.render import verification_lines
from gdws_onnx.runtime.session import input_insensitive_outputs, make_session, random_feeds


def test_input_blind_model_is_flagged_vacuous():
    _, report = optimize(input_blind_cnn(), error_budget=0.3, target="macs")
    v = report.verification
    assert report.rewritten and v.ran and v.outputs[0].max_abs == 0  # "agrees" perfectly ...
    assert v.vacuous and v.constant_outputs == ["logits"]  # ... because nothing depends on the input
    assert any("vacuous" in line for line in verification_lines(v))


def test_input_dependent_model_is_not_flagged():
    _, report = optimize(small_cnn(), error_budget=0.3, target="macs")
    v = report.verification
    assert v.ran and not v.vacuous and v.constant_outputs == []
    assert not any("warning" in line for line in verification_lines(v))


def test_one_constant_output_of_two_is_named():
    _, report = optimize(input_blind_cnn(two_outputs=True), error_budget=0.3, target="macs")
    v = report.verification
    assert not v.vacuous and v.constant_outputs == ["logits"]
    assert any("1 of 2 outputs" in line and "logits" in line for line in verification_lines(v))


def test_insensitive_outputs_on_data_feeds():
    """Data inputs are varied too; a model without floating-point inputs cannot be judged."""
    sess = make_session(small_cnn())
    feeds = {"x": np.random.default_rng(5).random((3, 3, 12, 12)).astype(np.float32)}
    ref = dict(zip(["logits"], sess.run(["logits"], feeds)))
    assert input_insensitive_outputs(sess, feeds, ref) == []
    blind = make_session(input_blind_cnn())
    ref = dict(zip(["logits"], blind.run(["logits"], feeds)))
    assert input_insensitive_outputs(blind, feeds, ref) == ["logits"]
    ints = {"x": feeds["x"].astype(np.int64)}
    assert input_insensitive_outputs(sess, ints, ref) is None


def test_cli_prints_the_warning_and_reports_it(tmp_path):
    path, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(input_blind_cnn(), path)
    r = CliRunner().invoke(main, ["optimize", str(path), "-o", str(out), "--error-budget", "0.3",
                                  "--report", str(rep), "--target", "macs"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "warning: the verification is vacuous" in r.output
    v = json.loads(rep.read_text())["verification"]
    assert v["vacuous"] is True and v["constant_outputs"] == ["logits"]


def test_light_zoo_model_verification_is_vacuous():
    """The light zoo's outputs are the same for any input (softmax of a constant): say so."""
    path = os.path.join(LIGHT_ZOO, "light_squeezenet.onnx")
    sess = make_session(path)
    feeds = random_feeds(sess, batch=1)
    names = [o.name for o in sess.get_outputs()]
    assert input_insensitive_outputs(sess, feeds, dict(zip(names, sess.run(names, feeds)))) == names
