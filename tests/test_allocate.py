"""LEGO and MEGO are exactly optimal per layer (brute force); the network allocator keeps budgets."""

import itertools

import numpy as np
import pytest

from gdws_onnx.core import allocate, decompose
from gdws_onnx.errors import GDWSError


def _scores(rng, c, m, k, ties=False):
    w = rng.standard_normal((m, c, k))
    if ties:  # repeated singular values and a dead channel
        w[:, 0] = np.ones((m, k))
        w[:, 1] = 2 * w[:, 0]
        w[:, -1] = 0
    spec = decompose.spectrum(w)
    return decompose.scores(spec, rng.random(c) + 0.2)


def _all_ranks(scores):
    return [np.array(r) for r in itertools.product(*(range(scores.shape[1] + 1) for _ in range(scores.shape[0])))]


def _error(scores, ranks):
    return float(sum(scores[c, g:].sum() for c, g in enumerate(ranks)))


@pytest.mark.parametrize("seed", range(12))
def test_lego_is_minimal_complexity_under_the_error_budget(seed):
    rng = np.random.default_rng(seed)
    sc = _scores(rng, c=3, m=int(rng.integers(1, 5)), k=3, ties=seed % 3 == 0)
    total = float(sc.sum())
    for beta in [0.0, 0.05 * total, 0.2 * total, 0.5 * total, total]:
        ranks = allocate.lego(sc, beta)
        assert _error(sc, ranks) <= beta * (1 + 1e-12)
        best = min(int(r.sum()) for r in _all_ranks(sc) if _error(sc, r) <= beta)
        assert int(ranks.sum()) == best


@pytest.mark.parametrize("seed", range(12))
def test_mego_is_minimal_error_under_the_complexity_budget(seed):
    rng = np.random.default_rng(100 + seed)
    sc = _scores(rng, c=3, m=int(rng.integers(1, 5)), k=3, ties=seed % 3 == 0)
    for budget in range(sc.size + 1):
        ranks = allocate.mego(sc, budget)
        assert int(ranks.sum()) == budget
        best = min(_error(sc, r) for r in _all_ranks(sc) if r.sum() <= budget)
        assert _error(sc, ranks) == pytest.approx(best, abs=1e-12)


def test_mego_handles_m_smaller_than_k():
    sc = _scores(np.random.default_rng(5), c=4, m=2, k=9)  # rank is 2, not 9
    assert sc.shape == (4, 2)
    assert allocate.mego(sc, 100).tolist() == [2, 2, 2, 2]


def _layers(rng, n=3):
    out = []
    for i in range(n):
        sc = _scores(rng, c=4, m=6, k=9)
        pixels = float(rng.integers(4, 64))
        out.append(allocate.LayerCost(scores=sc, term_cost=pixels * (9 + 6), original_cost=pixels * 6 * 4 * 9))
    return out


@pytest.mark.parametrize("ratio", [1.2, 2.0, 4.0, 8.0])
def test_mac_allocation_respects_the_budget(ratio):
    layers = _layers(np.random.default_rng(6))
    total = sum(layer.original_cost for layer in layers)
    res = allocate.allocate_macs(layers, total / ratio)
    assert res.feasible
    assert res.total_cost <= total / ratio + 1e-9
    for layer, r in zip(layers, res.ranks):
        if r is not None:
            assert allocate.gdws_cost(layer, r) < layer.original_cost and r.sum() >= 1


def test_mac_allocation_is_near_optimal_on_small_cases():
    """Greedy by score/cost vs brute force over per-layer MEGO choices (exact per layer)."""
    rng = np.random.default_rng(7)
    layers = _layers(rng, n=2)
    total = sum(layer.original_cost for layer in layers)
    budget = total / 2.5
    res = allocate.allocate_macs(layers, budget)

    def err(i, r):
        return 0.0 if r is None else _error(layers[i].scores, r)

    got = sum(err(i, r) for i, r in enumerate(res.ranks))
    options = [[None] + [allocate.mego(layer.scores, g) for g in range(1, layer.scores.size + 1)] for layer in layers]
    best = min(sum(err(i, r) for i, r in enumerate(choice)) for choice in itertools.product(*options)
               if sum(layer.original_cost if r is None else allocate.gdws_cost(layer, r)
                      for layer, r in zip(layers, choice)) <= budget)
    assert got <= best * 1.25 + 1e-12  # greedy is exact in the fractional relaxation


