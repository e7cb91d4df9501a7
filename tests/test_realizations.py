"""Every realization of GDWS factors is exact against ONNX Runtime: the stacked form (r true
depthwise convs, concatenated) realizes the same weight as the channel-multiplier and Gather
forms, at full rank (= the original conv) and with zero-padded, uneven ranks."""

import numpy as np
import onnx
import pytest
from builders import conv_model, random_case

from gdws_onnx.core import decompose
from gdws_onnx.graph import pattern
from gdws_onnx.graph.convs import find_convs
from gdws_onnx.graph.rewrite import GDWSRewritePass, LayerRewrite
from gdws_onnx.runtime.session import make_session

N_CASES = 80


def _ungrouped_case(seed: int):
    """The first seeded conv case from the fuzz corpus's generator that is ungrouped."""
    for k in range(100):
        rng = np.random.default_rng(5000 + 97 * seed + k)
        case = random_case(rng, seed + k)
        if case.group == 1:
            return rng, case
    raise AssertionError("no ungrouped case")


def _rewritten(model: onnx.ModelProto, ranks_of, **form) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    (site,) = find_convs(copy)
    spec = decompose.spectrum(site.weight, site.group)
    f = decompose.factors(spec, ranks_of(spec), site.weight.dtype, **form)
    GDWSRewritePass([LayerRewrite(site, f)]).call(copy)
    onnx.checker.check_model(copy, full_check=True)
    return copy


def _run(model, x):
    return make_session(model).run(None, {"x": x})[0].astype(np.float64)


def _rel(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("seed", range(N_CASES))
def test_stacked_form_is_exact(seed):
    rng, case = _ungrouped_case(seed)
    model = conv_model(case)
    tol = 1e-2 if case.fp16 else 1e-4
    x = rng.random((2, case.in_channels, *case.spatial)).astype(np.float16 if case.fp16 else np.float32)
    full = _rewritten(model, lambda s: np.full(s.in_channels, s.max_rank), stacked=True)
    assert _rel(_run(full, x), _run(model, x)) <= tol, case
    ops = [n.op_type for n in full.graph.node]
    terms = min(int(np.prod(case.kernel)), case.out_channels)  # max_rank
    assert ops.count("Conv") == terms + 1 and ("Concat" in ops) == (terms > 1) and "Gather" not in ops
    # uneven ranks, zero-padded to the largest: the same weight as the Gather form realizes
    uneven = lambda s: rng.integers(0, s.max_rank + 1, s.in_channels).clip(min=(seed % 2))  # noqa: E731
    state = rng.bit_generator.state
    stacked = _rewritten(model, uneven, stacked=True)
    rng.bit_generator.state = state
    gathered = _rewritten(model, uneven)
    assert _rel(_run(stacked, x), _run(gathered, x)) <= tol, case


def test_stacked_weights_reconstruct_like_the_multiplier_form():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((24, 16, 3, 3))
    spec = decompose.spectrum(w)
    ranks = rng.integers(1, 5, 16)
    m = decompose.factors(spec, ranks, np.float64, multiplier=True)
    s = decompose.factors(spec, ranks, np.float64, stacked=True)
    assert s.stacked and s.multiplier and s.terms == m.terms == int(ranks.max())
    np.testing.assert_allclose(decompose.reconstruct(s, 16), decompose.reconstruct(m, 16), atol=1e-12)
    assert list(s.gather[:16]) == list(range(16))  # term-major: channel c of term t at t C + c
    with pytest.raises(ValueError, match="ungrouped"):
        decompose.factors(decompose.spectrum(rng.standard_normal((8, 4, 3, 3)), 2), np.ones(8, int),
                          stacked=True)


def test_stacked_nodes_are_named_for_their_layer():
    rng, case = _ungrouped_case(1)
    model = _rewritten(conv_model(case), lambda s: np.full(s.in_channels, 2), stacked=True)
    layers = {pattern.layer_of(n.name) for n in model.graph.node}
    assert len(layers) == 1
    roles = sorted(pattern.role_of(n.name) for n in model.graph.node)
    assert roles == ["concat", "dw", "dw_1", "pw"]
