"""graph/fc.py: Kronecker and low-rank rewrites of Gemm/MatMul, checked in ONNX Runtime against the
original on a seeded fuzz corpus (transA, transB, alpha/beta, bias shapes and sources, batched MatMul,
Constant and Cast weights, float16/float64), truncated ranks against their predicted error, skip
reasons, and what the rewrite must leave alone (IR version, opsets, metadata, I/O names); then a
seeded corpus of one-layer models through `optimize(..., force=True)` at error_budget=0."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gdws_onnx import optimize
from gdws_onnx.cli.common import flag_of
from gdws_onnx.core import kronecker as K
from gdws_onnx.errors import OptionError, OptionText
from gdws_onnx.graph import fc
from gdws_onnx.graph.pattern import layer_of, role_of
from gdws_onnx.runtime.session import make_session

DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16),
          "float64": (np.float64, TensorProto.DOUBLE)}
TOL = {"float32": 5e-6, "float16": 5e-3, "float64": 1e-11}  # max |dy| / max(1, max |y|)
OPSET_IR = {11: 6, 13: 7, 17: 8, 19: 9}
BIAS_SHAPES = ("none", "scalar", "one", "n", "1n", "mn", "m1")
DIMS = (4, 6, 8, 9, 10, 12, 15, 16, 7)  # 7: a prime, where Kronecker shapes need the other dim


@dataclass
class FCCase:
    op: str
    n_in: int
    n_out: int
    lead: tuple[int, ...]  # leading dims of the input (Gemm: (M,))
    trans_b: bool = False
    trans_a: bool = False  # Gemm only: the input is stored [n_in, M]
    alpha: float | None = None  # None: attribute left out
    beta: float | None = None
    bias: str = "none"
    bias_source: str = "initializer"  # initializer | constant | input
    weight_source: str = "initializer"  # initializer | constant | cast
    dtype: str = "float32"
    opset: int = 17
    relu_after: bool = False
    dynamic: bool = False  # leading dims symbolic in the graph's input and output
    seed: int = 0

    @property
    def lead_dims(self) -> list[int | str]:
        return [f"d{i}" for i in range(len(self.lead))] if self.dynamic else list(self.lead)

    def input_dims(self, lead: list) -> list:
        """The input's dims for these leading dims: [*lead, n_in], or [n_in, M] with transA."""
        return [self.n_in, *lead] if self.trans_a else [*lead, self.n_in]


def random_case(rng: np.random.Generator, seed: int) -> FCCase:
    op = str(rng.choice(["Gemm", "MatMul"]))
    lead = (int(rng.integers(1, 6)),) if op == "Gemm" else \
        tuple(int(d) for d in rng.integers(1, 4, size=int(rng.choice([0, 1, 1, 2, 3]))))
    opset = int(rng.choice(list(OPSET_IR)))
    case = FCCase(
        op=op, n_in=int(rng.choice(DIMS)), n_out=int(rng.choice(DIMS)), lead=lead,
        trans_b=bool(rng.integers(2)) and op == "Gemm",
        alpha=None if op == "MatMul" or rng.random() < 0.4 else float(rng.choice([0.5, -1.7, 2.0])),
        beta=None if op == "MatMul" or rng.random() < 0.4 else float(rng.choice([0.3, -2.0, 0.0, 1.0])),
        bias=str(rng.choice(BIAS_SHAPES)) if op == "Gemm" else "none",
        bias_source=str(rng.choice(["initializer", "constant", "input"])),
        weight_source=str(rng.choice(["initializer", "initializer", "constant", "cast"])),
        dtype=str(rng.choice(["float32", "float32", "float16", "float64"])),
        opset=opset, relu_after=bool(rng.integers(2)), dynamic=bool(rng.random() < 0.3), seed=seed)
    case.trans_a = op == "Gemm" and bool(rng.random() < 0.35)  # drawn last: the other fields stay as they were
    return case


def _bias_shape(case: FCCase) -> list[int] | None:
    if case.bias == "none":
        return None
    m, n = case.lead[0], case.n_out
    return {"none": None, "scalar": [], "one": [1], "n": [n], "1n": [1, n], "mn": [m, n], "m1": [m, 1]}[case.bias]