def test_infeasible_budget_is_reported():
    layers = _layers(np.random.default_rng(8))
    res = allocate.allocate_macs(layers, 1.0)
    assert not res.feasible
    assert all(r is not None and r.sum() == 1 for r in res.ranks)


def test_layers_that_would_cost_more_are_left_original():
    rng = np.random.default_rng(9)
    sc = _scores(rng, c=2, m=2, k=9)  # GDWS at full rank costs more than the conv
    layer = allocate.LayerCost(scores=sc, term_cost=11.0, original_cost=2 * 2 * 9.0)
    res = allocate.allocate_macs([layer], 1e9)
    assert res.ranks == [None] and res.total_cost == layer.original_cost


def _width(ranks, group_of):
    return max(int(ranks[group_of == j].sum()) for j in np.unique(group_of))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("down", [False, True])
def test_round_width_is_a_multiple_and_best_of_its_kind(seed, down):
    """Up: every group reaches the next multiple with the most valuable extra terms (brute force);
    down: the least valuable terms go. Either way the width is a multiple of m."""
    rng = np.random.default_rng(seed)
    c, r, m = 4, 3, 4
    scores = -np.sort(-rng.random((c, r)) ** 2, axis=1)
    group_of = np.array([0, 0, 1, 1]) if seed % 2 else np.zeros(c, np.int64)
    ranks = rng.integers(0, r + 1, size=c)
    if ranks.sum() == 0:
        ranks[0] = 1
    out = allocate.round_width(scores, ranks, group_of, m, down=down)
    width = _width(out, group_of)
    assert width % m == 0 or all(out[group_of == j].sum() in (0, r * (group_of == j).sum()) or
                                 out[group_of == j].sum() == width for j in np.unique(group_of))
    assert (out >= ranks).all() if not down or _width(ranks, group_of) < m else (out <= ranks).all()
    kept = lambda rk: sum(scores[i, :rk[i]].sum() for i in range(c))  # noqa: E731
    for j in np.unique(group_of):
        chans = np.flatnonzero(group_of == j)
        total = int(out[chans].sum())
        best = max(kept(np.where(group_of == j, np.array(cand), 0)) for cand in itertools.product(range(r + 1), repeat=c)
                   if sum(cand[i] for i in chans) == total and all(cand[i] == 0 for i in range(c) if i not in chans)
                   and all((cand[i] >= ranks[i]) if (out >= ranks).all() else (cand[i] <= ranks[i]) for i in chans))
        assert kept(np.where(group_of == j, out, 0)) == pytest.approx(best)


def test_round_width_leaves_multiples_alone():
    scores = np.ones((4, 2))
    ranks = np.array([2, 2, 2, 2])
    assert (allocate.round_width(scores, ranks, np.zeros(4, np.int64), 8) == ranks).all()
    assert (allocate.round_width(scores, ranks, np.zeros(4, np.int64), 1) == ranks).all()


@pytest.mark.parametrize("budget", [{"error_budget": 0.1}, {"mac_reduction": 1.5}])
def test_optimize_width_multiple(budget):
    from builders import small_cnn

    from gdws_onnx import optimize

    model = small_cnn(seed=0, channels=(8, 16, 16))
    _, plain = optimize(model, skip_first=False, force=True, verify=False, target="macs", **budget)
    _, rounded = optimize(model, skip_first=False, force=True, width_multiple=8, target="macs", **budget)
    assert rounded.rewritten and all(lay.total_rank % 8 == 0 for lay in rounded.rewritten)
    assert rounded.verification.ran
    if "error_budget" in budget:  # rounded up: never more error than asked
        assert all(lay.relative_error <= 0.1 + 1e-9 for lay in rounded.rewritten)
        assert sum(lay.total_rank for lay in rounded.rewritten) >= sum(lay.total_rank for lay in plain.rewritten)
    else:  # rounded down: the MAC budget still holds
        assert rounded.mac_reduction >= 1.5 and rounded.budget.met


