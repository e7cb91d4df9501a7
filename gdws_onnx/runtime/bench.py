"""Latency measurement on ONNX Runtime: interleaved timing, ratios with spread, per-node profiles.

Machines are shared and noisy, so models are never timed one after the other: runs are
interleaved (A B, B A, A B, ...: who goes first alternates) with intra-op spinning off, and
each pair's ratio is the median of the per-round ratios, with its 10th-90th percentile spread
and a distribution-free confidence interval of that median (`median_ci`). A decision such as
"B is faster than T x A" is taken only when that interval lies on one side of T
(`verdict`); `OrtProbe.compare(..., threshold=T)` adds rounds until it does (for every T, given
several) or a cap is hit.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np
import onnx
import onnxruntime as ort

from gdws_onnx.runtime import providers
from gdws_onnx.errors import GDWSError
from gdws_onnx.graph.pattern import layer_of
from gdws_onnx.runtime.session import random_feeds, session_options

Timer = Callable[[Callable[[], object]], float]
Thresholds = float | tuple[float, ...] | None  # what a comparison must settle (`compare_until`)


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
    """Candidate / baseline latency: median of per-round ratios, its 10-90 % spread, and a
    confidence interval [ci_low, ci_high] of the median at `confidence` over `rounds` rounds
    (`median_ci`; None when the rounds are too few for one). A Ratio built by hand without
    rounds is judged by its 10-90 % spread instead."""

    baseline: str
    candidate: str
    median: float
    p10: float
    p90: float
    baseline_ms: float = 0.0
    candidate_ms: float = 0.0
    ci_low: float | None = None
    ci_high: float | None = None
    rounds: int = 0
    confidence: float = 0.0

    def bounds(self) -> tuple[float, float]:
        """The interval decisions use: the CI of the median; (0, inf) when measured rounds were
        too few for one; the 10-90 % spread for a Ratio without rounds."""
        if self.ci_low is not None and self.ci_high is not None:
            return self.ci_low, self.ci_high
        return (0.0, math.inf) if self.rounds else (self.p10, self.p90)


@dataclass
class Rounds:
    """How long a comparison against a threshold may go on: it starts with `BenchConfig.runs`
    rounds and doubles them until decided, up to `max_rounds` rounds or `max_seconds` of timing."""

    max_rounds: int = 320
    max_seconds: float = 10.0
    confidence: float = 0.95  # overall, over all the looks a comparison may take

    def looks(self, first: int) -> int:
        """How many times the interval may be looked at: first, 2 first, 4 first, ... max_rounds."""
        return 1 + max(0, math.ceil(math.log2(max(self.max_rounds, first) / first)))

    def per_look(self, first: int) -> float:
        """Confidence of each look so that all of them together hold `confidence` (Bonferroni)."""
        return 1 - (1 - self.confidence) / self.looks(first)


def median_ci(samples, confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median of i.i.d. samples, from order statistics.

    With x_(1) <= ... <= x_(n) sorted and m the true median, the number of samples below m is
    Binomial(n, 1/2), so P(x_(k) <= m <= x_(n-k+1)) = 1 - 2 P(B <= k - 1). The interval returned
    is [x_(k), x_(n-k+1)] for the largest k with P(B <= k - 1) <= (1 - confidence) / 2: its
    coverage is at least `confidence` whatever the distribution. This is the sign test
    inverted: "x_(n-k+1) < T" says that so few samples are >= T that a median >= T is rejected
    at level (1 - confidence) / 2. With too few samples for any such k (n < 6 at 95 %) the
    interval is (0, inf): nothing can be decided."""
    x = np.sort(np.asarray(samples, dtype=np.float64).ravel())
    n = x.size
    if n == 0:
        return 0.0, math.inf
    cdf = _half_binomial_cdf(n)  # cdf[j] = P(B <= j)
    ok = np.flatnonzero(cdf <= (1 - confidence) / 2)
    if ok.size == 0:
        return 0.0, math.inf
    k = int(ok[-1]) + 1  # 1-based order statistic
    return float(x[k - 1]), float(x[n - k])


