"""Rank allocation: how many rank-1 terms g_c each input channel keeps (pure numpy).

Within a layer every kept term costs the same and its value (alpha_c s_ci^2) is
non-increasing in i, so greedy choices are exactly optimal per layer:
  LEGO  min G  s.t. e <= beta  -> drop the smallest scores while their sum stays <= beta;
  MEGO  min e  s.t. G <= budget -> keep the top-`budget` scores.
Across layers a term costs `term_cost` MACs (output pixels x (K + M/groups)); the network
budget is a knapsack that `allocate_macs` fills greedily by score / cost. `allocate_mismatch`
solves the reverse problem (fewest MACs with the summed score of dropped terms <= a budget).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _order(scores: np.ndarray, descending: bool) -> np.ndarray:
    """Flat indices of a (C, r) score array, ties broken so each channel stays a prefix."""
    c_idx, r_idx = np.indices(scores.shape)
    flat = scores.ravel()
    if descending:  # larger score first; on ties lower rank index first, then lower channel
        return np.lexsort((c_idx.ravel(), r_idx.ravel(), -flat))
    return np.lexsort((-c_idx.ravel(), -r_idx.ravel(), flat))


def _ranks_from_kept(kept: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape[0] * shape[1], dtype=bool)
    mask[kept] = True
    return mask.reshape(shape).sum(axis=1).astype(np.int64)


def lego(scores: np.ndarray, beta: float) -> np.ndarray:
    """Error-constrained minimum complexity: fewest terms with dropped score sum <= beta."""
    order = _order(scores, descending=False)
    dropped = np.cumsum(scores.ravel()[order]) <= beta
    n_drop = int(np.count_nonzero(dropped))  # cumsum is non-decreasing: dropped is a prefix
    return _ranks_from_kept(order[n_drop:], scores.shape)


def mego(scores: np.ndarray, budget: int) -> np.ndarray:
    """Complexity-constrained minimum error: keep the `budget` largest scores."""
    budget = max(0, min(int(budget), scores.size))
    return _ranks_from_kept(_order(scores, descending=True)[:budget], scores.shape)


def relative_lego(scores: np.ndarray, eps: float, dtype: np.dtype = np.float32) -> tuple[np.ndarray, float]:
    """LEGO at beta = eps * total score (at least the weight dtype's rounding noise, so eps = 0
    still drops numerically-zero terms); keeps at least one term. Returns (ranks, beta)."""
    floor = (8 * float(np.finfo(dtype).eps)) ** 2
    beta = max(eps, floor) * float(scores.sum())
    ranks = lego(scores, beta)
    return (mego(scores, 1) if ranks.sum() == 0 else ranks), beta


@dataclass(frozen=True)
class LayerCost:
    """What the network-level allocator needs to know about one rewritable layer."""

    scores: np.ndarray  # (C, r) alpha_c s_ci^2
    term_cost: float  # MACs of one kept term (pixels x (K + M/groups))
    original_cost: float  # MACs of the original conv


@dataclass(frozen=True)
class MacAllocation:
    """Result of `allocate_macs`: ranks per layer (None = keep the original conv)."""

    ranks: list[np.ndarray | None]
    total_cost: float
    feasible: bool


def gdws_cost(layer: LayerCost, ranks: np.ndarray) -> float:
    return float(ranks.sum()) * layer.term_cost


def allocate_macs(layers: list[LayerCost], budget: float) -> MacAllocation:
    """Greedy knapsack over all layers' terms by score / term cost, total cost <= budget.

    Each rewritten layer keeps at least its best term. A layer whose GDWS cost is not below
    its original cost is reverted to the original and the freed MACs go back to the others,
    until no layer changes. If even one term per layer does not fit, every layer gets one
    term and `feasible` is False.
    """
    active = [True] * len(layers)
    while True:
        ranks = _greedy_fill(layers, active, budget)
        feasible = ranks is not None
        if ranks is None:  # the minimum (one term per active layer) is over budget
            ranks = [_best_term(l.scores) if a else None for l, a in zip(layers, active)]
        changed = False
        for i, (layer, r) in enumerate(zip(layers, ranks)):
            if r is not None and gdws_cost(layer, r) >= layer.original_cost:
                active[i], ranks[i], changed = False, None, True
        if not changed:
            total = sum(gdws_cost(l, r) if r is not None else l.original_cost
                        for l, r in zip(layers, ranks))
            return MacAllocation(ranks=ranks, total_cost=total, feasible=feasible)


def _best_term(scores: np.ndarray) -> np.ndarray:
    return mego(scores, 1)


def _greedy_fill(layers: list[LayerCost], active: list[bool], budget: float
                 ) -> list[np.ndarray | None] | None:
    fixed = sum(l.original_cost for l, a in zip(layers, active) if not a)
    left = budget - fixed - sum(l.term_cost for l, a in zip(layers, active) if a)
    if left < 0:
        return None
    ids = [i for i, a in enumerate(active) if a]
    if not ids:
        return [None] * len(layers)
    # Every active layer keeps its best term; the rest compete by score per MAC.
    ratio, layer_of, flat_of = [], [], []
    for i in ids:
        l = layers[i]
        order = _order(l.scores, descending=True)[1:]
        ratio.append(l.scores.ravel()[order] / l.term_cost)
        layer_of.append(np.full(order.size, i))
        flat_of.append(order)
    ratio, layer_of, flat_of = map(np.concatenate, (ratio, layer_of, flat_of))
    costs = np.array([layers[i].term_cost for i in range(len(layers))])[layer_of]
    # Stable sort keeps each layer's own (prefix-preserving) order among equal ratios.
    order = np.argsort(-ratio, kind="stable")
    take = np.zeros(order.size, dtype=bool)
    for pos in order:  # a term that does not fit is skipped; cheaper ones may still fit
        if costs[pos] <= left:
            left -= costs[pos]
            take[pos] = True
    ranks: list[np.ndarray | None] = [None] * len(layers)
    for i in ids:
        sel = (layer_of == i) & take
        kept = np.concatenate([_order(layers[i].scores, True)[:1], flat_of[sel]])
        ranks[i] = _ranks_from_kept(kept, layers[i].scores.shape)
    return ranks


@dataclass(frozen=True)
class MismatchAllocation:
    """Result of `allocate_mismatch`: ranks per layer (None = keep the original conv)."""

    ranks: list[np.ndarray | None]
    predicted: float  # sum over rewritten layers of their dropped scores (<= the budget)
    total_cost: float


def _drop_hull(layer: LayerCost) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A layer's efficient options when dropping terms in ascending score order.

    Dropping the k smallest terms (k <= T - 1: the best term is always kept) gives error E_k
    (the sum of their scores) and cost (T - k) term_cost; the layer stays original (error 0,
    original cost) while that is not cheaper. Returns the vertices of the lower convex hull of
    these points after the original, as (k, E_k, error per MAC saved on the segment reaching
    it); the last is non-decreasing along the hull.
    """
    order = _order(layer.scores, descending=False)
    t = order.size
    err = np.concatenate([[0.0], np.cumsum(layer.scores.ravel()[order][:t - 1])])  # E_k, k = 0..T-1
    cost = (t - np.arange(t)) * float(layer.term_cost)
    ks = np.flatnonzero(cost < layer.original_cost)
    xs = np.concatenate([[0.0], err[ks]])
    ys = np.concatenate([[float(layer.original_cost)], cost[ks]])
    hull = [0]  # indices into xs/ys; 0 is the original conv
    for i in range(1, xs.size):
        while len(hull) >= 2:
            o, a = hull[-2], hull[-1]
            if (xs[a] - xs[o]) * (ys[i] - ys[o]) - (ys[a] - ys[o]) * (xs[i] - xs[o]) > 0:
                break  # a is strictly below the chord o-i
            hull.pop()
        hull.append(i)
    h = np.asarray(hull)
    ratio = np.maximum(np.diff(xs[h]), 0.0) / -np.diff(ys[h])
    return ks[h[1:] - 1], xs[h[1:]], np.maximum.accumulate(ratio) if ratio.size else ratio