def build(case: FCCase) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The case's one-layer model (with metadata to preserve) and a feed for it."""
    rng = np.random.default_rng(case.seed)
    npdt, elem = DTYPES[case.dtype]
    wshape = [case.n_out, case.n_in] if case.trans_b else [case.n_in, case.n_out]
    w = (rng.standard_normal(wshape) / np.sqrt(case.n_in)).astype(npdt)
    nodes, inits = [], []
    inputs = [helper.make_tensor_value_info("x", elem, case.input_dims(case.lead_dims))]
    feeds = {"x": rng.standard_normal(case.input_dims(list(case.lead))).astype(npdt)}
    if case.weight_source == "initializer":
        inits.append(numpy_helper.from_array(w, "W"))
    elif case.weight_source == "constant":
        nodes.append(helper.make_node("Constant", [], ["W"], name="w_const", value=numpy_helper.from_array(w, "W")))
    else:  # stored in another float type, cast at run time (a constant subgraph)
        other = np.float32 if npdt != np.float32 else np.float16
        inits.append(numpy_helper.from_array(w.astype(other), "W_stored"))
        nodes.append(helper.make_node("Cast", ["W_stored"], ["W"], name="w_cast", to=elem))
    fc_inputs = ["x", "W"]
    bshape = _bias_shape(case)
    if bshape is not None:
        c = rng.standard_normal(bshape).astype(npdt)
        if case.bias_source == "initializer":
            inits.append(numpy_helper.from_array(c, "C"))
        elif case.bias_source == "constant":
            nodes.append(helper.make_node("Constant", [], ["C"], name="c_const", value=numpy_helper.from_array(c, "C")))
        else:
            inputs.append(helper.make_tensor_value_info("C", elem, bshape))
            feeds["C"] = c
        fc_inputs.append("C")
    attrs = {}
    if case.op == "Gemm":
        attrs = {k: v for k, v in (("transA", int(case.trans_a)), ("transB", int(case.trans_b)),
                                   ("alpha", case.alpha), ("beta", case.beta))
                 if v is not None and (k not in ("transA", "transB") or v)}
    y = "h" if case.relu_after else "y"
    nodes.append(helper.make_node(case.op, fc_inputs, [y], name="fc", **attrs))
    if case.relu_after:
        nodes.append(helper.make_node("Relu", ["h"], ["y"], name="relu"))
    output = helper.make_tensor_value_info("y", elem, [*case.lead_dims, case.n_out])
    graph = helper.make_graph(nodes, "fc_case", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)],
                              producer_name="test_fc", doc_string="one FC layer")
    model.ir_version = OPSET_IR[case.opset]
    helper.set_model_props(model, {"case": str(case.seed), "owner": "tests"})
    return model, feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def full_rank_factors(site: fc.FCSite, scheme: str, rng: np.random.Generator) -> K.FCFactors:
    w = site.matrix()
    if scheme == "lowrank":
        return K.truncated_svd(w, min(w.shape))
    sh = K.kronecker_shapes(*w.shape)[int(rng.integers(len(K.kronecker_shapes(*w.shape))))]
    return K.nearest_kronecker(w, sh, sh.max_rank, order=str(rng.choice([K.A_FIRST, K.B_FIRST])))


