"""conv="auto": the factorization families behind one interface (exact at full rank on the fuzz
corpus), the knapsack across families, the never-slower check, refusals and the report. Timing
is injected (fake probes through the real adaptive loop): no timed tests."""

import json

import numpy as np
import onnx
import pytest
from builders import conv_model, random_case, small_cnn

from gdws_onnx import optimize
from gdws_onnx.core.allocate import most_saving_within
from gdws_onnx.errors import OptionError
from gdws_onnx.graph.convs import find_convs
from gdws_onnx.graph.rewrite import replace_convs
from gdws_onnx.pipeline.auto import ladder, prune
from gdws_onnx.pipeline.families import FAMILIES, Form, families
from gdws_onnx.runtime import bench
from gdws_onnx.runtime.bench import Ratio
from gdws_onnx.runtime.session import make_session

N_CASES = 120


@pytest.mark.parametrize("seed", range(N_CASES))
def test_every_family_is_exact_at_full_rank(seed):
    """At error 0 each family that can realize a corpus conv reproduces it in ONNX Runtime."""
    rng = np.random.default_rng(5000 + seed)
    case = random_case(rng, seed)
    model = conv_model(case)
    (site,) = find_convs(model)
    x = rng.random((2, case.in_channels, *case.spatial)).astype(np.float16 if case.fp16 else np.float32)
    ref = make_session(model).run(None, {"x": x})[0].astype(np.float64)
    realized = 0
    for name, fam in families().items():
        if fam.skip_reason(site):
            continue
        (form,) = fam.forms(site, [0.0], cheaper_only=False)[:1]
        assert form.error <= (1e-3 if case.fp16 else 1e-5), form  # terms below the dtype's precision may go
        m = onnx.ModelProto.FromString(model.SerializeToString())
        (local,) = find_convs(m)
        replace_convs(m, [local], lambda s, names: fam.subgraph(s, form, names))
        onnx.checker.check_model(m, full_check=True)
        new = make_session(m).run(None, {"x": x})[0].astype(np.float64)
        rel = np.linalg.norm(new - ref) / max(np.linalg.norm(ref), 1e-30)
        assert rel <= (1e-2 if case.fp16 else 1e-4), (name, case, rel)
        realized += 1
    assert realized >= 1 or find_convs(model)[0].kernel_size == 1


def test_the_corpus_reaches_every_family():
    reach = {name: 0 for name in FAMILIES}
    for seed in range(N_CASES):
        case = random_case(np.random.default_rng(5000 + seed), seed)
        (site,) = find_convs(conv_model(case))
        for name, fam in families().items():
            reach[name] += fam.skip_reason(site) is None
    assert all(n >= 10 for n in reach.values()), reach


def test_most_saving_within_the_error_budget():
    table = [[(0, 0), (5, 0.5), (8, 1.0)], [(0, 0), (4, 0.3), (6, 0.9)]]
    assert most_saving_within(table, 1.0) == [1, 1]  # 9 at 0.8 beats 8 at 1.0
    assert most_saving_within(table, 0.6) == [1, 0]  # 5 at 0.5 beats 4 at 0.3
    assert most_saving_within(table, 0.0) == [0, 0]
    rng = np.random.default_rng(0)
    for _ in range(30):  # against brute force: never over the budget, never less saving
        t = [[(0.0, 0.0)] + [(float(rng.random()), float(rng.random())) for _ in range(3)] for _ in range(3)]
        b = float(rng.random()) * 1.5
        pick = most_saving_within(t, b)
        assert sum(t[i][j][1] for i, j in enumerate(pick)) <= b + 1e-12
        best = max(sum(t[i][j][0] for i, j in enumerate(c)) for c in np.ndindex(4, 4, 4)
                   if sum(t[i][j][1] for i, j in enumerate(c)) <= b - 3 * b / 1000)
        assert sum(t[i][j][0] for i, j in enumerate(pick)) >= best - 1e-9


def test_pruning_keeps_only_forms_that_can_win():
    f = lambda fam, err, macs: Form(fam, 1, "x", err, macs, 0)  # noqa: E731
    kept = prune([f("gdws", 0.1, 900), f("ssvd", 0.1, 300), f("ssvd", 0.05, 500), f("gdws", 0.2, 1200)], 1000)
    assert [(k.family, k.error) for k in kept] == [("ssvd", 0.1), ("ssvd", 0.05)]
    assert ladder(0.1) == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert ladder(0.8)[-1] == 0.5  # MAX_LAYER_ERROR caps every layer