def allocate_mismatch(layers: list[LayerCost], budget: float) -> MismatchAllocation:
    """Fewest MACs such that the summed score of all dropped terms (with alpha = noise gains:
    the predicted top-1 mismatch sum_l sum_c alpha_{l,c} e_{l,c}) stays <= budget.

    One global greedy: each layer's options are the vertices of the lower convex hull of
    (error, cost) over "drop its k cheapest terms" (`_drop_hull`; the first segment crosses the
    break-even where GDWS becomes cheaper than the original conv). All layers' hull segments
    are visited in order of error per MAC saved; a segment is taken when it fits in what is
    left of the budget, and once one of a layer's segments does not fit, that layer stops.
    Optimal on the convex envelope (the fractional relaxation), and the cost is non-increasing
    in the budget: at the first segment f that fits the larger budget only, everything the
    smaller budget takes after it saves at most (budget left) / ratio_f < the saving of f.
    """
    hulls = [_drop_hull(layer) for layer in layers]
    ratio = np.concatenate([h[2] for h in hulls]) if hulls else np.zeros(0)
    layer_of = np.concatenate([np.full(h[0].size, i) for i, h in enumerate(hulls)]) if hulls else np.zeros(0, int)
    vertex = np.concatenate([np.arange(h[0].size) for h in hulls]) if hulls else np.zeros(0, int)
    taken = [-1] * len(layers)  # last hull vertex taken per layer
    stopped = [False] * len(layers)
    used = 0.0
    for pos in np.argsort(ratio, kind="stable"):  # stable: each layer's segments stay in hull order
        i, v = int(layer_of[pos]), int(vertex[pos])
        if stopped[i]:
            continue
        errors = hulls[i][1]
        new = used - (errors[taken[i]] if taken[i] >= 0 else 0.0) + errors[v]
        if new <= budget:
            used, taken[i] = new, v
        else:
            stopped[i] = True
    ranks: list[np.ndarray | None] = [None] * len(layers)
    for i, v in enumerate(taken):
        if v >= 0:
            sc = layers[i].scores
            ranks[i] = _ranks_from_kept(_order(sc, descending=False)[int(hulls[i][0][v]):], sc.shape)
    total = sum(gdws_cost(l, r) if r is not None else l.original_cost for l, r in zip(layers, ranks))
    predicted = float(sum(hulls[i][1][v] for i, v in enumerate(taken) if v >= 0))
    return MismatchAllocation(ranks=ranks, predicted=predicted, total_cost=float(total))


