"""Peer constructions: spatial SVD (exact at full rank, MAC targets met) and ORT static INT8."""

import numpy as np
import onnx
import pytest
from builders import ConvCase, conv_model, small_cnn

from gdws_onnx import optimize
from gdws_onnx.runtime.bench import conv_macs
from gdws_onnx.core.geometry import resolved_pads
from gdws_onnx.core.spatial_svd import block_energy, round_rank
from gdws_onnx.errors import GDWSError, OptionError
from gdws_onnx.graph.convs import find_convs
from gdws_onnx.peers import (
    PeerSite,
    PruneChannelsPass,
    QuantizeInt8Pass,
    SpatialSVDPass,
    kept_filters,
    relative_error,
    spatial_factors,
    spatial_reconstruct,
    spatial_spectrum,
)
from gdws_onnx.runtime.session import make_session

N_FUZZ = 32


def _run(model, x):
    sess = make_session(model)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0].astype(np.float64)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def spatial_svd(model: onnx.ModelProto, **options):
    """SpatialSVDPass on a copy of `model` (the pass edits in place): (new model, report)."""
    result = SpatialSVDPass(**options).call(_copy(model))
    return result.model, result.report


def prune_channels(model: onnx.ModelProto, **options):
    """PruneChannelsPass on a copy of `model`: (new model, report)."""
    result = PruneChannelsPass(**options).call(_copy(model))
    return result.model, result.report


def quantize_int8(model: onnx.ModelProto, calibration: np.ndarray, **options) -> onnx.ModelProto:
    return QuantizeInt8Pass(calibration, **options).call(model).model


def _max_rel(new, ref):
    return float(np.abs(new - ref).max() / max(np.abs(ref).max(), 1e-30))


def ssvd_case(seed: int) -> ConvCase:
    """A random 2-D, group-1 conv: stride 1/2, explicit asymmetric pads / SAME_* / VALID,
    dilation 1/2 (1 with SAME_*: ORT rejects that), non-square kernels, bias or not."""
    rng = np.random.default_rng(500 + seed)
    while True:
        kernel = tuple(int(k) for k in rng.integers(1, 5, size=2))
        if kernel != (1, 1):
            break
    auto_pad = str(rng.choice(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    dil = (1, 1) if auto_pad.startswith("SAME") else tuple(int(d) for d in rng.choice([1, 2], size=2))
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    return ConvCase(kernel=kernel, in_channels=int(rng.integers(1, 6)), out_channels=int(rng.integers(1, 7)),
                    strides=tuple(int(s) for s in rng.choice([1, 2], size=2)), dilations=dil,
                    pads=tuple(int(p) for p in rng.integers(0, 3, size=4)) if auto_pad == "NOTSET" else (),
                    auto_pad=auto_pad, bias=bool(rng.random() < 0.5),
                    weight_source=str(rng.choice(["initializer", "initializer", "constant", "fp16_cast"])),
                    dynamic_batch=bool(rng.random() < 0.3),
                    spatial=tuple(int(e + rng.integers(0, 7)) for e in eff), seed=seed)


def test_factors_reconstruct_the_weight_at_full_rank():
    w = np.random.default_rng(0).standard_normal((5, 3, 3, 2))
    spec = spatial_spectrum(w)
    assert spec.max_rank == min(3 * 3, 5 * 2)
    a, b = spatial_factors(spec, spec.max_rank, np.float64)
    assert a.shape == (9, 3, 3, 1) and b.shape == (5, 9, 1, 2)
    np.testing.assert_allclose(spatial_reconstruct(a, b), w, atol=1e-10)
    errors = [relative_error(spec, r) for r in range(1, spec.max_rank + 1)]
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:])) and errors[-1] == pytest.approx(0, abs=1e-12)
    a2, b2 = spatial_factors(spec, 2, np.float64)  # Eckart-Young: the error is the dropped energy
    err = np.linalg.norm(spatial_reconstruct(a2, b2) - w) ** 2 / np.linalg.norm(w) ** 2
    assert err == pytest.approx(relative_error(spec, 2))


