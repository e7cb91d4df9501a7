"""The per-channel SVD, the GDWS factors and the exact error/cost formulas."""

import itertools

import numpy as np
import pytest

from gdws_onnx.core import decompose


def _weight(rng, m, cg, kernel, groups=1):
    return rng.standard_normal((m, cg, *kernel))


@pytest.mark.parametrize("m,cg,kernel,groups", [
    (8, 4, (3, 3), 1), (3, 5, (3, 3), 1),  # M < K: rank is min(M, K) = 3
    (6, 2, (5,), 3), (4, 3, (2, 3, 2), 2), (16, 1, (3, 3), 1)])
def test_full_rank_factors_reconstruct_the_weight(m, cg, kernel, groups):
    w = _weight(np.random.default_rng(0), m, cg, kernel)
    spec = decompose.spectrum(w, groups)
    assert spec.max_rank == min(m // groups, int(np.prod(kernel)))
    full = np.full(spec.in_channels, spec.max_rank)
    f = decompose.factors(spec, full, np.float64)
    np.testing.assert_allclose(decompose.reconstruct(f, spec.in_channels), w, atol=1e-10)
    assert decompose.weighted_error(spec, full) == pytest.approx(0.0, abs=1e-20)


@pytest.mark.parametrize("groups", [1, 2])
def test_error_formula_equals_the_direct_weighted_error(groups):
    rng = np.random.default_rng(1)
    w = _weight(rng, 6, 3, (3, 3))
    spec = decompose.spectrum(w, groups)
    alpha = rng.random(spec.in_channels) + 0.1
    ranks = rng.integers(0, spec.max_rank + 1, size=spec.in_channels)
    q = decompose.reconstruct(decompose.factors(spec, ranks, np.float64), spec.in_channels)
    blocks_err = decompose.channel_blocks(w - q, groups)
    direct = float(np.sum(alpha * np.sum(blocks_err**2, axis=(1, 2))))
    assert decompose.weighted_error(spec, ranks, alpha) == pytest.approx(direct, rel=1e-9)


def test_truncated_svd_is_optimal_among_rank_g_factorizations():
    """Eckart-Young: no random rank-g block beats the truncated SVD's error."""
    rng = np.random.default_rng(2)
    w = _weight(rng, 5, 1, (3, 3))
    spec = decompose.spectrum(w)
    best = decompose.weighted_error(spec, np.array([2]))
    block = w[:, 0].reshape(5, 9)
    for _ in range(200):
        p, d = rng.standard_normal((5, 2)), rng.standard_normal((2, 9))
        d = np.linalg.lstsq(p, block, rcond=None)[0]  # best D for this P
        assert np.sum((block - p @ d) ** 2) >= best - 1e-9


def test_costs_match_the_paper_for_groups_1():
    spec = decompose.spectrum(np.ones((256, 256, 3, 3)))
    ranks = np.full(256, 2)
    assert decompose.gdws_cost_per_pixel(spec, ranks) == 512 * (9 + 256)
    assert decompose.original_cost_per_pixel(spec) == 256 * 256 * 9


def test_grouped_factors_pad_groups_to_equal_width():
    rng = np.random.default_rng(3)
    spec = decompose.spectrum(_weight(rng, 4, 2, (3, 3)), groups=2)
    ranks = np.array([2, 1, 1, 0])  # group totals 3 and 1 -> width 3
    f = decompose.factors(spec, ranks, np.float64)
    assert f.depthwise.shape == (6, 1, 3, 3) and f.pointwise.shape == (4, 3, 1, 1)
    assert decompose.gdws_cost_per_pixel(spec, ranks) == 2 * 3 * 9 + 4 * 3
    w = _weight(np.random.default_rng(3), 4, 2, (3, 3))
    q = decompose.reconstruct(f, 4)  # padding kernels are zero: Q is the plain truncation
    err = decompose.weighted_error(spec, ranks)
    assert np.sum((decompose.channel_blocks(q - w, 2)) ** 2) == pytest.approx(err, rel=1e-9)


def test_energy_kept_is_monotone_and_complete():
    spec = decompose.spectrum(np.random.default_rng(4).standard_normal((8, 4, 3, 3)))
    kept = [decompose.energy_kept(spec, r) for r in range(1, 10)]
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(kept))
    assert kept[-1] == pytest.approx(1.0)


def test_invalid_inputs():
    with pytest.raises(ValueError):
        decompose.spectrum(np.ones((4, 3)))
    with pytest.raises(ValueError):
        decompose.spectrum(np.ones((5, 2, 3, 3)), groups=2)
    spec = decompose.spectrum(np.ones((4, 2, 3, 3)))
    with pytest.raises(ValueError):
        decompose.factors(spec, np.array([5, 1]))
