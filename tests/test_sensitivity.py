"""Noise-gain alphas (`sensitivity`) against finite differences, eval semantics, the CLI, and the
`--mismatch-budget` allocation (monotone in the budget, predicted bound <= budget)."""

import itertools
import json
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from gdws_onnx.core import allocate, decompose
from gdws_onnx import optimize
from gdws_onnx.eval.attacks import AttackSettings
from gdws_onnx.cli import main
from gdws_onnx.eval.gradients import OrtClassifier, TorchReplica, TorchSource, cross_entropy
from gdws_onnx.pipeline.optimize import load_alphas
from gdws_onnx.alphas.noise_gain import noise_gain_alphas, pgd_inputs, save_alphas

from builders import TINY_CLASSES, tiny_inputs as _x, tiny_model

torch = pytest.importorskip("torch")

CLASSES = TINY_CLASSES


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: these nets are tiny, and a busy 2-core machine makes more much slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _fd_alphas(model: onnx.ModelProto, x: np.ndarray, layers: dict[str, tuple[str, int]], h: float = 1e-5,
               seed: int = 0) -> dict[str, np.ndarray]:
    """alpha_{l,c} from central differences of the float64 replica's margins: per block W_{l,c},
    a random orthonormal basis q_1..q_n of its directions gives ||g||^2 = sum_k (g . q_k)^2."""
    rng = np.random.default_rng(seed)
    rep = TorchReplica(model, dtype="float64")
    xt = torch.from_numpy(x).double()

    def margins():
        with torch.no_grad():
            z = rep(xt).numpy()
        return z[np.arange(len(x)), top][:, None] - z

    with torch.no_grad():
        top = rep(xt).numpy().argmax(1)
    d = margins()
    off = np.ones_like(d, bool)
    off[np.arange(len(x)), top] = False
    out = {}
    for conv, (wname, groups) in layers.items():
        base = rep.consts[wname].clone()
        m, cg = base.shape[:2]
        k = int(np.prod(base.shape[2:]))
        mg = m // groups
        n = mg * k
        alphas = np.zeros(groups * cg)
        for c in range(groups * cg):
            j, cl = divmod(c, cg)
            q, _ = np.linalg.qr(rng.standard_normal((n, n)))
            sq = np.zeros_like(d)
            for v in q.T:
                delta = torch.zeros_like(base)
                delta[j * mg:(j + 1) * mg, cl] = torch.from_numpy(v.reshape(mg, *base.shape[2:]))
                rep.consts[wname] = base + h * delta
                dp = margins()
                rep.consts[wname] = base - h * delta
                dm = margins()
                sq += ((dp - dm) / (2 * h)) ** 2
            rep.consts[wname] = base
            terms = np.where(off, sq / (2 * np.where(off, d, 1.0) ** 2 * n), 0.0)
            alphas[c] = terms.sum(1).mean()
        out[conv] = alphas
    return out


LAYERS = {"conv_a": ("wa", 1), "conv_b": ("wb", 2), "conv_c": ("wc", 1)}


def test_alphas_match_finite_differences_including_grouped_conv():
    model, x = tiny_model(0), _x(5)
    ref = _fd_alphas(model, x, LAYERS)
    got = noise_gain_alphas(model, x, batch_size=2, dtype="float64", min_margin=0.0, threads=1)
    assert [i.name for i in got.layers] == list(LAYERS)
    assert got.samples == 5 and got.classes == CLASSES and got.skipped_terms == 0
    for name in LAYERS:
        assert got.alphas[name].shape == ref[name].shape
        assert np.count_nonzero(ref[name] > 0) >= len(ref[name]) - 1  # a dead ReLU channel may give 0
        np.testing.assert_allclose(got.alphas[name], ref[name], rtol=1e-5, atol=1e-12)
    # float32 (the default) agrees with the float64 gradients
    f32 = noise_gain_alphas(model, x, dtype="float32", min_margin=0.0, threads=1)
    for name in LAYERS:
        np.testing.assert_allclose(f32.alphas[name], got.alphas[name], rtol=2e-3)


def test_grouped_channels_map_to_their_own_group_block():
    """Zeroing what follows group 1 of conv_b (its output rows 3..5 feed nothing) leaves
    conv_b's group-1 input channels (2, 3) with alpha exactly 0 and group 0's positive."""
    model = tiny_model(0)
    for t in model.graph.initializer:
        if t.name == "wc":
            wc = numpy_helper.to_array(t).copy()
            wc[:, 3:] = 0
            t.CopyFrom(numpy_helper.from_array(wc, "wc"))
    a = noise_gain_alphas(model, _x(8), dtype="float64", threads=1).alphas["conv_b"]
    assert np.all(a[:2] > 0) and np.all(a[2:] == 0)


