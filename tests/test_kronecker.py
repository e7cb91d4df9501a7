"""core/kronecker.py: the Van Loan-Pitsianis rearrangement, nearest Kronecker sums, the factor-shape
search and the scheme comparison, checked against direct numpy and brute force."""

from __future__ import annotations

import numpy as np
import pytest

from gdws_onnx.core import kronecker as K
from gdws_onnx.errors import OptionError


def _rel_err(w: np.ndarray, approx: np.ndarray) -> float:
    return float(((w - approx) ** 2).sum() / (w**2).sum())


@pytest.mark.parametrize("m,n", [(12, 20), (8, 9), (6, 6), (16, 4)])
def test_rearrange_round_trip_and_kron_to_outer_product(m, n):
    rng = np.random.default_rng(m * 100 + n)
    w = rng.standard_normal((m, n))
    for sh in K.kronecker_shapes(m, n, proper=False):
        np.testing.assert_array_equal(K.unrearrange(K.rearrange(w, sh), sh), w)
        a, b = rng.standard_normal((sh.p, sh.q)), rng.standard_normal((sh.r, sh.s))
        np.testing.assert_allclose(K.rearrange(np.kron(a, b), sh), np.outer(a.ravel(), b.ravel()), atol=1e-12)


def test_kron_sum_and_row_major_application():
    """sum_t A_t (x) B_t equals numpy's kron summed, and (A (x) B) x = vec(A X B^T) row-major."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((3, 4, 6)), rng.standard_normal((3, 5, 2))
    np.testing.assert_allclose(K.kron_sum(a, b), sum(np.kron(a[t], b[t]) for t in range(3)), atol=1e-12)
    x = rng.standard_normal(6 * 2)
    np.testing.assert_allclose(np.kron(a[0], b[0]) @ x, (a[0] @ x.reshape(6, 2) @ b[0].T).ravel(), atol=1e-12)


def test_predicted_error_per_rank_is_the_actual_error_and_full_rank_is_exact():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((12, 18))
    for sh in K.kronecker_shapes(12, 18)[::3]:
        errors = []
        for rank in range(1, sh.max_rank + 1):
            f = K.nearest_kronecker(w, sh, rank)
            assert f.a.shape == (rank, sh.p, sh.q) and f.b.shape == (rank, sh.r, sh.s)
            assert f.error == pytest.approx(_rel_err(w, f.matrix()), rel=1e-9, abs=1e-14)
            errors.append(f.error)
        assert errors == sorted(errors, reverse=True)
        assert errors[-1] < 1e-24
        np.testing.assert_allclose(K.nearest_kronecker(w, sh, sh.max_rank).matrix(), w, atol=1e-12)


def test_nearest_kronecker_beats_random_and_perturbed_factors():
    """Rank 1: no random pair (each at its least-squares scale) and no perturbation of the optimum
    comes closer to W (Eckart-Young on R(W))."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 12))
    sh = K.KroneckerShape(2, 3, 4, 4)
    best = K.nearest_kronecker(w, sh, 1)
    for _ in range(200):
        kr = np.kron(rng.standard_normal((2, 3)), rng.standard_normal((4, 4)))
        scaled = kr * (w * kr).sum() / (kr**2).sum()
        assert _rel_err(w, scaled) >= best.error - 1e-12
    for scale in (1e-1, 1e-3):
        a = best.a + scale * rng.standard_normal(best.a.shape)
        b = best.b + scale * rng.standard_normal(best.b.shape)
        assert _rel_err(w, K.kron_sum(a, b)) > best.error


def test_kronecker_shapes_are_the_divisor_pairs():
    shapes = K.kronecker_shapes(12, 20, proper=False)
    div12, div20 = [1, 2, 3, 4, 6, 12], [1, 2, 4, 5, 10, 20]
    assert {(s.p, s.q) for s in shapes} == {(p, q) for p in div12 for q in div20}
    assert all(s.m == 12 and s.n == 20 for s in shapes)
    improper = {(s.p, s.q, s.r, s.s) for s in shapes} - {(s.p, s.q, s.r, s.s) for s in K.kronecker_shapes(12, 20)}
    assert improper == {(1, 1, 12, 20), (12, 20, 1, 1), (12, 1, 1, 20), (1, 20, 12, 1)}
    assert K.kronecker_shapes(7, 13) == []  # primes: only dense and plain low rank


def test_orders_cost_what_the_formula_says_and_the_cheaper_is_chosen():
    sh = K.KroneckerShape(3, 4, 4, 5)
    assert sh.order_macs(2, K.B_FIRST) == 2 * 4 * 4 * (5 + 3)
    assert sh.order_macs(2, K.A_FIRST) == 2 * 3 * 5 * (4 + 4)
    assert sh.best_order() == K.A_FIRST and sh.macs(2) == 240
    assert K.KroneckerShape(4, 3, 5, 4).best_order() == K.B_FIRST