def assert_preserved(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
    assert rewritten.ir_version == original.ir_version
    assert list(rewritten.opset_import) == list(original.opset_import)
    assert list(rewritten.metadata_props) == list(original.metadata_props)
    assert (rewritten.producer_name, rewritten.doc_string) == (original.producer_name, original.doc_string)
    assert list(rewritten.graph.input) == list(original.graph.input)
    assert list(rewritten.graph.output) == list(original.graph.output)


def assert_close(y: np.ndarray, ref: np.ndarray, dtype: str) -> None:
    assert y.shape == ref.shape and y.dtype == ref.dtype
    ref64, y64 = ref.astype(np.float64), y.astype(np.float64)
    err = np.abs(y64 - ref64).max() / max(1.0, np.abs(ref64).max())
    assert err <= TOL[dtype], f"max relative output error {err:.3g} > {TOL[dtype]}"


CASES = [random_case(np.random.default_rng(1000 + i), 1000 + i) for i in range(110)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.seed}-{c.op}-{c.dtype}")
def test_full_rank_rewrite_matches_onnx_runtime(case):
    """Both schemes at full rank reproduce the original model's output, leave IR version, opsets,
    metadata and I/O alone, drop the old weight, and name every new node <fc>/<scope>/<role>."""
    model, feeds = build(case)
    onnx.checker.check_model(model)
    ref = run(model, feeds)
    rng = np.random.default_rng(case.seed)
    for scheme in K.SCHEMES:
        rewritten = copy(model)
        (site,) = fc.find_fc_sites(rewritten)
        reason = fc.fc_skip_reason(site, scheme, min_weight=1)
        if scheme == "kronecker" and not K.kronecker_shapes(case.n_out, case.n_in):
            assert reason is not None and "no Kronecker factor shape" in reason
            continue
        assert reason is None
        result = fc.FCRewritePass([fc.FCPlan(site, full_rank_factors(site, scheme, rng))], min_weight=1).call(rewritten)
        assert result.modified and result.model is rewritten and not result.report.skipped
        onnx.checker.check_model(rewritten)
        assert_preserved(model, rewritten)
        assert_close(run(rewritten, feeds), ref, case.dtype)
        scope = "kron" if scheme == "kronecker" else "lowrank"
        new = [n for n in rewritten.graph.node if n.name not in ("relu", "c_const")]
        assert new and all(layer_of(n.name) == "fc" and role_of(n.name, scope) for n in new)
        assert not any(n.op_type in ("Gemm", "Einsum") for n in rewritten.graph.node)
        names = {t.name for t in rewritten.graph.initializer} | {o for n in rewritten.graph.node for o in n.output}
        assert not names & {"W", "W_stored"}, "the replaced weight (and its Cast) must be removed"
        assert len({n.name for n in rewritten.graph.node}) == len(rewritten.graph.node)


def test_corpus_covers_the_forms():
    seen = lambda f: {f(c) for c in CASES}  # noqa: E731
    assert seen(lambda c: c.op) == {"Gemm", "MatMul"}
    assert seen(lambda c: c.bias) == set(BIAS_SHAPES)
    assert seen(lambda c: (c.op, c.trans_a, c.trans_b)) >= {("Gemm", a, b) for a in (False, True) for b in (False, True)}
    assert seen(lambda c: (c.trans_a, c.dynamic)) >= {(True, True), (True, False)}
    assert seen(lambda c: c.dtype) == set(DTYPES)
    assert seen(lambda c: c.weight_source) == {"initializer", "constant", "cast"}
    assert seen(lambda c: c.bias_source if c.bias != "none" else None) >= {"initializer", "constant", "input"}
    assert {len(c.lead) for c in CASES if c.op == "MatMul"} == {0, 1, 2, 3}
    assert {(c.dynamic, len(c.lead) > 1) for c in CASES} == {(False, False), (False, True), (True, False), (True, True)}
    assert {c.alpha for c in CASES} >= {None, 0.5, -1.7} and {c.beta for c in CASES} >= {None, 0.0, 0.3}


@pytest.mark.parametrize("scheme", K.SCHEMES)
def test_truncated_ranks_obey_the_predicted_error(scheme):
    """Below full rank the relative weight error is the SVD tail; the rewritten model computes exactly
    x W_R^T (+ bias), so its output error is x (W - W_R)^T, and over Gaussian inputs its relative mean
    square is the predicted error (to sampling noise)."""
    case = FCCase(op="Gemm", n_in=24, n_out=20, lead=(4000,), trans_b=True, alpha=0.5, beta=2.0, bias="n",
                  dtype="float64", seed=7)
    model, feeds = build(case)
    ref = run(model, feeds)
    (site,) = fc.find_fc_sites(model)
    w, x = site.matrix(), feeds["x"]
    errors = []
    for rank in (1, 3, 7):
        f = K.truncated_svd(w, rank) if scheme == "lowrank" else \
            K.nearest_kronecker(w, K.KroneckerShape(4, 6, 5, 4), rank)
        delta = f.matrix() - w
        assert f.error == pytest.approx((delta**2).sum() / (w**2).sum(), rel=1e-9)
        rewritten = copy(model)
        (s,) = fc.find_fc_sites(rewritten)
        fc.FCRewritePass([fc.FCPlan(s, f)], min_weight=1).call(rewritten)
        y = run(rewritten, feeds)
        np.testing.assert_allclose(y - ref, x @ delta.T, atol=1e-10)
        measured = ((y - ref) ** 2).sum() / ((x @ w.T) ** 2).sum()
        assert measured == pytest.approx(f.error, rel=0.15)
        errors.append(f.error)
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]