def test_eval_semantics_independent_of_batch_composition():
    model, x = tiny_model(1), _x(9, seed=3)
    full = noise_gain_alphas(model, x, batch_size=9, dtype="float64", threads=1)
    for bs in (1, 4):
        other = noise_gain_alphas(model, x, batch_size=bs, dtype="float64", threads=1)
        for name in LAYERS:
            np.testing.assert_allclose(other.alphas[name], full.alphas[name], rtol=1e-10)
    perm = noise_gain_alphas(model, x[::-1].copy(), batch_size=4, dtype="float64", threads=1)
    head = noise_gain_alphas(model, x[:4], batch_size=4, dtype="float64", threads=1)
    tail = noise_gain_alphas(model, x[4:], batch_size=4, dtype="float64", threads=1)
    for name in LAYERS:
        np.testing.assert_allclose(perm.alphas[name], full.alphas[name], rtol=1e-10)
        np.testing.assert_allclose((4 * head.alphas[name] + 5 * tail.alphas[name]) / 9, full.alphas[name],
                                   rtol=1e-10)
    # the per-sample masses add up to the channel sums; the summary describes the alphas
    for name, row in zip(LAYERS, full.summary()):
        a = full.alphas[name]
        assert full.sample_mass[name].sum() == pytest.approx(a.sum() * 9, rel=1e-10)
        assert (row["name"], row["min"], row["max"]) == (name, a.min(), a.max())
        assert row["max_min_ratio"] == pytest.approx(a.max() / a.min()) and 1 / 9 <= row["top1pct_share"] <= 1


def test_constant_node_weight_and_margin_guard():
    x = _x(6)
    init = noise_gain_alphas(tiny_model(0), x, dtype="float64", threads=1)
    const = noise_gain_alphas(tiny_model(0, constant_wb=True), x, dtype="float64", threads=1)
    for name in LAYERS:
        np.testing.assert_allclose(const.alphas[name], init.alphas[name], rtol=1e-12)
    none = noise_gain_alphas(tiny_model(0), x, dtype="float64", min_margin=1e9, threads=1)
    assert none.skipped_terms == 6 * (CLASSES - 1)
    assert all(np.all(a == 0) for a in none.alphas.values())


def test_alphas_at_pgd_inputs_are_those_of_the_attacked_samples():
    model, x = tiny_model(2), _x(6, seed=5)
    settings = AttackSettings(name="pgd", eps=0.05, steps=3, seed=0)
    res = noise_gain_alphas(model, x, attack=settings, dtype="float64", threads=1)
    x_adv, info = pgd_inputs(model, x, None, settings)
    assert 0 < np.abs(x_adv - x).max() <= 0.05 + 1e-6 and info["max_perturbation"] <= 0.05 + 1e-6
    y = OrtClassifier(model)(x).argmax(1)
    src = TorchSource(model)
    assert cross_entropy(src.forward(x_adv), y).mean() > cross_entropy(src.forward(x), y).mean()
    direct = noise_gain_alphas(model, x_adv, dtype="float64", threads=1)
    clean = noise_gain_alphas(model, x, dtype="float64", threads=1)
    assert res.attack["labels"] == "model top-1" and 0 <= res.attack["accuracy_on_inputs"] <= 1
    for name in LAYERS:
        np.testing.assert_allclose(res.alphas[name], direct.alphas[name], rtol=1e-10)
    assert any(not np.allclose(res.alphas[n], clean.alphas[n]) for n in LAYERS)


def test_save_alphas_round_trips_through_load_alphas(tmp_path):
    res = noise_gain_alphas(tiny_model(0), _x(4), threads=1)
    res.alphas["/odd/name:0"] = np.arange(3.0)  # exported-PyTorch style names survive
    path = str(tmp_path / "a.npz")
    meta = save_alphas(res, path)
    back = load_alphas(path)
    assert set(back) == set(res.alphas)
    for k, v in res.alphas.items():
        np.testing.assert_array_equal(back[k], v)
    info = json.loads(open(meta).read())
    assert info["samples"] == 4 and [layer["name"] for layer in info["layers"]] == list(LAYERS)
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "a.npz.meta.json"]