@pytest.mark.parametrize(("auto_pad", "n", "k", "s", "expect"), [
    ("SAME_UPPER", 5, 4, 2, (1, 2)), ("SAME_LOWER", 5, 4, 2, (2, 1)), ("SAME_UPPER", 6, 3, 2, (0, 1)),
    ("SAME_LOWER", 6, 3, 2, (1, 0)), ("SAME_UPPER", 6, 1, 2, (0, 0)), ("VALID", 6, 4, 1, (0, 0))])
def test_resolved_pads(auto_pad, n, k, s, expect):
    assert tuple(resolved_pads((n,), (k,), (s,), (), (1,), auto_pad)) == expect


@pytest.mark.parametrize("seed", range(N_FUZZ))
def test_full_rank_spatial_svd_is_exact(seed):
    case = ssvd_case(seed)
    model = conv_model(case)
    out, report = spatial_svd(model, rank_fraction=1.0, skip_first=False, force=True)
    onnx.checker.check_model(out, full_check=True)
    (layer,) = report.layers
    assert layer.status == "rewritten", layer.reason
    assert [n.name for n in out.graph.node if n.op_type == "Conv"] == ["conv/ssvd/a", "conv/ssvd/b"]
    assert not any(n.op_type in ("Cast", "Constant") for n in out.graph.node)  # orphaned weight nodes gone
    assert {t.name for t in out.graph.initializer} & {"W", "W_half"} == set()
    x = np.random.default_rng(seed).random((2, case.in_channels, *case.spatial)).astype(np.float32)
    ref, new = _run(model, x), _run(out, x)
    assert new.shape == ref.shape
    assert _max_rel(new, ref) <= 1e-4, (case, _max_rel(new, ref))
    assert sum(conv_macs(out).values()) == report.macs_after  # MAC accounting matches the graph


def test_fuzz_covers_the_forms():
    cases = [ssvd_case(s) for s in range(N_FUZZ)]
    assert {c.auto_pad for c in cases} == {"NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"}
    assert any(c.pads[0] != c.pads[2] or c.pads[1] != c.pads[3] for c in cases if c.pads)
    assert {s for c in cases for s in c.strides} == {1, 2} and {d for c in cases for d in c.dilations} == {1, 2}
    assert any(c.kernel[0] != c.kernel[1] for c in cases) and any(1 in c.kernel for c in cases)
    assert any(c.bias for c in cases) and any(not c.bias for c in cases)


@pytest.mark.parametrize(("case", "reason"), [
    (ConvCase(kernel=(1, 1), in_channels=4, out_channels=4, spatial=(5, 5)), "1x1"),
    (ConvCase(kernel=(3, 3), in_channels=4, out_channels=4, group=2, spatial=(5, 5)), "grouped"),
    (ConvCase(kernel=(3, 3), in_channels=4, out_channels=4, group=4, spatial=(5, 5)), "depthwise"),
    (ConvCase(kernel=(3,), in_channels=4, out_channels=4, spatial=(7,)), "1-D"),
    (ConvCase(kernel=(3, 3, 3), in_channels=2, out_channels=2, spatial=(4, 4, 4)), "3-D"),
])
def test_ineligible_convs_are_skipped_with_a_reason(case, reason):
    model = conv_model(case)
    out, report = spatial_svd(model, rank_fraction=0.5, skip_first=False)
    (layer,) = report.layers
    assert layer.status == "skipped" and reason in layer.reason
    assert out.graph.node[0].name == "conv" and report.mac_reduction == pytest.approx(1.0)


def test_unknown_input_size_and_first_conv_are_skipped():
    model = conv_model(ConvCase(kernel=(3, 3), in_channels=8, out_channels=8, auto_pad="SAME_UPPER", spatial=(6, 6)))
    for d in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_param = "s"
    _, report = spatial_svd(model, rank_fraction=0.1, skip_first=False)
    assert "input spatial shape unknown" in report.layers[0].reason
    out, report = spatial_svd(model, rank_fraction=0.1, input_shapes={"x": [1, 8, 6, 6]})
    assert "first conv" in report.layers[0].reason
    _, report = spatial_svd(model, rank_fraction=0.1, skip_first=False, input_shapes={"x": [1, 8, 6, 6]})
    assert report.layers[0].status == "rewritten"