def format_ratio(r: Ratio | dict, digits: int = 2) -> str:
    """'0.62 [0.58-0.66]': the median and the interval decisions use (`Ratio.bounds`)."""
    r = r if isinstance(r, Ratio) else ratio_of(r)
    lo, hi = r.bounds()
    return f"{r.median:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def ratio_of(d: dict) -> Ratio:
    """A Ratio from its dict form (`dataclasses.asdict`, a report or a cache entry); fields
    it lacks take their defaults (names empty, no interval)."""
    known = {f.name for f in fields(Ratio)}
    return Ratio(**{"baseline": "", "candidate": "", **{k: v for k, v in d.items() if k in known}})


def _half_binomial_cdf(n: int) -> np.ndarray:
    """P(B <= j) for B ~ Binomial(n, 1/2), j = 0..n (log-space pmf: no overflow at large n)."""
    log_pmf = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) - n * math.log(2)
               for j in range(n + 1)]
    return np.minimum(np.cumsum(np.exp(log_pmf)), 1.0)


def verdict(r: Ratio, threshold: float) -> str:
    """'below' if the whole interval (`Ratio.bounds`) is below threshold, 'above' if it is
    at or above it, else 'undecided'."""
    lo, hi = r.bounds()
    return "below" if hi < threshold else "above" if lo >= threshold else "undecided"


def interleave(runners: list[Callable[[], object]], warmup: int, runs: int,
               timer: Timer = wall_timer, first_round: int = 0) -> list[list[float]]:
    """Warm each runner up, then time `runs` rounds; round r starts with runner r mod n
    (rounds numbered from `first_round`, so that more rounds continue the alternation)."""
    for run in runners:
        for _ in range(warmup):
            run()
    times: list[list[float]] = [[] for _ in runners]
    n = len(runners)
    for r in range(first_round, first_round + runs):
        for k in range(n):
            i = (r + k) % n
            times[i].append(timer(runners[i]))
    return times


def latency_stats(name: str, seconds: list[float], batch: int) -> LatencyStats:
    ms = np.asarray(seconds) * 1e3
    med = float(np.median(ms))
    return LatencyStats(name, med, float(np.percentile(ms, 90)), float(np.percentile(ms, 99)),
                        batch * 1e3 / med if med > 0 else float("inf"), batch)


def ratio(baseline: str, candidate: str, base_s: list[float], cand_s: list[float],
          confidence: float = 0.95) -> Ratio:
    """Per-round candidate / baseline ratios summarised: median, 10-90 % spread, CI of the median."""
    r = np.asarray(cand_s) / np.asarray(base_s)
    lo, hi = median_ci(r, confidence)
    lo, hi = (lo, hi) if math.isfinite(hi) else (None, None)  # None, not inf: reports stay plain JSON
    return Ratio(baseline, candidate, float(np.median(r)), float(np.percentile(r, 10)),
                 float(np.percentile(r, 90)), float(np.median(base_s)) * 1e3, float(np.median(cand_s)) * 1e3,
                 lo, hi, int(r.size), confidence)


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
        sess = ort.InferenceSession(src, so, providers=provs) if provs else ort.InferenceSession(src, so)
    except Exception as e:  # noqa: BLE001
        raise GDWSError(f"ONNX Runtime cannot create a {config.ep} session: {e}") from None
    if provs:  # a plugin EP (provs None) is attached to the options, not listed
        providers.require_active(sess.get_providers(), config.ep)
    return sess


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