# ----------------------------------------------------------------------------- --mismatch-budget

def _random_layers(rng, n):
    out = []
    for _ in range(n):
        c, m = int(rng.integers(2, 7)), int(rng.integers(2, 12))
        w = rng.standard_normal((m, c, 9)) * rng.random((1, c, 1))
        alpha = rng.random(c) * (rng.random(c) > 0.2)  # some channels cost nothing to drop
        px = float(rng.integers(4, 64))
        out.append(allocate.LayerCost(scores=decompose.scores(decompose.spectrum(w), alpha),
                                      term_cost=px * (9 + m), original_cost=px * m * c * 9))
    return out


@pytest.mark.parametrize("seed", range(8))
def test_mismatch_allocation_is_monotone_and_within_budget(seed):
    rng = np.random.default_rng(seed)
    layers = _random_layers(rng, int(rng.integers(1, 5)))
    total = sum(float(layer.scores.sum()) for layer in layers)
    prev = float("inf")
    for budget in np.linspace(0, 1.05 * total, 80)[1:]:
        res = allocate.allocate_mismatch(layers, budget)
        assert res.predicted <= budget
        dropped = 0.0
        for layer, r in zip(layers, res.ranks):
            if r is not None:
                assert 1 <= r.sum() and allocate.gdws_cost(layer, r) < layer.original_cost
                dropped += sum(float(layer.scores[c, g:].sum()) for c, g in enumerate(r))
        assert dropped == pytest.approx(res.predicted, rel=1e-9, abs=1e-12)
        assert res.total_cost <= prev + 1e-9
        prev = res.total_cost
    everything = allocate.allocate_mismatch(layers, 2 * total)
    assert all(r is not None and r.sum() == 1 for r in everything.ranks)  # one term kept per layer


def test_mismatch_allocation_is_near_optimal_on_small_cases():
    """Against brute force over every layer's options (original, or drop its k cheapest terms)."""
    rng = np.random.default_rng(100)
    ratios = []
    for _ in range(8):
        layers = _random_layers(rng, 2)
        options = []
        for layer in layers:
            asc = layer.scores.ravel()[allocate._order(layer.scores, descending=False)]
            t = asc.size
            options.append([(0.0, layer.original_cost)] + [
                (float(asc[:k].sum()), (t - k) * layer.term_cost) for k in range(t)
                if (t - k) * layer.term_cost < layer.original_cost])
        total = sum(float(layer.scores.sum()) for layer in layers)
        for budget in np.linspace(0, total, 12)[1:]:
            best = min(sum(c for _, c in choice) for choice in itertools.product(*options)
                       if sum(e for e, _ in choice) <= budget)
            ratios.append(allocate.allocate_mismatch(layers, budget).total_cost / best)
    ratios = np.asarray(ratios)
    assert ratios.min() >= 1 - 1e-12
    assert np.mean(ratios <= 1 + 1e-12) >= 0.8 and ratios.mean() <= 1.05


def _scaled_alphas(model, x):
    """Sensitivity alphas rescaled so that dropping every weight would predict 1 (the raw bound of
    these tiny nets is far above 1, which would leave nothing to allocate below P < 1)."""
    from gdws_onnx.graph.convs import find_convs

    res = noise_gain_alphas(model, x, threads=1)
    sites = {s.name: s for s in find_convs(model)}
    total = sum(decompose.weighted_energy(decompose.spectrum(sites[k].weight, sites[k].group), a)
                for k, a in res.alphas.items())
    return {k: a / total for k, a in res.alphas.items()}


def test_optimize_mismatch_budget_monotone_and_report_bound():
    model = tiny_model(0)
    alphas = _scaled_alphas(model, _x(32))
    prev, rewritten = None, 0
    for p in (0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.7, 0.95):
        _, rep = optimize(model, mismatch_budget=p, alphas=alphas, skip_first=False, verify=False, target="macs")
        assert rep.budget.mode == "mismatch" and rep.predicted_mismatch is not None
        assert rep.predicted_mismatch <= p * (1 + 1e-9)
        if prev is not None:
            assert rep.conv_macs_after <= prev
        prev = rep.conv_macs_after
        rewritten = max(rewritten, len(rep.rewritten))
        # the bound is what the rewritten layers' weighted errors add up to
        by_name = {layer.name: layer for layer in rep.rewritten}
        from gdws_onnx.graph.convs import find_convs
        recomputed = 0.0
        for s in find_convs(model):
            if s.name in by_name:
                spec = decompose.spectrum(s.weight, s.group)
                recomputed += by_name[s.name].relative_error * decompose.weighted_energy(spec, alphas[s.name])
        assert recomputed == pytest.approx(rep.predicted_mismatch, rel=1e-9, abs=1e-15)
    assert rewritten >= 1


