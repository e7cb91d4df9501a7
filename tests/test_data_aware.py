"""Data-aware GDWS (`optimize(data_aware=lam)`): per-channel truncation in the metric
(1 - lam) I + lam S_c / s. Checks: the metric SVD is exact at full rank and Eckart-Young optimal
for its own objective, the second moments S_c match an independent conv-based computation, and
the rewritten model minimizes its stated objective on its calibration data better than
weight-space SVD at the same ranks."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from gdws_onnx.core import decompose
from gdws_onnx import optimize
from gdws_onnx.cli import main
from gdws_onnx.graph.convs import find_convs
from gdws_onnx.calibrate.data_aware import blended_metric, channel_objective, channel_second_moments
from gdws_onnx.errors import GDWSError
from gdws_onnx.runtime.session import make_session

from builders import tiny_inputs, tiny_model


def _spd(rng: np.random.Generator, c: int, k: int) -> np.ndarray:
    a = rng.standard_normal((c, k, k))
    return a @ np.swapaxes(a, 1, 2) + 0.1 * np.eye(k)[None]


def _truncate(spec: decompose.Spectrum, ranks: np.ndarray, weight: np.ndarray) -> np.ndarray:
    f = decompose.factors(spec, ranks, np.float64)
    return decompose.reconstruct(f, weight.shape[1] * spec.groups)


@pytest.mark.parametrize("shape,groups", [((6, 4, 3, 3), 1), ((6, 2, 3, 3), 2), ((5, 3, 3), 1), ((4, 2, 2, 2, 2), 1)])
def test_metric_spectrum_exact_at_full_rank_and_optimal(shape, groups):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape)
    c, k = shape[1] * groups, int(np.prod(shape[2:]))
    metric = _spd(rng, c, k)
    spec = decompose.metric_spectrum(w, groups, metric)
    full = np.full(c, spec.max_rank)
    np.testing.assert_allclose(_truncate(spec, full, w), w, atol=1e-10)
    plain = decompose.spectrum(w, groups)
    for g in range(spec.max_rank):
        ranks = np.full(c, g)
        mine = channel_objective(w, _truncate(spec, ranks, w), groups, metric)
        # s measures the objective, and it beats weight-space SVD's truncation in that metric
        assert mine == pytest.approx(decompose.weighted_error(spec, ranks), rel=1e-8, abs=1e-10)
        assert mine <= channel_objective(w, _truncate(plain, ranks, w), groups, metric) * (1 + 1e-9) + 1e-12


def test_identity_metric_is_weight_svd():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 4, 3, 3))
    spec = decompose.metric_spectrum(w, 1, np.broadcast_to(np.eye(9), (4, 9, 9)))
    np.testing.assert_allclose(spec.s, decompose.spectrum(w).s, rtol=1e-10)
    second = _spd(rng, 4, 9)
    np.testing.assert_allclose(blended_metric(second, 0.0)[0], np.eye(9), atol=1e-8)
    with pytest.raises(ValueError):
        blended_metric(second, 1.5)


def _values(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n != "x")
    sess = make_session(m)
    want = [n for n in names if n != "x"]
    vals = dict(zip(want, sess.run(want, {"x": x})))
    vals["x"] = x
    return vals


def _probe_energy(site, v: np.ndarray, channel: int, a: np.ndarray) -> float:
    """mean over samples and output positions of conv(v_c, a)^2: a^T S_c a, computed by a one-filter
    conv of the site's geometry (group 1) reading only channel c."""
    w = np.zeros((1, v.shape[1], *site.kernel_shape))
    w[0, channel] = a.reshape(site.kernel_shape)
    attrs = {a.name: helper.get_attribute_value(a) for a in site.node.attribute if a.name != "group"}
    node = helper.make_node("Conv", ["v", "w"], ["y"], **attrs)
    g = helper.make_graph([node], "probe", [helper.make_tensor_value_info("v", onnx.TensorProto.DOUBLE, None)],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, None)],
                          [numpy_helper.from_array(w, "w")])
    y = ReferenceEvaluator(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])).run(
        None, {"v": v.astype(np.float64)})[0]
    return float(np.mean(y ** 2))