def test_not_cheaper_layers_are_left_alone_and_budget_arguments_checked():
    model = conv_model(ConvCase(kernel=(3, 3), in_channels=4, out_channels=4, spatial=(6, 6)))
    _, report = spatial_svd(model, rank_fraction=1.0, skip_first=False)
    assert report.layers[0].status == "skipped" and "would not reduce MACs" in report.layers[0].reason
    three = ("mac_reduction", "error_budget", "rank_fraction")
    for bad, params in ((dict(), three), (dict(mac_reduction=2, rank_fraction=0.5), three),
                        (dict(mac_reduction=2, error_budget=0.1), three),
                        (dict(mac_reduction=0.5), ("mac_reduction",)), (dict(rank_fraction=0), ("rank_fraction",)),
                        (dict(error_budget=1.0), ("error_budget",))):
        with pytest.raises(OptionError) as e:
            SpatialSVDPass(**bad)
        assert e.value.params == params and "--" not in str(e.value)


def test_the_passes_edit_in_place_and_check_says_why_a_conv_is_skipped(cnn):
    model = _copy(cnn)
    result = SpatialSVDPass(rank_fraction=0.5).call(model)
    assert result.model is model and result.modified and result.report.rewritten
    first, second = [PeerSite(s, i == 0) for i, s in enumerate(find_convs(cnn)[:2])]
    assert SpatialSVDPass(rank_fraction=0.5).check(first) == "first conv (skip_first=False to include)"
    assert SpatialSVDPass(rank_fraction=0.5, skip_first=False).check(first) is None
    assert SpatialSVDPass(rank_fraction=0.5).check(second) is None
    model = _copy(cnn)
    result = PruneChannelsPass(fraction=0.0).call(model)  # nothing to drop: nothing changes
    assert result.model is model and not result.modified and model.SerializeToString() == cnn.SerializeToString()
    assert [layer.reason for layer in result.report.layers][:1] == ["first conv (skip_first=False to include)"]


@pytest.fixture(scope="module")
def cnn():
    return small_cnn(seed=1, channels=(16, 32, 32), size=16)


@pytest.mark.parametrize("target", [1.5, 2.5])
def test_mac_target_is_reached_and_the_model_runs(cnn, target):
    out, report = spatial_svd(cnn, mac_reduction=target)
    assert report.met and report.mac_reduction >= target * (1 - 1e-3), report
    assert report.layers[0].status == "skipped" and report.rewritten
    assert sum(conv_macs(out).values()) == report.macs_after
    assert sum(conv_macs(cnn).values()) == report.macs_before
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version == cnn.ir_version and list(out.opset_import) == list(cnn.opset_import)
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["logits"]
    assert out.producer_name == cnn.producer_name
    x = np.random.default_rng(0).random((4, 3, 16, 16)).astype(np.float32)
    assert np.all(np.isfinite(_run(out, x)))
    names = [n.name for n in out.graph.node]
    assert all(f"{layer.name}/ssvd/a" in names and f"{layer.name}/ssvd/b" in names for layer in report.rewritten)