def compare_until(runners: list[Callable[[], object]], threshold: Thresholds, config: BenchConfig,
                  rounds: Rounds, timer: Timer = wall_timer) -> Ratio:
    """runners[1] / runners[0] latency, interleaved: `config.runs` rounds, then (with a threshold)
    as many again, doubling, until `verdict` is not 'undecided' for the threshold (for each of
    them, given several), or `rounds.max_rounds` rounds or `rounds.max_seconds` of timing are
    reached. Each look's interval is at `rounds.per_look`, so all looks together hold
    `rounds.confidence` (without a threshold: one look at that level)."""
    thresholds = () if threshold is None else tuple(np.atleast_1d(threshold).tolist())
    first = max(1, config.runs)
    confidence = rounds.per_look(first) if thresholds else rounds.confidence
    times: list[list[float]] = [[], []]
    for run in runners:
        for _ in range(config.warmup):
            run()
    start, n = time.perf_counter(), first
    while True:
        more = interleave(runners, 0, n, timer, first_round=len(times[0]))
        times[0] += more[0]
        times[1] += more[1]
        r = ratio("baseline", "candidate", times[0], times[1], confidence)
        done = len(times[0])
        if (all(verdict(r, t) != "undecided" for t in thresholds) or done >= rounds.max_rounds
                or time.perf_counter() - start >= rounds.max_seconds):
            return r
        n = min(done, rounds.max_rounds - done)


class OrtProbe:
    """Measures candidate / baseline latency ratios with ONNX Runtime (interleaved)."""

    def __init__(self, config: BenchConfig, timer: Timer = wall_timer, rounds: Rounds | None = None):
        self.config = config
        self.timer = timer
        self.rounds = rounds or Rounds()

    def compare(self, baseline: onnx.ModelProto, candidate: onnx.ModelProto,
                threshold: Thresholds = None) -> Ratio:
        """candidate / baseline on identical inputs; with a threshold (or several), rounds are
        added until the interval of the median lies on one side of it (`compare_until`)."""
        sessions = [make_session(m, self.config) for m in (baseline, candidate)]
        feeds = feeds_for(sessions[0], self.config)
        return compare_until([_runner(s, feeds) for s in sessions], threshold, self.config, self.rounds,
                             self.timer)


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


def _cpuinfo(field: str) -> str | None:
    """The first value of a /proc/cpuinfo field (None where there is no such file or field)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == field),
                        None)
    except OSError:
        return None


def nchwc_block_size(flags: str | None = None) -> int | None:
    """The channel block of ONNX Runtime's x86 NCHWc layout on this CPU (MLAS: 16 with AVX-512F,
    8 with AVX2; None elsewhere). The CPU EP's NCHWc transformer blocks a depthwise conv only when
    its channel count is a multiple of it, and a 1x1 conv only when its input channels are (or are
    fewer); `flags` is a /proc/cpuinfo flags line (default: this machine's)."""
    found = set((flags if flags is not None else _cpuinfo("flags") or "").split())
    return 16 if "avx512f" in found else 8 if "avx2" in found else None


def environment(config: BenchConfig) -> dict:
    """What a latency number depends on."""
    cpu = _cpuinfo("model name") or platform.processor() or platform.machine()
    env = {"cpu": cpu, "cpus": os.cpu_count(), "ep": config.ep, "threads": config.threads or "default",
           "onnxruntime": ort.__version__, "onnxruntime_package": providers.ort_distribution(),
           "providers": ort.get_available_providers(),
           "spinning": "off", "python": platform.python_version()}
    if config.ep == "cpu":
        env["nchwc_block"] = nchwc_block_size()
    return env


FUSED_SUFFIXES = ("_nchwc", "_fused", "_token")


def per_conv_times(model: onnx.ModelProto, node_times: dict[str, float]) -> dict[str, float]:
    """Profiled node times summed per original conv (`pattern.layer_of`): the rewrite's nodes, and
    nodes ORT fused or renamed after a conv or after an activation fed by one (e.g. 'relu_out_nchwc'),
    count for that conv; layout reorders and all other nodes go under 'other'."""
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
    from gdws_onnx.graph.convs import find_convs

    out: dict[str, int] = {}
    for s in find_convs(model, input_shapes=input_shapes):
        if s.weight is not None and s.pixels is not None:
            out[layer_of(s.name)] = out.get(layer_of(s.name), 0) + s.pixels * s.macs_per_pixel
    return out