def _invoke(runner, *args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def tiny_files(tmp_path):
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(0), model)
    data = tmp_path / "data.npz"
    x = _x(40)
    np.savez(data, x=x, y=OrtClassifier(tiny_model(0))(x).argmax(1))
    return model, data


def test_cli_sensitivity_writes_what_optimize_accepts(runner, tiny_files, tmp_path):
    model, data = tiny_files
    out = tmp_path / "alphas.npz"
    r = _invoke(runner, "sensitivity", model, "--data", data, "--n", 32, "--batch-size", 8, "--threads", 1,
                "-o", out)
    assert r.exit_code == 0, r.output
    assert "conv_b" in r.output and "wrote" in r.output
    with np.load(out) as z:
        assert sorted(z.files) == sorted(LAYERS) and z["conv_b"].shape == (4,)
    meta = json.loads((tmp_path / "alphas.npz.meta.json").read_text())
    assert meta["samples"] == 32 and meta["settings"]["data"] == str(data)
    o = tmp_path / "o.onnx"
    r = _invoke(runner, "optimize", model, "-o", o, "--alphas", out, "--error-budget", 0.2, "--no-skip-first")
    assert r.exit_code == 0, r.output
    assert "predicted top-1 mismatch" in r.output
    r = _invoke(runner, "optimize", model, "-o", o, "--alphas", out, "--mismatch-budget", 0.5,
                "--no-skip-first", "--data", data)
    assert r.exit_code == 0, r.output
    assert "budget 0.5" in r.output

    r = _invoke(runner, "sensitivity", model, "--data", data, "--n", 8, "--attack", "pgd", "--eps", 0.05,
                "--steps", 2, "--threads", 1, "-o", tmp_path / "adv.npz")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "adv.npz.meta.json").read_text())
    assert meta["attack"]["eps"] == 0.05 and meta["attack"]["labels"] == "given"


@pytest.mark.parametrize("case", ["no_model", "bad_data", "not_npz", "bad_shape", "bad_n", "no_folder"])
def test_cli_sensitivity_bad_input_exits_2_without_files(runner, tiny_files, tmp_path, case):
    model, data = tiny_files
    out = tmp_path / "a.npz"
    args = {"no_model": [tmp_path / "missing.onnx", "--data", data, "-o", out],
            "bad_data": [model, "--data", "cifar-17:test", "-o", out],
            "not_npz": [model, "--data", data, "-o", tmp_path / "a.json"],
            "bad_shape": [model, "--data", tmp_path / "small.npz", "-o", out],
            "bad_n": [model, "--data", data, "--n", 0, "-o", out],
            "no_folder": [model, "--data", data, "-o", tmp_path / "nope" / "a.npz"]}[case]
    np.savez(tmp_path / "small.npz", x=np.zeros((4, 3, 5, 5), np.float32))
    before = sorted(os.listdir(tmp_path))
    r = _invoke(runner, "sensitivity", *args)
    assert r.exit_code == 2, r.output
    assert r.output.count("error:") == 1
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("extra, message", [
    (["--mismatch-budget", 0.1], "needs --alphas"),
    (["--mismatch-budget", 0.1, "--error-budget", 0.1, "--alphas", "A"], "not several"),
    (["--mismatch-budget", 1.0, "--alphas", "A"], "(0, 1)"),
    (["--mismatch-budget", 0.0, "--alphas", "A"], "(0, 1)"),
    (["--mismatch-budget", 0.1, "--alphas", "PARTIAL", "--no-skip-first"], "alphas for every rewritable conv"),
])
def test_cli_mismatch_budget_errors(runner, tiny_files, tmp_path, extra, message):
    model, _ = tiny_files
    full = tmp_path / "a.json"
    full.write_text(json.dumps({k: [1.0] for k in LAYERS}))
    partial = tmp_path / "p.json"
    partial.write_text(json.dumps({"conv_b": [1.0]}))
    extra = [str(full) if e == "A" else str(partial) if e == "PARTIAL" else e for e in extra]
    r = _invoke(runner, "optimize", model, "-o", tmp_path / "o.onnx", *extra)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not (tmp_path / "o.onnx").exists()