def test_lowrank_is_the_degenerate_kronecker_shape():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((10, 14))
    for k in (1, 4, 10):
        low = K.truncated_svd(w, k)
        kr = K.nearest_kronecker(w, K.KroneckerShape(10, 1, 1, 14), k)
        np.testing.assert_allclose(low.matrix(), kr.matrix(), atol=1e-10)
        assert low.error == pytest.approx(kr.error) == pytest.approx(_rel_err(w, low.matrix()), abs=1e-14)
        assert low.macs == kr.macs == k * 24


def _all_choices(w):
    """(error, macs, shape, rank) of every proper shape at every rank."""
    out = []
    for sh in K.kronecker_shapes(*w.shape):
        errors = K.tail_errors(np.linalg.svd(K.rearrange(w, sh), compute_uv=False))
        out += [(errors[r], sh.macs(r), sh, r) for r in range(1, sh.max_rank + 1)]
    return out


@pytest.mark.parametrize("budget", [0.02, 0.2, 0.5])
def test_search_under_error_budget_is_the_cheapest_feasible_choice(budget):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((12, 18)) + 3 * np.kron(rng.standard_normal((3, 6)), rng.standard_normal((4, 3)))
    f = K.search_kronecker(w, error_budget=budget, max_shapes=None)
    feasible = [c for c in _all_choices(w) if c[0] <= budget]
    assert f.error <= budget and f.error == pytest.approx(_rel_err(w, f.matrix()), abs=1e-12)
    assert f.macs == min(c[1] for c in feasible)
    assert f.error == pytest.approx(min(c[0] for c in feasible if c[1] == f.macs))


@pytest.mark.parametrize("reduction", [1.5, 3.0, 4.0, 8.0])
def test_search_under_mac_budget_is_the_most_accurate_affordable_choice(reduction):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((16, 12))
    f = K.search_kronecker(w, mac_reduction=reduction, max_shapes=None)
    affordable = [c for c in _all_choices(w) if c[1] <= w.size / reduction]
    if reduction == 8.0:  # 24 MACs: every proper shape costs more at rank 1
        assert not affordable and f is None
        return
    assert f.macs <= w.size / reduction
    assert f.error == pytest.approx(min(c[0] for c in affordable))
    low = K.search_lowrank(w, mac_reduction=reduction)
    assert low.macs <= w.size / reduction < (low.rank + 1) * 28 or low.rank == 12


def test_search_finds_a_planted_kronecker_product_and_the_winner_follows_the_structure():
    rng = np.random.default_rng(7)
    planted = np.kron(rng.standard_normal((3, 4)), rng.standard_normal((4, 5)))
    w = planted + 1e-4 * rng.standard_normal(planted.shape)
    f = K.search_kronecker(w, error_budget=1e-3)
    assert (f.shape, f.rank) == (K.KroneckerShape(3, 4, 4, 5), 1)
    cmp = K.compare_schemes(w, error_budget=1e-3)
    assert cmp.winner == "kronecker" and cmp.kronecker.macs < cmp.lowrank.macs
    outer = np.outer(rng.standard_normal(12), rng.standard_normal(20))  # rank 1: low rank wins
    cmp = K.compare_schemes(outer, error_budget=1e-3)
    assert cmp.winner == "lowrank" and cmp.lowrank.rank == 1
    cmp = K.compare_schemes(outer, mac_reduction=4)
    assert cmp.winner == "lowrank" and cmp.lowrank.error < 1e-20 < cmp.kronecker.error


def test_error_budget_zero_drops_only_numerically_zero_terms():
    rng = np.random.default_rng(8)
    sh = K.KroneckerShape(2, 3, 4, 5)
    w = np.kron(rng.standard_normal((2, 3)), rng.standard_normal((4, 5)))
    f = K.search_kronecker(w, error_budget=0.0, shapes=[sh])
    assert f.rank == 1 and np.abs(f.matrix() - w).max() < 1e-12
    g = K.search_kronecker(rng.standard_normal((8, 15)), error_budget=0.0, shapes=[sh])
    assert g.rank == sh.max_rank


@pytest.mark.parametrize("kwargs", [{}, {"error_budget": 0.1, "mac_reduction": 2.0}, {"error_budget": 1.0},
                                    {"error_budget": -0.1}, {"mac_reduction": 0.5}])
def test_bad_budgets_are_option_errors(kwargs):
    w = np.ones((4, 4))
    for fn in (K.search_kronecker, K.search_lowrank, K.compare_schemes):
        with pytest.raises(OptionError):
            fn(w, **kwargs)


def test_bad_ranks_and_shapes_are_value_errors():
    w = np.ones((4, 6))
    with pytest.raises(ValueError):
        K.nearest_kronecker(w, K.KroneckerShape(2, 2, 2, 3), 5)
    with pytest.raises(ValueError):
        K.nearest_kronecker(w, K.KroneckerShape(2, 3, 2, 3), 1)
    with pytest.raises(ValueError):
        K.truncated_svd(np.ones((2, 3, 4)), 1)
