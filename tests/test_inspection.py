"""`inspect`'s cut columns: each factorization's conv MAC reduction at a relative weight error,
checked against MACs counted by hand on weights of known rank."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import ConvCase, conv_model
from click.testing import CliRunner
from onnx import numpy_helper

from gdws_onnx.cli import main
from gdws_onnx.errors import OptionError
from gdws_onnx.peers import rank_at_error, relative_error, spatial_spectrum
from gdws_onnx.pipeline.inspection import inspect_model, model_cut

O, I, H = 16, 8, 10  # a 3x3 conv, padded to keep 10x10


def _saved(tmp_path, weight: np.ndarray | None = None, **case) -> str:
    model = conv_model(ConvCase(kernel=(3, 3), in_channels=I, out_channels=O, pads=(1, 1, 1, 1), spatial=(H, H),
                                **case))
    if weight is not None:
        init = next(t for t in model.graph.initializer if t.name == "W")
        init.CopyFrom(numpy_helper.from_array(weight.astype(np.float32), "W"))
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    return path


def test_rank_at_error_is_the_lowest_rank_within_the_error():
    rng = np.random.default_rng(0)
    for trial in range(20):
        spec = spatial_spectrum(rng.standard_normal((6, 4, 3, 3)) * rng.random((6, 1, 1, 1)))
        for eps in (0.0, 1e-3, 0.05, 0.2, 0.9):
            r = rank_at_error(spec.s, eps)
            assert relative_error(spec, r) <= eps + 1e-12
            assert r == 1 or relative_error(spec, r - 1) > eps, (trial, eps, r)


def test_rank_one_weight_cut_by_hand(tmp_path):
    """W[o,c,y,x] = p_o q_c u_y v_x: per-channel rank 1 (GDWS: G = C) and spatial rank 1."""
    rng = np.random.default_rng(1)
    p, q, u, v = (rng.standard_normal(n) for n in (O, I, 3, 3))
    w = np.einsum("o,c,y,x->ocyx", p, q, u, v)
    (info,) = inspect_model(_saved(tmp_path, w), error=1e-6)
    dense = O * I * 9 * H * H
    assert info.cut_at_error["gdws"] == pytest.approx((O * I * 9) / (I * (9 + O)))  # per pixel: M C K / G (K + M)
    # spatial SVD at rank 1: a 3x1 conv I -> 1 on (H' x W_in) pixels, then 1x3 conv 1 -> O on (H' x W')
    assert info.cut_at_error["spatial_svd"] == pytest.approx(dense / (I * 3 * H * H + O * 3 * H * H))
    assert info.cut_at_error["error"] == 1e-6
    assert model_cut([info], "spatial_svd") == pytest.approx(info.cut_at_error["spatial_svd"])


def test_no_cut_where_it_would_not_be_cheaper_or_does_not_apply(tmp_path):
    (dense,) = inspect_model(_saved(tmp_path), error=0.05)  # Gaussian weights: nearly full rank needed
    assert dense.cut_at_error["gdws"] == 1.0 and dense.cut_at_error["spatial_svd"] == 1.0
    (grouped,) = inspect_model(_saved(tmp_path, group=2), error=0.05)
    assert grouped.cut_at_error["spatial_svd"] is None and grouped.cut_at_error["gdws"] >= 1.0
    with pytest.raises(OptionError, match="error must be in"):
        inspect_model(_saved(tmp_path), error=1.0)


def test_inspect_cli_prints_both_cuts(tmp_path):
    rng = np.random.default_rng(2)
    w = np.einsum("o,c,y,x->ocyx", *(rng.standard_normal(n) for n in (O, I, 3, 3)))
    path = _saved(tmp_path, w)
    r = CliRunner().invoke(main, ["inspect", path, "--error", "0.01"])
    assert r.exit_code == 0, r.output
    assert "spatial SVD cut" in r.output and "Tucker-2 cut" in r.output and "at weight error 0.01 in every conv" in r.output
    (info,) = json.loads(CliRunner().invoke(main, ["inspect", path, "--json"]).output)
    assert set(info["cut_at_error"]) == {"error", "gdws", "spatial_svd", "tucker"} and info["cut_at_error"]["error"] == 0.05
    bad = CliRunner().invoke(main, ["inspect", path, "--error", "2"])
    assert bad.exit_code == 2 and bad.output.startswith("error: --error must be in [0, 1)")


def test_gdws_cut_is_what_optimize_reaches_at_that_error_budget(tmp_path):
    """inspect's GDWS column is a promise: optimize --error-budget E --no-skip-first reaches it."""
    from builders import small_cnn

    from gdws_onnx import optimize

    path = str(tmp_path / "cnn.onnx")
    onnx.save(small_cnn(seed=3, channels=(16, 32, 32)), path)
    for eps in (0.05, 0.2):
        infos = inspect_model(path, error=eps)
        _, report = optimize(path, error_budget=eps, skip_first=False, verify=False, target="macs")
        assert model_cut(infos, "gdws") == pytest.approx(report.mac_reduction, rel=1e-9), eps
    assert report.mac_reduction > 1.2  # at 0.2 the random weights do give GDWS room


def test_tucker_cut_is_what_the_auto_family_builds_at_that_error():
    """inspect's Tucker-2 column and `optimize --conv auto`'s Tucker-2 form at the same error agree."""
    from builders import small_cnn

    from gdws_onnx.graph.convs import find_convs
    from gdws_onnx.pipeline.families import Tucker2Family, dense_macs
    from gdws_onnx.pipeline.inspection import tucker_cut

    for site in find_convs(small_cnn(seed=3, channels=(16, 32, 32))):
        for eps in (0.05, 0.3):
            forms = Tucker2Family().forms(site, [eps])
            cut = tucker_cut(site, eps)
            assert cut == (pytest.approx(dense_macs(site) / forms[0].macs) if forms else 1.0)
            assert not forms or forms[0].error <= eps + 1e-9