@pytest.mark.parametrize("scheme", K.SCHEMES)
def test_rewrite_fc_meets_its_budgets_and_reports(scheme):
    """rewrite_fc at an error budget and at a MAC budget: the layer's predicted error is within the error
    budget (its MACs within the MAC budget), it is cheaper than dense, its output error is of the size
    the predicted error says, and the report names the error-per-MAC winner."""
    rng = np.random.default_rng(11)
    planted = np.kron(rng.standard_normal((4, 8)), rng.standard_normal((8, 4)))
    structured = planted + 0.05 * rng.standard_normal((32, 32))
    for kwargs in ({"error_budget": 0.05}, {"mac_reduction": 3.0}):
        case = FCCase(op="MatMul", n_in=32, n_out=32, lead=(2, 5), seed=3)
        model, feeds = build(case)
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(structured.T.astype(np.float32), "W"))
        ref = run(model, feeds)
        rewritten = copy(model)
        result = fc.rewrite_fc(rewritten, scheme, min_weight=256, **kwargs)
        assert result.modified and not result.report.skipped
        (row,) = result.report.layers
        assert row.scheme == scheme and row.name == "fc" and row.dense_macs == 1024 and row.macs < 1024
        if "error_budget" in kwargs:
            assert row.error <= 0.05
        else:
            assert row.macs <= 1024 / 3
        assert row.winner == "kronecker"  # the planted 4x8 (x) 8x4 structure: rank 1 beats any low rank
        err = np.abs(run(rewritten, feeds) - ref).max() / np.abs(ref).max()
        assert err < 3 * np.sqrt(row.error) + 1e-5
        assert_preserved(model, rewritten)


def test_error_budget_zero_is_exact_through_rewrite_fc():
    for seed in range(5):
        case = FCCase(op="MatMul", n_in=12, n_out=8, lead=(3, 2), seed=seed)
        model, feeds = build(case)
        for scheme in K.SCHEMES:
            rewritten = copy(model)
            result = fc.rewrite_fc(rewritten, scheme, error_budget=0.0, min_weight=1, only_if_cheaper=False)
            assert result.modified
            assert_close(run(rewritten, feeds), run(model, feeds), "float32")


def _skip_model(kind: str) -> onnx.ModelProto:
    f32 = TensorProto.FLOAT
    w = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)  # full rank
    inits, inputs = [numpy_helper.from_array(w, "W")], \
        [helper.make_tensor_value_info("x", f32, [2, 8])]
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")
    if kind == "dynamic":
        inits, inputs = [], inputs + [helper.make_tensor_value_info("W", f32, [8, 6])]
    elif kind == "3d":
        inits = [numpy_helper.from_array(np.ones((3, 8, 6), np.float32), "W")]
    elif kind == "int":
        inits = [numpy_helper.from_array(np.ones((8, 6), np.int32), "W")]
        inputs = [helper.make_tensor_value_info("x", TensorProto.INT32, [2, 8])]
    elif kind == "rank":
        inputs = [helper.make_tensor_value_info("x", f32, None)]
    elif kind == "prime":
        inits = [numpy_helper.from_array(np.ones((7, 13), np.float32), "W")]
        inputs = [helper.make_tensor_value_info("x", f32, [2, 7])]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", f32, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kind,scheme,min_weight,expected", [
    ("dynamic", "lowrank", 1, "computed at run time"),
    ("3d", "lowrank", 1, "only a 2-D weight"),
    ("int", "lowrank", 1, "not float16, float32 or float64"),
    ("rank", "lowrank", 1, "rank is unknown"),
    ("plain", "lowrank", 49, "fewer than min_weight=49"),
    ("prime", "kronecker", 1, "no Kronecker factor shape"),
    ("plain", "lowrank", 1, "costs"),  # at the default budget no rank of a 8 x 6 weight is cheaper
])
def test_skip_reasons(kind, scheme, min_weight, expected):
    model = _skip_model(kind)
    before = model.SerializeToString()
    result = fc.rewrite_fc(model, scheme, min_weight=min_weight)
    assert not result.modified and result.model.SerializeToString() == before
    ((name, reason),) = result.report.skipped
    assert name == "fc" and expected in reason, reason
    (site,) = fc.find_fc_sites(model)
    if expected != "costs":
        assert fc.FCRewritePass([], min_weight).check(site) == "no plan for this layer"
        assert expected in fc.fc_skip_reason(site, scheme, min_weight)


