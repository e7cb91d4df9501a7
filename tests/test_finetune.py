"""`finetune` (issue 28): robust fine-tuning of a graph's own initializers through the torch replica."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from builders import annotated_cnn, assert_model_info_kept, small_cnn
from gdws_onnx.errors import GDWSError, OptionError
from gdws_onnx.recover.finetune import FinetuneOptions, finetune, finetune_loaded
from gdws_onnx.recover.params import check_same_graph, trainable_names, write_back
from gdws_onnx.runtime.session import make_session

pytest.importorskip("torch")

N, HOLDOUT = 600, 60


def classes_data(path, wrong_train_labels: bool = False, shape=(3, 8, 8)):
    """4 classes told apart by their per-channel levels (so a global-average-pool CNN can learn them)."""
    rng = np.random.default_rng(0)
    levels = rng.random((4, shape[0], 1, 1), dtype=np.float32)
    c = rng.integers(0, 4, N)
    x = (0.3 * rng.random((N, *shape), dtype=np.float32) + 0.7 * levels[c]).astype(np.float32)
    y = c.copy()
    if wrong_train_labels:  # the training part learns a wrong mapping, the held-out part keeps the right one
        y[:N - HOLDOUT] = (y[:N - HOLDOUT] + 1) % 4
    np.savez(path, x=x, y=y)
    return str(path)


@pytest.fixture
def model():
    return small_cnn(channels=(8, 16), size=8, classes=4)


@pytest.fixture
def rewritten(model):
    from gdws_onnx import optimize

    out, _ = optimize(model, error_budget=0.6, skip_first=False, target="macs")
    return out


def opts(data, **kw):
    base = dict(data=data, eps=0.02, steps=60, batch=32, threads=1, eval_steps=3, holdout=HOLDOUT, lr=0.05)
    return FinetuneOptions(**{**base, **kw})


def values(m):
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def test_trainable_names(model, rewritten):
    assert set(trainable_names(rewritten, "rewritten")) == {
        n for node in rewritten.graph.node if "/gdws/" in node.name and node.op_type == "Conv"
        for n in node.input[1:]}
    assert set(trainable_names(model, "all")) == {"w0", "b0", "w1", "b1", "fc_w", "fc_b"}
    with pytest.raises(OptionError) as e:
        trainable_names(model, "rewritten")
    assert e.value.params == ("train=all",)


def test_graph_unchanged_but_initializer_values(tmp_path):
    model = annotated_cnn()
    data = classes_data(tmp_path / "d.npz", shape=(3, 12, 12))
    r = finetune_loaded(model, opts(data, train="all", steps=5))
    assert_model_info_kept(r.model, model)
    check_same_graph(model, r.model)
    assert [n.SerializeToString() for n in r.model.graph.node] == [n.SerializeToString() for n in model.graph.node]
    before, after = values(model), values(r.model)
    assert before.keys() == after.keys() and any(not np.array_equal(before[k], after[k]) for k in before)
    assert r.report.max_relative_error < 1e-4
    # any structural change is caught
    bad = write_back(model, {})
    bad.graph.node[0].name = "renamed"
    with pytest.raises(GDWSError, match="nodes"):
        check_same_graph(model, bad)


def test_steps_reduce_the_loss_and_recover_accuracy(tmp_path, model):
    data = classes_data(tmp_path / "d.npz")
    r = finetune_loaded(model, opts(data, train="all", attack="fgsm-rs"))
    rep = r.report
    assert rep.loss_last < 0.5 * rep.loss_first
    assert rep.accepted and rep.output.robust_correct >= rep.input.robust_correct
    assert rep.output.clean_accuracy > rep.input.clean_accuracy
    x, y = np.load(data)["x"], np.load(data)["y"]
    before = (make_session(model).run(None, {"x": x})[0].argmax(1) == y).mean()
    after = (make_session(r.model).run(None, {"x": x})[0].argmax(1) == y).mean()
    assert after > before


def test_trades_trains_on_labels_and_refuses_a_teacher(tmp_path, model):
    """TRADES: clean cross-entropy + 6 KL(clean || adversarial), its attack maximising that KL."""
    import torch

    from gdws_onnx.eval.gradients.torch_replica import TorchReplica
    from gdws_onnx.recover.adversary import TRADES_BETA, training_loss

    data = classes_data(tmp_path / "d.npz")
    r = finetune_loaded(model, opts(data, train="all", attack="pgd-2", loss="trades"))
    assert r.report.accepted and r.report.loss_last < 0.5 * r.report.loss_first
    assert r.report.output.clean_accuracy > r.report.input.clean_accuracy
    # the loss is what the docstring says, on a batch
    rep = TorchReplica(model)
    x = torch.from_numpy(np.load(data)["x"][:8])
    y = torch.from_numpy(np.load(data)["y"][:8].astype(np.int64))
    xa = (x + 0.02).clamp(0, 1)
    value, logits = training_loss(rep, x, xa, y, None, "trades")
    F = torch.nn.functional
    want = F.cross_entropy(rep(x), y) + TRADES_BETA * (
        F.softmax(rep(x), 1) * (F.log_softmax(rep(x), 1) - F.log_softmax(rep(xa), 1))).sum(1).mean()
    assert torch.allclose(value, want, rtol=1e-5) and torch.equal(logits, rep(xa))
    with pytest.raises(OptionError) as e:
        finetune_loaded(model, opts(data, train="all", loss="trades", steps=1), teacher=model)
    assert e.value.params == ("loss=trades", "teacher")
    with pytest.raises(OptionError):
        opts(data, loss="mse").check()


def test_seed_makes_it_deterministic(tmp_path, rewritten):
    data = classes_data(tmp_path / "d.npz")
    a = finetune_loaded(rewritten, opts(data, attack="pgd-2", steps=8, seed=3)).model
    b = finetune_loaded(rewritten, opts(data, attack="pgd-2", steps=8, seed=3)).model
    c = finetune_loaded(rewritten, opts(data, attack="pgd-2", steps=8, seed=4)).model
    va, vb, vc = values(a), values(b), values(c)
    assert all(np.array_equal(va[k], vb[k]) for k in va)
    assert any(not np.array_equal(va[k], vc[k]) for k in va)


def test_teacher_mode_runs(tmp_path, model, rewritten):
    data = classes_data(tmp_path / "d.npz")
    r = finetune_loaded(rewritten, opts(data, attack="fgsm-rs", steps=10, allow_worse=True), teacher=model)
    assert r.report.steps == 10 and r.report.loss_last < r.report.loss_first
    from gdws_onnx.cli.render import finetune_lines
    from gdws_onnx.recover import holdout

    # the teacher's own held-out score is beside the input's and output's: what recovery aims at
    ds = holdout.load_training_data(data, None)
    x_tr, y_tr, x_ho, y_ho = holdout.split(ds, HOLDOUT)
    assert r.report.teacher == holdout.score(model, x_ho, y_ho, 0.02, 3, 0, 1, 32)
    assert any(line.startswith(f"held-out ({HOLDOUT} samples) teacher: clean ")
               for line in finetune_lines(r.report.to_dict()))
    other = small_cnn(channels=(8, 16), size=8, classes=5)
    with pytest.raises(GDWSError, match="teacher"):
        finetune_loaded(rewritten, opts(data, steps=2), teacher=other)


def test_worse_result_is_refused(tmp_path, model):
    data = classes_data(tmp_path / "d.npz", wrong_train_labels=True)
    r = finetune_loaded(model, opts(data, train="all", attack="none"))
    assert not r.report.accepted and "allow_worse" in r.report.reason
    assert finetune_loaded(model, opts(data, train="all", attack="none", allow_worse=True)).report.accepted


def test_bad_inputs(tmp_path, model):
    data = classes_data(tmp_path / "d.npz")
    with pytest.raises(OptionError, match="test split"):
        finetune_loaded(model, opts("fashion-mnist:test", train="all"))
    wrong = classes_data(tmp_path / "w.npz", shape=(1, 8, 8))
    with pytest.raises(GDWSError, match="shape"):
        finetune_loaded(model, opts(wrong, train="all"))
    odd = small_cnn(channels=(8,), size=8, classes=4)
    odd.graph.node.insert(1, helper.make_node("Erf", ["c0"], ["e0"], name="erf"))
    odd.graph.node[2].input[0] = "e0"
    with pytest.raises(GDWSError, match="Erf"):
        finetune_loaded(odd, opts(data, train="all"))
    with pytest.raises(OptionError):
        opts(data, attack="pgd-x").check()


def test_cli_exit_codes(tmp_path, runner, model):
    from gdws_onnx.cli import main

    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    good = classes_data(tmp_path / "d.npz")
    worse = classes_data(tmp_path / "w.npz", wrong_train_labels=True)
    base = [str(src), "-o", str(out), "--train", "all", "--steps", "40", "--batch", "32", "--lr", "0.05",
            "--threads", "1", "--eval-steps", "2", "--holdout", str(HOLDOUT), "--eps", "0.02"]
    r = runner.invoke(main, ["finetune", *base, "--data", worse, "--attack", "none"])
    assert r.exit_code == 1, r.output
    assert "--allow-worse" in r.output and not out.exists()
    r = runner.invoke(main, ["finetune", *base, "--data", "fashion-mnist:test"])
    assert r.exit_code == 2 and "--data" in r.output and not out.exists()
    r = runner.invoke(main, ["finetune", *base, "--data", good, "--teacher", str(src), "--attack", "pgd-x"])
    assert r.exit_code == 2 and "--attack" in r.output
    r = runner.invoke(main, ["finetune", *base[:3], "--data", good])
    assert r.exit_code == 2 and "--train all" in r.output
    r = runner.invoke(main, ["finetune", *base, "--data", good, "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert out.exists() and "held-out" in r.output and (tmp_path / "r.json").exists()
    check_same_graph(model, onnx.load(out))
    assert not (tmp_path / "o.onnx.ckpt").exists()  # a finished run leaves no checkpoint
    (tmp_path / "o.onnx.ckpt").write_bytes(b"junk")  # an interrupted run's (here: unreadable) checkpoint
    r = runner.invoke(main, ["finetune", *base, "--data", good, "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 2 and "--resume" in r.output and r.output.count("\n") == 1, r.output
    r = runner.invoke(main, ["finetune", *base, "--data", good, "--resume"])
    assert r.exit_code == 2 and "cannot read the checkpoint" in r.output, r.output


def test_library_finetune_writes_only_when_accepted(tmp_path, model):
    from gdws_onnx.errors import GateFailed

    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    with pytest.raises(GateFailed):
        finetune(str(src), str(out), opts(classes_data(tmp_path / "w.npz", True), train="all", attack="none"))
    assert not out.exists()


def test_cli_choices_are_the_library_s():
    from gdws_onnx.cli.finetune import LOSS_CHOICES, TRAIN_CHOICES
    from gdws_onnx.recover import adversary, params

    assert TRAIN_CHOICES == params.TRAIN_CHOICES and LOSS_CHOICES == adversary.LOSS_CHOICES


def test_optimize_finetune_is_a_step_between_the_rewrite_and_int8(tmp_path, model):
    """optimize(finetune=EPOCHS): the rewritten model fine-tuned (distilling the original), same
    graph as the rewrite alone, new values, its report in the optimize report; then INT8 on top."""
    from gdws_onnx import optimize

    data = classes_data(tmp_path / "d.npz")
    kw = dict(error_budget=0.6, skip_first=False, target="macs", data=data, threads=1)
    plain, _ = optimize(model, **kw)
    tuned, report = optimize(model, finetune=4, finetune_attack="fgsm-rs", finetune_eps=0.02, **kw)
    ft = report.finetune
    assert ft["accepted"] and ft["steps"] == 4 * 5 and ft["output"]["robust_correct"] >= ft["input"]["robust_correct"]
    assert [n.SerializeToString() for n in tuned.graph.node] == [n.SerializeToString() for n in plain.graph.node]
    before, after = values(plain), values(tuned)
    assert set(ft["trained"]) == {k for k in before if not np.array_equal(before[k], after[k])}
    q, qrep = optimize(model, finetune=4, finetune_attack="fgsm-rs", finetune_eps=0.02, quantize="int8", **kw)
    assert qrep.finetune["accepted"] and "QuantizeLinear" in {n.op_type for n in q.graph.node}
    from gdws_onnx.cli.render import finetune_lines

    assert finetune_lines(report.finetune)[0].startswith("finetune: trained ")


def test_optimize_finetune_refusals(tmp_path, model, monkeypatch):
    from gdws_onnx import optimize
    from gdws_onnx.errors import GateFailed
    from gdws_onnx.recover import finetune as ft

    with pytest.raises(OptionError) as e:  # training data is required
        optimize(model, finetune=1, target="macs")
    assert e.value.params == ("finetune", "data")
    with pytest.raises(OptionError) as e:
        optimize(model, finetune=1, finetune_attack="pgd-x", data="d.npz", target="macs")
    assert e.value.params == ("finetune_attack",)
    data = classes_data(tmp_path / "d.npz")
    real = ft.finetune_loaded

    def refused(*a, **k):
        r = real(*a, **k)
        r.report.accepted, r.report.reason = False, "worse on the held-out split"
        return r

    monkeypatch.setattr(ft, "finetune_loaded", refused)
    import gdws_onnx.pipeline.recovery as recovery

    monkeypatch.setattr(recovery, "finetune_loaded", refused)
    with pytest.raises(GateFailed, match="finetune refused: worse"):
        optimize(model, error_budget=0.6, skip_first=False, target="macs", data=data, finetune=1,
                 finetune_attack="none", finetune_eps=0.02, threads=1)


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, rewritten):
    """A run interrupted after its step-3 checkpoint and resumed ends with exactly the weights of a
    run that was never interrupted; a checkpoint found without resume, or from other settings, is refused."""
    data = classes_data(tmp_path / "d.npz")
    ckpt = str(tmp_path / "o.ckpt")
    base = dict(attack="pgd-2", steps=8, seed=3)
    whole = finetune_loaded(rewritten, opts(data, **base)).model

    def stop_at_5(p):
        if p.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune_loaded(rewritten, opts(data, **base, checkpoint=ckpt, checkpoint_every=3), progress=stop_at_5)
    with pytest.raises(OptionError) as e:  # an interrupted run is neither overwritten nor ignored
        finetune_loaded(rewritten, opts(data, **base, checkpoint=ckpt, checkpoint_every=3))
    assert e.value.params == ("resume",)
    with pytest.raises(GDWSError, match="other settings.*lr"):
        finetune_loaded(rewritten, opts(data, **{**base, "lr": 0.1}, checkpoint=ckpt, resume=True))
    resumed = finetune_loaded(rewritten, opts(data, **base, checkpoint=ckpt, checkpoint_every=3, resume=True))
    va, vb = values(whole), values(resumed.model)
    assert all(np.array_equal(va[k], vb[k]) for k in va)
    assert resumed.report.steps == 8


def test_qdq_fine_tuning_keeps_the_qdq_structure_and_its_scales(tmp_path, model):
    """Through INT8: the integer weights are trained as fake-quantized float masters (clipped
    straight-through), written back as integers of the same type on the same fixed scales; every
    Q/DQ node and scale stays, ORT agrees with the replica, and the loss falls."""
    from gdws_onnx import optimize
    from gdws_onnx.recover.quantized import quantized_weights

    data = classes_data(tmp_path / "d.npz")
    q, _ = optimize(model, conv="off", quantize="int8", data=data, threads=1, mixed_precision=False)
    weights = quantized_weights(q)
    assert any(np.dtype(w.dtype) == np.int8 for w in weights.values())
    names = trainable_names(q, "all")
    assert set(names) == {w.source for w in weights.values()
                          if any(w.output in n.input for n in q.graph.node if n.op_type in ("Conv", "Gemm"))}
    r = finetune_loaded(q, opts(data, train="all", attack="fgsm-rs", steps=40))
    rep = r.report
    assert rep.accepted and rep.loss_last < rep.loss_first, rep
    assert rep.max_relative_error < 1e-3 and rep.input_relative_error is not None
    check_same_graph(q, r.model)
    assert [n.SerializeToString() for n in r.model.graph.node] == [n.SerializeToString() for n in q.graph.node]
    before, after = values(q), values(r.model)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and changed <= set(names)
    assert all(after[k].dtype == before[k].dtype for k in before)  # int8 stays int8, int32 biases int32
    for w in weights.values():  # scales and zero points are fixed
        assert np.array_equal(after[next(n.input[1] for n in q.graph.node if n.output[:1] == [w.output])], w.scale)


def test_ort_agreement_is_judged_against_the_inputs_own():
    """ORT's integer kernels requantize where the replica fake-quantizes, so a QDQ graph differs
    from its replica by ~2 % before any training: the written graph may differ by 1e-3 + 1.5x that."""
    from gdws_onnx.recover.finetune import FinetuneReport, verdict
    from gdws_onnx.recover.holdout import HoldoutScore

    def report(err, before):
        return FinetuneReport(options={}, data="d", train_samples=1, trained=["w"], parameters=1,
                              input=HoldoutScore(10, 8, 6), output=HoldoutScore(10, 8, 6),
                              max_relative_error=err, input_relative_error=before)

    o = FinetuneOptions()
    assert verdict(report(5e-4, 1e-7), o)[0] and not verdict(report(2e-3, 1e-7), o)[0]
    assert verdict(report(0.018, 0.0176), o)[0]
    ok, why = verdict(report(0.05, 0.0176), o)
    assert not ok and "the input's 0.0176" in why