def choose_options(options: list[list[tuple[float, float]]], required: float, bins: int = 400
                   ) -> tuple[list[int], bool]:
    """Multiple-choice knapsack: one (saving, error) option per layer, total saving >= `required`,
    minimum total error. Dynamic program over `bins` saving steps (savings rounded to the
    nearest step: the total may be short by at most half a step per layer).

    Returns (option index per layer, met). When `required` cannot be met, returns the choice
    with the largest saving. Option 0 of each layer is conventionally (0, 0): keep it as is.
    """
    if required <= 0 or not options:
        return [0] * len(options), True
    step = required / bins
    inf = float("inf")
    dp = [0.0] + [inf] * bins  # dp[s]: least error with saving min(steps, bins)
    trace = []
    for opts in options:
        steps = [max(int(round(saving / step)), 0) for saving, _ in opts]
        new, pick, prev = [inf] * (bins + 1), [0] * (bins + 1), [0] * (bins + 1)
        for s, base in enumerate(dp):
            if base == inf:
                continue
            for j, (_, error) in enumerate(opts):
                t = min(s + steps[j], bins)
                if base + error < new[t]:
                    new[t], pick[t], prev[t] = base + error, j, s
        trace.append((pick, prev))
        dp = new
    met = dp[bins] < inf
    state = bins if met else max(s for s, v in enumerate(dp) if v < inf)
    choice = [0] * len(options)
    for layer in range(len(options) - 1, -1, -1):
        pick, prev = trace[layer]
        choice[layer], state = pick[state], prev[state]
    return choice, met


def most_saving_within(options: list[list[tuple[float, float]]], budget: float, bins: int = 1000
                       ) -> list[int]:
    """Multiple-choice knapsack, the reverse of `choose_options`: one (saving, error) option per
    layer, total error <= `budget`, maximum total saving. Dynamic program over `bins` error steps;
    each error is rounded *up* to a step, so the choice never exceeds the budget (it may leave up
    to one step per layer unspent). Option 0 of each layer is conventionally (0, 0): keep it as is.
    Returns the option index per layer."""
    if not options:
        return []
    if budget <= 0:
        return [next((j for j, (_, e) in enumerate(opts) if e <= 0), 0) for opts in options]
    step = budget / bins
    neg = float("-inf")
    dp = [0.0] + [neg] * bins  # dp[e]: most saving with error exactly e steps
    trace = []
    for opts in options:
        steps = [int(np.ceil(error / step - 1e-9)) for _, error in opts]
        new, pick, prev = [neg] * (bins + 1), [0] * (bins + 1), [0] * (bins + 1)
        for e, base in enumerate(dp):
            if base == neg:
                continue
            for j, (saving, _) in enumerate(opts):
                t = e + steps[j]
                if t <= bins and base + saving > new[t]:
                    new[t], pick[t], prev[t] = base + saving, j, e
        trace.append((pick, prev))
        dp = new
    state = max(range(bins + 1), key=lambda e: (dp[e], -e))
    choice = [0] * len(options)
    for layer in range(len(options) - 1, -1, -1):
        pick, prev = trace[layer]
        choice[layer], state = pick[state], prev[state]
    return choice


def round_width(scores: np.ndarray, ranks: np.ndarray, group_of: np.ndarray, multiple: int,
                down: bool = False) -> np.ndarray:
    """Ranks whose GDWS width W = max over groups of sum g_c (every group is padded to W) is a
    multiple of `multiple`.

    up (default): W -> ceil(W / m) m, each group filled with its best remaining terms (the padding
    slots get real terms: less error, same realized shape; a group that runs out stays padded).
    down: W -> floor(W / m) m (up when that is 0), each group over it dropping its lowest-scored
    kept terms (fewer MACs: keeps a MAC budget met). scores (C, r) non-increasing per row."""
    ranks = np.asarray(ranks, dtype=np.int64).copy()
    groups = np.unique(group_of)
    width = max(int(ranks[group_of == j].sum()) for j in groups)
    if multiple <= 1 or width % multiple == 0:
        return ranks
    target = (width // multiple) * multiple if down else -(-width // multiple) * multiple
    if target == 0:
        target = multiple
    for j in groups:
        chans = np.flatnonzero(group_of == j)
        while ranks[chans].sum() < target:
            room = chans[ranks[chans] < scores.shape[1]]
            if room.size == 0:
                break
            best = room[np.argmax(scores[room, ranks[room]])]
            ranks[best] += 1
        while ranks[chans].sum() > target:
            kept = chans[ranks[chans] > 0]
            worst = kept[np.argmin(scores[kept, ranks[kept] - 1])]
            ranks[worst] -= 1
    return ranks