def test_min_weight_reason_says_force_overrides_it():
    """The min_weight skip reason names force as an option (`force=True` in Python, `--force` in the CLI)."""
    (site,) = fc.find_fc_sites(_skip_model("plain"))
    reason = fc.fc_skip_reason(site, "lowrank")
    assert isinstance(reason, OptionText) and reason.params == ("force=True",)
    assert "fewer than min_weight=1024" in reason and "force=True overrides it" in reason
    assert "--force overrides it" in reason.render(flag_of)
    assert fc.fc_skip_reason(site, "lowrank", min_weight=0) is None


def test_fc_layer_model_takes_a_transposed_input():
    """A Gemm with transA=1 is modelled (for timing) at its [n_in, M] input; its factored form agrees."""
    case = FCCase(op="Gemm", n_in=12, n_out=8, lead=(3,), trans_a=True, trans_b=True, alpha=0.5, beta=2.0,
                  bias="n", seed=4)
    (site,) = fc.find_fc_sites(build(case)[0])
    assert (site.feature_axis, site.batch_axis, site.in_features) == (0, -1, 12)
    x = {"x": np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32)}
    dense = fc.fc_layer_model(site, [12, 5])
    factored = fc.fc_layer_model(site, [12, 5], K.truncated_svd(site.matrix(), 8))
    assert factored.graph.node[0].op_type == "Transpose"
    assert_close(run(factored, x), run(dense, x), "float32")
    with pytest.raises(ValueError, match="12 features"):
        fc.fc_layer_model(site, [5, 12])


def test_pass_check_rejects_a_plan_for_another_weight_or_model():
    model = _skip_model("plain")
    (site,) = fc.find_fc_sites(model)
    wrong = K.truncated_svd(np.ones((5, 8)), 1)
    p = fc.FCRewritePass([fc.FCPlan(site, wrong)], min_weight=1)
    assert "5 x 8" in p.check(site)
    other = _skip_model("plain")
    other.graph.node[0].name = "renamed"
    result = fc.FCRewritePass([fc.FCPlan(site, K.truncated_svd(site.matrix(), 2))], min_weight=1).call(other)
    assert not result.modified and "another" in result.report.skipped[0][1]


def test_names_avoid_collisions_and_are_deterministic():
    """A graph that already uses the names the rewrite would pick gets fresh ones, the model stays
    valid and exact, and rewriting twice gives the same bytes."""
    case = FCCase(op="MatMul", n_in=12, n_out=8, lead=(3,), seed=5)
    model, feeds = build(case)
    taken = ["fc/kron/reshape_in", "fc/kron/a_weight", "fc/kron/b_out"]
    g = model.graph
    g.node.extend(helper.make_node("Identity", ["x"], [t], name=t) for t in taken[:2])
    g.node.append(helper.make_node("Identity", ["x"], ["fc/kron/b_out"], name="ident"))
    g.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, [3, 12]) for t in taken)
    ref = run(model, feeds)
    outs = []
    for _ in range(2):
        rewritten = copy(model)
        (site,) = fc.find_fc_sites(rewritten)
        f = K.nearest_kronecker(site.matrix(), K.KroneckerShape(2, 3, 4, 4), 6)
        fc.FCRewritePass([fc.FCPlan(site, f)], min_weight=1).call(rewritten)
        onnx.checker.check_model(rewritten)
        assert_close(run(rewritten, feeds), ref, "float32")
        outs.append(rewritten.SerializeToString())
    assert outs[0] == outs[1]
    new = [n.name for n in onnx.load_from_string(outs[0]).graph.node if layer_of(n.name) == "fc" and "/kron/" in n.name]
    assert "fc/kron/reshape_in_1" in new and len(set(new)) == len(new)


def test_bad_scheme_and_budgets_are_option_errors():
    model = _skip_model("plain")
    with pytest.raises(OptionError, match="scheme"):
        fc.rewrite_fc(model, "svd")
    with pytest.raises(OptionError, match="error_budget"):
        fc.rewrite_fc(model, "lowrank", error_budget=0.1, mac_reduction=2.0)


# ------------------------------------------------------------ optimize(force=True) on one-layer models

SMALL_DIMS = (4, 5, 6, 7, 8, 11, 12, 16, 20)  # every weight under fc.MIN_WEIGHT elements; two primes: no Kronecker shape
LARGE_DIMS = (32, 40, 48, 64)  # every weight at least fc.MIN_WEIGHT elements