def test_rank_blocks_round_ranks_to_the_multiple_and_keep_the_mac_budget():
    """rank_multiple m: whole blocks of m ranks under a MAC budget (budget still met), rounded up
    under an error budget or a rank fraction (never more error); capped at the full rank."""
    assert [round_rank(r, 16, 40) for r in (1, 16, 17, 33)] == [16, 16, 32, 40]
    assert round_rank(5, 1, 40) == 5 and round_rank(50, 1, 40) == 40
    energy = np.array([5.0, 3.0, 1.0, 0.5, 0.25])
    np.testing.assert_allclose(block_energy(energy, 2), [8.0, 1.5, 0.25])
    np.testing.assert_allclose(block_energy(energy, 1), energy)
    cnn = small_cnn(seed=2, channels=(16, 32, 32, 32), size=16)
    for target in (1.5, 2.5):
        _, plain = spatial_svd(cnn, mac_reduction=target)
        _, blocked = spatial_svd(cnn, mac_reduction=target, rank_multiple=8)
        assert blocked.met and blocked.mac_reduction >= target * (1 - 1e-3), blocked
        assert all(layer.rank % 8 == 0 or layer.rank == layer.max_rank for layer in blocked.rewritten)
        assert [layer.rank for layer in blocked.rewritten] != [layer.rank for layer in plain.rewritten]
    _, plain = spatial_svd(cnn, error_budget=0.2)
    out, blocked = spatial_svd(cnn, error_budget=0.2, rank_multiple=8)
    rounded = {layer.name: layer for layer in blocked.layers}
    for a in plain.rewritten:
        b, rank = rounded[a.name], min(-(-a.rank // 8) * 8, a.max_rank)
        if b.status == "rewritten":
            assert b.rank == rank and b.relative_error <= a.relative_error
        else:  # rounded up past the conv's own MACs: left dense, saying so
            assert f"would not reduce MACs at rank {rank}" in b.reason
    assert blocked.rewritten
    x = np.random.default_rng(0).random((2, 3, 16, 16)).astype(np.float32)
    assert np.all(np.isfinite(_run(out, x)))
    with pytest.raises(OptionError) as e:
        SpatialSVDPass(rank_fraction=0.5, rank_multiple=0)
    assert e.value.params == ("rank_multiple",)


def test_unreachable_target_is_reported(cnn):
    _, report = spatial_svd(cnn, mac_reduction=100)
    assert report.met is False and "short of" in report.message


def test_error_decreases_as_rank_grows(cnn):
    _, reports = zip(*(spatial_svd(cnn, rank_fraction=f, force=True) for f in (0.1, 0.3, 0.6, 1.0)))
    weight_err = [[layer.relative_error for layer in r.rewritten] for r in reports]
    assert all(np.all(np.array(a) > np.array(b)) for a, b in zip(weight_err, weight_err[1:]))
    # one conv layer (no nonlinearity): its output error shrinks with the rank too
    model = conv_model(ConvCase(kernel=(3, 3), in_channels=8, out_channels=8, pads=(1, 0, 1, 2), spatial=(12, 12)))
    x = np.random.default_rng(0).random((2, 8, 12, 12)).astype(np.float32)
    ref = _run(model, x)
    out_err = [np.linalg.norm(_run(spatial_svd(model, rank_fraction=f, skip_first=False, force=True)[0], x) - ref)
               / np.linalg.norm(ref) for f in (0.1, 0.3, 0.6, 1.0)]
    assert all(a > b for a, b in zip(out_err, out_err[1:])) and out_err[-1] < 1e-5, out_err


def test_pruning_zero_filters_is_exact():
    model = small_cnn(seed=3, channels=(8, 16), size=10)
    inits = {t.name: t for t in model.graph.initializer}
    w, b = onnx.numpy_helper.to_array(inits["w0"]).copy(), onnx.numpy_helper.to_array(inits["b0"]).copy()
    w[[1, 6]], b[[1, 6]] = 0, -1  # these channels are relu(-1) = 0 everywhere: pruning them is exact
    inits["w0"].CopyFrom(onnx.numpy_helper.from_array(w, "w0"))
    inits["b0"].CopyFrom(onnx.numpy_helper.from_array(b, "b0"))
    out, report = prune_channels(model, fraction=0.25, skip_first=False)
    onnx.checker.check_model(out, full_check=True)
    first, second = report.layers
    assert (first.status, first.rank, first.max_rank) == ("rewritten", 6, 8)
    assert second.status == "skipped" and "GlobalAveragePool" in second.reason and "inputs pruned to 6" in second.reason
    assert {"w0", "b0", "w1"}.isdisjoint(t.name for t in out.graph.initializer)
    x = np.random.default_rng(0).random((3, 3, 10, 10)).astype(np.float32)
    assert _max_rel(_run(out, x), _run(model, x)) <= 1e-5
    assert sum(conv_macs(out).values()) == report.macs_after and report.mac_reduction == pytest.approx(8 / 6)


def test_pruning_reaches_a_mac_target(cnn):
    out, report = prune_channels(cnn, mac_reduction=1.5, skip_first=False)
    assert report.met and report.mac_reduction >= 1.5
    assert [layer.status for layer in report.layers] == ["rewritten", "rewritten", "skipped"]
    assert sum(conv_macs(out).values()) == report.macs_after
    assert np.all(np.isfinite(_run(out, np.random.default_rng(0).random((2, 3, 16, 16)).astype(np.float32))))
    _, report = prune_channels(cnn, mac_reduction=1.5)  # skip_first leaves one prunable conv
    assert [layer.status for layer in report.layers] == ["skipped", "rewritten", "skipped"]


def test_pruning_keeps_widths_multiple_of(cnn):
    _, report = prune_channels(cnn, mac_reduction=1.05, skip_first=False, multiple=4)
    pruned = [layer for layer in report.layers if layer.status == "rewritten"]
    assert pruned and report.met
    assert all(layer.rank % 4 == 0 and layer.rank < layer.max_rank for layer in pruned)
    assert kept_filters(np.ones((6, 2, 3, 3)), 0.5, multiple=8).size == 6  # narrower than 8: kept whole
    assert kept_filters(np.ones((64, 2, 3, 3)), 1 / 64, multiple=8).size == 56
    with pytest.raises(OptionError, match="multiple must be >= 1"):
        prune_channels(cnn, fraction=0.1, multiple=0)


def _check_int8(float_model, calibration, x, min_agreement):
    q = quantize_int8(float_model, calibration)
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert [i.name for i in q.graph.input] == [i.name for i in float_model.graph.input]
    assert [o.name for o in q.graph.output] == [o.name for o in float_model.graph.output]
    assert q.ir_version == float_model.ir_version
    ref, new = _run(float_model, x), _run(q, x)
    assert np.mean(ref.argmax(1) == new.argmax(1)) >= min_agreement
    assert np.linalg.norm(new - ref) / np.linalg.norm(ref) < 0.1
    return q


def test_int8_runs_and_agrees_with_the_float_model(cnn):
    rng = np.random.default_rng(0)
    calibration = rng.random((64, 3, 16, 16)).astype(np.float32)
    x = rng.random((200, 3, 16, 16)).astype(np.float32)
    _check_int8(cnn, calibration, x, 0.9)
    original = cnn.SerializeToString()
    quantize_int8(cnn, calibration, per_channel=False, activation_type="uint8")
    assert cnn.SerializeToString() == original  # the input model is not modified


def test_int8_of_a_gdws_model(cnn):
    gdws, report = optimize(cnn, error_budget=0.05, force=True, verify=False, target="macs")  # random weights: no MAC cut
    assert any(layer.status == "rewritten" for layer in report.layers)
    assert "Gather" in {n.op_type for n in gdws.graph.node}
    rng = np.random.default_rng(1)
    calibration = rng.random((64, 3, 16, 16)).astype(np.float32)
    x = rng.random((200, 3, 16, 16)).astype(np.float32)
    _check_int8(gdws, calibration, x, 0.9)


def test_int8_fixed_batch_and_bad_arguments():
    model = small_cnn(seed=2, channels=(8,), size=8, dynamic_batch=False)  # input batch fixed at 1
    calibration = np.random.default_rng(0).random((10, 3, 8, 8)).astype(np.float32)
    q = quantize_int8(model, calibration, samples=5)
    assert _run(q, calibration[:1]).shape == (1, 10)
    with pytest.raises(GDWSError):
        quantize_int8(model, calibration, activation_type="int4")
    with pytest.raises(GDWSError):
        quantize_int8(model, calibration[0])
