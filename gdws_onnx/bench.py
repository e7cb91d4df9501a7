"""Latency measurement on ONNX Runtime: interleaved timing, ratios with spread, per-node profiles.

Machines are shared and noisy, so models are never timed one after the other: runs are
interleaved (A B, B A, A B, ...: who goes first alternates) with intra-op spinning off, and
each pair's ratio is the median of the per-round ratios, with its 10th-90th percentile spread.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from . import providers
from .errors import GDWSError
from .rewrite import layer_of
from .runtime import random_feeds, session_options

Timer = Callable[[Callable[[], object]], float]


def wall_timer(fn: Callable[[], object]) -> float:
    """Seconds one call of fn takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclass
class BenchConfig:
    """Where and how to time: EP, batch, threads, warm-up and timed runs."""

    ep: str = "cpu"
    batch: int = 1
    threads: int | None = None
    warmup: int = 5
    runs: int = 30
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    seed: int = 0


@dataclass
class LatencyStats:
    """Latency of one model (milliseconds) and throughput (samples per second)."""

    name: str
    median_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float
    batch: int


@dataclass
class Ratio:
    """Candidate / baseline latency: median of per-round ratios and its 10-90 % spread."""

    baseline: str
    candidate: str
    median: float
    p10: float
    p90: float
    baseline_ms: float = 0.0
    candidate_ms: float = 0.0


def interleave(runners: list[Callable[[], object]], warmup: int, runs: int,
               timer: Timer = wall_timer) -> list[list[float]]:
    """Warm each runner up, then time `runs` rounds; round r starts with runner r mod n."""
    for run in runners:
        for _ in range(warmup):
            run()
    times: list[list[float]] = [[] for _ in runners]
    n = len(runners)
    for r in range(runs):
        for k in range(n):
            i = (r + k) % n
            times[i].append(timer(runners[i]))
    return times


def latency_stats(name: str, seconds: list[float], batch: int) -> LatencyStats:
    ms = np.asarray(seconds) * 1e3
    med = float(np.median(ms))
    return LatencyStats(name, med, float(np.percentile(ms, 90)), float(np.percentile(ms, 99)),
                        batch * 1e3 / med if med > 0 else float("inf"), batch)


def ratio(baseline: str, candidate: str, base_s: list[float], cand_s: list[float]) -> Ratio:
    r = np.asarray(cand_s) / np.asarray(base_s)
    return Ratio(baseline, candidate, float(np.median(r)), float(np.percentile(r, 10)),
                 float(np.percentile(r, 90)), float(np.median(base_s)) * 1e3, float(np.median(cand_s)) * 1e3)


def make_session(model: onnx.ModelProto | str, config: BenchConfig, profile: bool = False
                 ) -> ort.InferenceSession:
    """A session on the configured EP, spinning off (fair when sessions alternate)."""
    so = session_options(config.threads, spinning=False)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tempfile.gettempdir(), "onnx-gdws-profile")
    provs = providers.configure(so, config.ep)
    src = model if isinstance(model, str) else model.SerializeToString()
    try:
        return ort.InferenceSession(src, so, providers=provs) if provs else ort.InferenceSession(src, so)
    except Exception as e:  # noqa: BLE001
        raise GDWSError(f"ONNX Runtime cannot create a {config.ep} session: {e}") from None


def _runner(sess: ort.InferenceSession, feeds: dict) -> Callable[[], object]:
    names = [o.name for o in sess.get_outputs()]
    return lambda: sess.run(names, feeds)


def feeds_for(sess: ort.InferenceSession, config: BenchConfig) -> dict[str, np.ndarray]:
    return random_feeds(sess, config.input_shapes, batch=config.batch, seed=config.seed)


def compare_models(models: list[onnx.ModelProto | str], names: list[str], config: BenchConfig,
                   timer: Timer = wall_timer) -> tuple[list[LatencyStats], list[Ratio]]:
    """Time models interleaved on identical inputs; ratios are each model vs the first."""
    sessions = [make_session(m, config) for m in models]
    feeds = feeds_for(sessions[0], config)
    batch = next(iter(feeds.values())).shape[0] if feeds else config.batch
    times = interleave([_runner(s, feeds) for s in sessions], config.warmup, config.runs, timer)
    stats = [latency_stats(n, t, batch) for n, t in zip(names, times)]
    ratios = [ratio(names[0], n, times[0], t) for n, t in zip(names[1:], times[1:])]
    return stats, ratios


class OrtProbe:
    """Measures candidate / baseline latency ratios with ONNX Runtime (interleaved)."""

    def __init__(self, config: BenchConfig, timer: Timer = wall_timer):
        self.config = config
        self.timer = timer

    def compare(self, baseline: onnx.ModelProto, candidate: onnx.ModelProto) -> Ratio:
        _, (r,) = compare_models([baseline, candidate], ["baseline", "candidate"], self.config, self.timer)
        return r


def profile_nodes(model: onnx.ModelProto | str, config: BenchConfig) -> dict[str, float]:
    """Median kernel time per node (microseconds) over the timed runs, from ONNX Runtime's
    profiler (warm-up runs are profiled too and dropped: each run executes each node once)."""
    sess = make_session(model, config, profile=True)
    run = _runner(sess, feeds_for(sess, config))
    for _ in range(config.warmup + config.runs):
        run()
    path = sess.end_profiling()
    try:
        with open(path) as f:
            events = json.load(f)
    finally:
        os.remove(path)
    durations: dict[str, list[float]] = {}
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            durations.setdefault(ev["name"][: -len("_kernel_time")], []).append(float(ev.get("dur", 0)))
    return {k: float(np.median(v[-config.runs:])) for k, v in durations.items()}


def environment(config: BenchConfig) -> dict:
    """What a latency number depends on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "ep": config.ep, "threads": config.threads or "default",
            "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "spinning": "off", "python": platform.python_version()}


FUSED_SUFFIXES = ("_nchwc", "_fused", "_token")


def per_conv_times(model: onnx.ModelProto, node_times: dict[str, float]) -> dict[str, float]:
    """Profiled node times summed per original conv: '<conv>/gdws/*' nodes, and nodes ORT fused
    or renamed after a conv or after an activation fed by one (e.g. 'relu_out_nchwc'), count
    for that conv; layout reorders and all other nodes go under 'other'."""
    nodes = {n.name: n for n in model.graph.node if n.name}
    producer = {o: n for n in model.graph.node for o in n.output}
    out: dict[str, float] = {}
    for name, us in node_times.items():
        base = name
        for suffix in FUSED_SUFFIXES:
            base = base.split(suffix)[0] if suffix in base else base
        node = nodes.get(base) or producer.get(base)  # fused nodes are named after a node or its output
        if node is not None and node.op_type != "Conv" and node.input and node.input[0] in producer:
            src = producer[node.input[0]]
            node = src if src.op_type == "Conv" else node
        key = layer_of(node.name) if node is not None and node.op_type in ("Conv", "Gather") else "other"
        out[key] = out.get(key, 0.0) + us
    return out


def conv_macs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> dict[str, int]:
    """MACs per sample of every conv, summed per original conv name (GDWS parts included)."""
    from .convs import find_convs

    out: dict[str, int] = {}
    for s in find_convs(model, input_shapes=input_shapes):
        if s.weight is not None and s.pixels is not None:
            out[layer_of(s.name)] = out.get(layer_of(s.name), 0) + s.pixels * s.macs_per_pixel
    return out