def optimize_case(seed: int) -> FCCase:
    """A float32 Gemm (transA/transB, alpha/beta, bias C) or MatMul (2-D weight, input of rank 1 to 3)
    with a small or a large weight."""
    rng = np.random.default_rng(seed)
    gemm = bool(rng.random() < 0.65)
    dims = LARGE_DIMS if rng.integers(2) else SMALL_DIMS
    n_in, n_out = int(rng.choice(dims)), int(rng.choice(dims))
    lead = (int(rng.integers(1, 6)),) if gemm else tuple(int(d) for d in rng.integers(1, 4, size=int(rng.integers(3))))
    trans_a, trans_b = gemm and bool(rng.integers(2)), gemm and bool(rng.integers(2))
    alpha = float(rng.choice([0.5, -1.7, 2.0])) if gemm and rng.random() < 0.5 else None
    beta = float(rng.choice([0.3, -2.0, 0.0])) if gemm and rng.random() < 0.5 else None
    bias = str(rng.choice(["none", "n", "1n", "mn", "scalar"])) if gemm else "none"
    return FCCase(op="Gemm" if gemm else "MatMul", n_in=n_in, n_out=n_out, lead=lead, trans_a=trans_a,
                  trans_b=trans_b, alpha=alpha, beta=beta, bias=bias,
                  weight_source=str(rng.choice(["initializer", "constant"])), seed=seed)


OPTIMIZE_CASES = [optimize_case(2000 + i) for i in range(30)]


def test_optimize_corpus_covers_the_forms():
    seen = lambda f: {f(c) for c in OPTIMIZE_CASES}  # noqa: E731
    assert seen(lambda c: (c.op, c.trans_a, c.trans_b)) >= {("Gemm", a, b) for a in (False, True) for b in (False, True)}
    assert seen(lambda c: c.op) == {"Gemm", "MatMul"}
    assert seen(lambda c: c.n_in * c.n_out >= fc.MIN_WEIGHT) == {False, True}
    assert seen(lambda c: (c.op, c.n_in * c.n_out >= fc.MIN_WEIGHT)) == {(o, b) for o in ("Gemm", "MatMul")
                                                                          for b in (False, True)}
    assert seen(lambda c: c.alpha not in (None, 1.0)) == {False, True}
    assert seen(lambda c: c.beta not in (None, 1.0) and c.bias != "none") == {False, True}
    assert seen(lambda c: c.bias != "none") == {False, True}
    assert {len(c.lead) for c in OPTIMIZE_CASES if c.op == "MatMul"} >= {0, 1, 2}
    assert seen(lambda c: bool(K.kronecker_shapes(c.n_out, c.n_in))) == {False, True}


@pytest.mark.parametrize("case", OPTIMIZE_CASES,
                         ids=lambda c: f"{c.seed}-{c.op}{'-tA' if c.trans_a else ''}{'-tB' if c.trans_b else ''}"
                                       f"-{c.n_out}x{c.n_in}")
def test_optimize_force_rewrites_every_fc_layer_exactly(case):
    """force=True rewrites every layer, under min_weight too, by low rank and (where the weight has a
    Kronecker factor shape) Kronecker; at error_budget=0 the output matches the original in ONNX Runtime."""
    model, feeds = build(case)
    ref = make_session(model).run(None, feeds)[0]
    schemes = ["lowrank"] + (["kronecker"] if K.kronecker_shapes(case.n_out, case.n_in) else [])
    for scheme in schemes:
        out, report = optimize(model, fc=scheme, error_budget=0.0, force=True, verify=False, target="macs")
        assert report.fc.skipped == [], report.fc.skipped
        assert [(layer.name, layer.scheme) for layer in report.fc.layers] == [("fc", scheme)]
        scope = fc.KRON_SCOPE if scheme == "kronecker" else fc.LOWRANK_SCOPE
        assert all(layer_of(n.name) == "fc" and role_of(n.name, scope) for n in out.graph.node
                   if n.name not in ("w_const", "c_const"))
        assert not any(n.op_type == "Gemm" for n in out.graph.node)
        assert any(n.op_type == "Transpose" and role_of(n.name, scope) == "transpose_in"
                   for n in out.graph.node) == case.trans_a
        y = make_session(out).run(None, feeds)[0]
        assert y.shape == ref.shape
        err = np.abs(y.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12)
        assert err <= 1e-4, f"{scheme}: max relative output error {err:.3g}"