def test_flat_options_land_in_their_groups_and_the_report_lists_them_flat():
    from gdws_onnx.pipeline.options import FLAT, GROUP_OF, BudgetOptions, OptimizeOptions

    assert set(GROUP_OF) == set(FLAT)  # every option is in exactly one group, and reported
    opts = OptimizeOptions(error_budget=0.05, skip_first=False, data="d.npz", ep="cuda", batches=[1, 8],
                           max_error=0.1, bias_correction=True, threads=2)
    assert (opts.budget.error_budget, opts.selection.skip_first, opts.run.data, opts.timing.ep,
            opts.verification.max_error, opts.calibration.bias_correction, opts.run.threads) == \
        (0.05, False, "d.npz", "cuda", 0.1, True, 2)
    d = opts.to_dict()
    assert list(d) == [k for k in FLAT if k not in ("probe_factory", "progress")]
    assert (d["error_budget"], d["batches"], d["skip_first"], d["mac_reduction"]) == (0.05, [1, 8], False, None)
    assert OptimizeOptions(alphas={"conv1": [1.0]}).to_dict()["alphas"] == "<dict>"
    whole = OptimizeOptions(budget=BudgetOptions(mac_reduction=2.0), skip_first=False)
    assert whole.budget.mac_reduction == 2.0 and not whole.selection.skip_first
    with pytest.raises(TypeError, match="error_budgte"):
        OptimizeOptions(error_budgte=0.1)


def test_the_budget_options_choose_the_planner():
    from gdws_onnx.pipeline import budgets
    from gdws_onnx.pipeline.latency import LatencyPlanner
    from gdws_onnx.pipeline.options import DEFAULT_ERROR_BUDGET, OptimizeOptions

    macs = {"target": "macs"}
    cases = [(macs, budgets.ErrorPlanner), ({"error_budget": 0.05, **macs}, budgets.ErrorPlanner),
             ({"mac_reduction": 2.0}, budgets.MacPlanner), ({"mismatch_budget": 0.1, **macs}, budgets.MismatchPlanner),
             ({"uniform_rank": 2}, budgets.UniformPlanner), ({}, LatencyPlanner), ({"target": "latency"}, LatencyPlanner),
             ({"latency_reduction": 1.5}, LatencyPlanner), ({"mismatch_budget": 0.1}, LatencyPlanner)]
    for options, planner in cases:  # target latency is the default, except with a budget only MACs can fill
        assert type(budgets.planner_for(OptimizeOptions(**options))) is planner, options
    assert budgets.planner_for(OptimizeOptions(**macs)).eps == DEFAULT_ERROR_BUDGET
    assert budgets.planner_for(OptimizeOptions(error_budget=0.05, **macs)).eps == 0.05
    assert budgets.planner_for(OptimizeOptions(mac_reduction=2.0, width_multiple=8)).width_multiple == 8
    assert budgets.planner_for(OptimizeOptions(uniform_rank=3)).rank == 3


def test_planners_set_ranks_on_the_candidates_and_report_the_budget():
    """Each planner fills in the candidates it is given and returns its budget: the error planner
    keeps every layer within eps, the uniform one gives every channel min(g, max rank) terms."""
    from builders import small_cnn

    from gdws_onnx.graph.convs import find_convs
    from gdws_onnx.pipeline import budgets
    from gdws_onnx.pipeline.candidates import Candidate

    model = small_cnn()
    sites = find_convs(model)[1:]

    def cands():
        return [Candidate(s, decompose.spectrum(s.weight, s.group), np.ones(s.in_channels)) for s in sites]

    error = cands()
    plan = budgets.ErrorPlanner(0.2).plan(error, sites, model)
    assert (plan.budget.mode, plan.budget.target, plan.latency) == ("error", 0.2, None)
    for c in error:
        energy = decompose.weighted_energy(c.spec, c.alpha)
        assert decompose.weighted_error(c.spec, c.ranks, c.alpha) <= 0.2 * energy * (1 + 1e-9)
    uniform = cands()
    plan = budgets.UniformPlanner(2).plan(uniform, sites, model)
    assert plan.budget.mode == "uniform" and all((c.ranks == min(2, c.spec.max_rank)).all() for c in uniform)
    unweighted = cands()
    with pytest.raises(GDWSError, match="mismatch_budget needs alphas for every rewritable conv"):
        budgets.MismatchPlanner(0.1).plan(unweighted, sites, model)