def test_second_moments_match_conv_energy():
    model = tiny_model()
    x = tiny_inputs(9)
    sites = find_convs(model)
    second = channel_second_moments(model, {"x": x}, sites, batch_size=4)  # batches of 4, 4, 1
    vals = _values(model, [s.node.input[0] for s in sites], x)
    rng = np.random.default_rng(2)
    for site in sites:  # dilation + pads, group 2 + stride + asymmetric pads, SAME_UPPER
        assert second[site.name].shape == (site.in_channels, site.kernel_size, site.kernel_size)
        for c in range(site.in_channels):
            a = rng.standard_normal(site.kernel_size)
            want = _probe_energy(site, vals[site.node.input[0]], c, a)
            assert a @ second[site.name][c] @ a == pytest.approx(want, rel=1e-5)


def _rewritten_factors(model: onnx.ModelProto, site) -> decompose.GDWSFactors | None:
    """The GDWS factors a rewritten conv carries in the optimized model (None: not rewritten)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    prefix = f"{site.name}/gdws/"
    if prefix + "dw_weight" not in inits:
        return None
    dw, pw = inits[prefix + "dw_weight"], inits[prefix + "pw_weight"]
    gather = inits.get(prefix + "gather_indices")
    multiplier = gather is None
    if multiplier:
        gather = np.repeat(np.arange(site.in_channels), dw.shape[0] // site.in_channels)
    return decompose.GDWSFactors(gather=gather, depthwise=dw.astype(np.float64), pointwise=pw.astype(np.float64),
                                 groups=site.group, multiplier=multiplier)


def test_optimize_data_aware_minimizes_its_objective_on_calibration_data(tmp_path):
    model = tiny_model()
    x = tiny_inputs(64)
    data = tmp_path / "cal.npz"
    np.savez(data, x=x)
    lam = 0.5
    sites = {s.name: s for s in find_convs(model)}
    second = channel_second_moments(model, {"x": x}, list(sites.values()))
    optimized, rep = optimize(model, mac_reduction=1.3, skip_first=False, force=True, data=str(data),
                              data_aware=lam, target="macs")
    assert rep.options["data_aware"] == lam and rep.verification.ran
    compared = 0
    for name, site in sites.items():
        f = _rewritten_factors(optimized, site)
        if f is None:
            continue
        metric = blended_metric(second[name], lam)
        kernels = np.abs(f.depthwise.reshape(len(f.gather), -1)).sum(1) > 0
        ranks = np.bincount(f.gather[kernels], minlength=site.in_channels)
        assert ranks.sum() < site.in_channels * min(site.out_channels // site.group, site.kernel_size)  # truncated
        aware = decompose.reconstruct(f, site.in_channels)
        plain = _truncate(decompose.spectrum(site.weight, site.group), ranks, site.weight)
        assert channel_objective(site.weight, aware, site.group, metric) < \
            channel_objective(site.weight, plain, site.group, metric)
        compared += 1
    assert compared >= 1


def test_optimize_data_aware_full_rank_is_exact(tmp_path):
    model = tiny_model()
    data = tmp_path / "cal.npz"
    np.savez(data, x=tiny_inputs(32))
    _, rep = optimize(model, error_budget=0.0, skip_first=False, force=True, data=str(data), data_aware=1.0, target="macs")
    assert any(lay.status == "rewritten" for lay in rep.layers)
    assert all(o.relative < 1e-4 for o in rep.verification.outputs)


def test_data_aware_bad_input(tmp_path):
    with pytest.raises(GDWSError, match="data_aware needs data"):
        optimize(tiny_model(), mac_reduction=1.5, data_aware=0.5, target="macs")
    with pytest.raises(GDWSError, match=r"\(0, 1\]"):
        optimize(tiny_model(), mac_reduction=1.5, data_aware=0.0, data="x.npz", target="macs")
    src = tmp_path / "m.onnx"
    onnx.save(tiny_model(), str(src))
    out = tmp_path / "o.onnx"
    with pytest.raises(SystemExit) as e:
        main(["optimize", str(src), "-o", str(out), "--mac-reduction", "1.5", "--data-aware", "0.5", "--target", "macs"])
    assert e.value.code == 2 and not out.exists()