def _fake(base: float, cand: float, threshold, seed: int) -> Ratio:
    rng = np.random.default_rng(seed)
    cost = [base, cand]
    return bench.compare_until([lambda: 0, lambda: 1], threshold, bench.BenchConfig(runs=20, warmup=0),
                               bench.Rounds(max_rounds=320, max_seconds=1e9),
                               timer=lambda fn: cost[fn()] * float(np.exp(rng.normal(0, 0.02))))


def _weights(model: onnx.ModelProto) -> float:
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return sum(sizes.get(n.input[1], 0) for n in model.graph.node if n.op_type == "Conv")


class FamilyProbe:
    """Latency = conv weight elements x a price per family (by node names), plus 100; a whole
    model with any node of a `slow` family measures 1.5x slower than the original."""

    def __init__(self, kind, price=None, slow=()):
        self.kind, self.price, self.slow, self.calls = kind, price or {}, set(slow), 0

    def compare(self, baseline, candidate, threshold=None):
        self.calls += 1
        fams = {fam for n in candidate.graph.node for fam in FAMILIES if f"/{fam}/" in n.name}
        b = _weights(baseline) + 100.0
        c = _weights(candidate) * max([self.price.get(f, 1.0) for f in fams] or [1.0]) + 100.0
        if self.kind == "model" and fams & self.slow:
            c = 1.5 * b
        return _fake(b, c, threshold, self.calls)


def _auto(model, price, slow=(), **kw):
    return optimize(model, target="latency", cache="", verify=False,
                    probe_factory=lambda b, kind: FamilyProbe(kind, price, slow), **kw)


def _families_used(model):
    return {fam for n in model.graph.node for fam in FAMILIES if f"/{fam}/" in n.name}


def test_auto_picks_the_family_that_measures_faster_per_layer():
    model = small_cnn(channels=(16, 32, 32, 32), size=8)
    reports = []
    for fast in FAMILIES:  # the family priced cheapest wins every layer it can realize
        out, report = _auto(model, {f: 0.3 if f == fast else 3.0 for f in FAMILIES}, error_budget=0.2)
        assert _families_used(out) == {fast}, fast
        reports.append(report)
    for rep in reports:
        rewritten = rep.rewritten
        assert rewritten and all(layer.family in FAMILIES and layer.measured_ratio for layer in rewritten)
        assert all(layer.relative_error <= 0.2 for layer in rewritten)  # the per-layer budget, every family
        assert rep.budget.achieved == max(layer.relative_error for layer in rewritten)
        d = json.loads(rep.to_json())
        assert d["summary"]["rewritten"] == len(rewritten) and d["layers"][1]["family"] in FAMILIES
        assert sum(d["summary"]["families"].values()) == len(rewritten)
        from gdws_onnx.cli.render import family_lines

        (line,) = family_lines(rep)
        assert line.startswith("families: ") and line.endswith(f"{len(rep.layers) - len(rewritten)} dense")
        assert all("families_skipped" in v for v in d["latency"]["layers"].values())


def test_auto_restricted_to_one_family_and_the_never_slower_check():
    model = small_cnn(channels=(16, 32, 32, 32), size=8)
    out, _ = _auto(model, {f: 0.3 for f in FAMILIES}, conv="ssvd", error_budget=0.2)
    assert _families_used(out) == {"ssvd"}
    out, report = _auto(model, {f: 0.3 for f in FAMILIES}, slow=tuple(FAMILIES), error_budget=0.2)
    assert _families_used(out) == set() and not report.rewritten  # every step slower: the original
    assert all(layer.reason for layer in report.layers)
    assert "reverted" in report.layers[1].reason


def test_auto_is_the_default_under_target_latency_unless_a_gdws_option_is_given():
    from gdws_onnx.pipeline.options import OptimizeOptions

    assert OptimizeOptions(target="latency").selection.conv == "auto"
    assert OptimizeOptions().selection.conv == "auto"  # target latency is the default
    assert OptimizeOptions(target="macs").selection.conv == "gdws"
    assert OptimizeOptions(mac_reduction=2).budget.target == "macs"  # a budget only MACs fill
    assert OptimizeOptions(target="latency", width_multiple=8).selection.conv == "gdws"
    assert OptimizeOptions(target="latency", latency_table="t.json").selection.conv == "auto"  # profile --conv auto


@pytest.mark.parametrize("options,names", [
    ({"conv": "auto", "target": "macs"}, ("conv=auto", "target")),
    ({"conv": "auto", "target": "latency", "alphas": {"conv1": [1.0]}}, ("conv=auto", "alphas")),
    ({"conv": "ssvd", "target": "latency", "width_multiple": 8}, ("conv=ssvd", "width_multiple")),
    # a conflict is reported before a missing companion of one of its sides (mismatch_budget needs alphas)
    ({"conv": "ssvd", "mismatch_budget": 0.01}, ("conv=ssvd", "mismatch_budget")),
])
def test_refusals_name_the_conflict(options, names):
    with pytest.raises(OptionError) as e:
        optimize(small_cnn(), verify=False, **options)
    assert all(n in e.value.params for n in names), (e.value.params, names)


def test_auto_composes_with_the_fc_rewrite():
    """conv="auto" then the FC pass under target="latency": each timed by its own planner."""
    model = small_cnn(channels=(16, 32, 32, 32), size=8)
    out, report = _auto(model, {f: 0.3 for f in FAMILIES}, fc="lowrank", error_budget=0.2)
    assert report.rewritten and report.fc is not None and report.fc.latency is not None
    assert _families_used(out)


def test_every_layer_may_take_a_form_at_the_cap():
    """The knapsack's error steps divide the per-layer cap: twelve layers each at exactly the budget
    all fit (with 1000 plain steps, 12 x ceil(83.3) > 1000 shut one out)."""
    from gdws_onnx.pipeline.auto import Choice, Measured, allocate_forms

    ratio = {"median": 0.5, "p10": 0.5, "p90": 0.5, "baseline_ms": 1.0, "candidate_ms": 0.5,
             "ci_low": 0.45, "ci_high": 0.55, "rounds": 20, "confidence": 0.95}
    choices = [Choice(site=None, measured=[Measured(Form("ssvd", 1, "kx1+1xk", 0.15, 1, 1), {1: ratio})])
               for _ in range(12)]
    allocate_forms(choices, 0.15)
    assert all(c.picked is not None for c in choices)


def _measured_at(error: float, high: float):
    from gdws_onnx.pipeline.auto import Measured

    ratio = {"median": high - 0.05, "p10": high - 0.1, "p90": high, "baseline_ms": 1.0, "candidate_ms": high - 0.05,
             "ci_low": high - 0.1, "ci_high": high, "rounds": 20, "confidence": 0.95}
    return Measured(Form("ssvd", 1, "kx1+1xk", error, 1, 1), {1: ratio})


def test_the_payoff_rule_spends_error_only_where_it_buys_speed():
    """A form at error e is used only if its layer ratio's upper bound is <= 1 - payoff x e: the
    narrow zoo models' forms (0.65-0.95 of their layer at 0.1-0.15) stay dense, wide layers' do not."""
    from gdws_onnx.pipeline.auto import Choice, allocate_forms

    assert _measured_at(0.15, 0.40).pays(4) and not _measured_at(0.15, 0.41).pays(4)
    assert _measured_at(0.15, 0.90).pays(0)  # payoff 0: any measurably faster form
    narrow = Choice(site=None, measured=[_measured_at(0.15, 0.70), _measured_at(0.1, 0.75)])
    wide = Choice(site=None, measured=[_measured_at(0.05, 0.55), _measured_at(0.15, 0.30)])
    cheap = Choice(site=None, measured=[_measured_at(0.05, 0.70), _measured_at(0.15, 0.65)])
    allocate_forms([narrow, wide, cheap], 0.15, payoff=4)
    assert narrow.picked is None and "pays for its error" in narrow.reason and "<= 0.60" in narrow.reason  # its nearest miss
    assert wide.picked.form.error == 0.15  # the faster of its two paying forms
    assert cheap.picked.form.error == 0.05  # 0.70 <= 1 - 4 x 0.05; 0.65 > 1 - 4 x 0.15
    allocate_forms([narrow], 0.15, payoff=0)
    assert narrow.picked is not None


@pytest.mark.parametrize("options,names", [
    ({"payoff": 4.0, "target": "macs"}, ("payoff", "target")),  # the MAC planner does not time layers
    ({"payoff": 4.0, "target": "latency", "conv": "gdws"}, ("payoff", "target")),
    ({"payoff": -1.0, "target": "latency"}, ("payoff",)),
])
def test_payoff_belongs_to_the_auto_planner(options, names):
    with pytest.raises(OptionError) as e:
        optimize(small_cnn(), verify=False, **options)
    assert all(n in e.value.params for n in names), (e.value.params, names)
