"""How latency is measured and decided, for every latency planner (convs: `latency`, FC layers:
`fc_latency`, the device table: `profile`): a `Probe` per batch (`bench.OrtProbe` on an EP, or
one a test injects), the on-disk cache of layer measurements, and the rule every decision follows.
Nothing decides by a median alone: "faster than T" means the confidence interval of the median
per-round ratio lies below T (`bench.verdict`) at every batch; an interval that straddles T is
"not measurably faster". Layers must beat FASTER, whole models 1.0 (`never_slower`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import onnx
import onnxruntime as ort

from gdws_onnx.files import write_json_atomic
from gdws_onnx.graph.convs import ConvSite
from gdws_onnx.pipeline.options import RunOptions, TimingOptions
from gdws_onnx.runtime.bench import Ratio, ratio_of, verdict

FASTER = 0.95  # a layer is kept only if the upper bound of its measured ratio is below this
CONFIDENCE = 0.95  # of the interval every "faster" decision rests on (bench.Rounds, over all its looks)


class Probe(Protocol):
    def compare(self, baseline: onnx.ModelProto, candidate: onnx.ModelProto,
                threshold: float | tuple[float, ...] | None = None) -> Ratio:
        """candidate / baseline latency; given a threshold (or several), measure until the
        Ratio's interval lies on one side of it (of each), as far as the probe's limits allow."""
        ...


def faster(r: Ratio | dict, threshold: float) -> bool:
    """Measurably below threshold: the whole interval of the median ratio is below it."""
    return verdict(r if isinstance(r, Ratio) else ratio_of(r), threshold) == "below"


class LatencyCache:
    """Layer measurements on disk, keyed by EP, CPU, ORT version, threads, batch and geometry."""

    def __init__(self, path: str | None):
        self.path = path
        self.entries: dict[str, dict] = {}
        self.hits = self.misses = 0
        if path and os.path.isfile(path):
            try:
                with open(path) as f:
                    self.entries = json.load(f)
            except (OSError, ValueError):
                self.entries = {}  # a corrupt cache is rebuilt, not fatal

    @staticmethod
    def key(site: ConvSite, option: tuple[int, str | bool], batch: int, env: dict) -> str:
        """The entry of (total rank G, form: one of FORMS, a bool = multiplier or Gather form, or
        another family's form named '<family>:<realization>:<ranks>' by `auto.cache_key`)."""
        g, form = option
        form = ("multiplier" if form else "gather") if isinstance(form, (bool, np.bool_)) else form
        geometry = dict(C=site.in_channels, M=site.out_channels, groups=site.group, kernel=site.kernel_shape,
                        strides=site.strides, pads=site.pads, dilations=site.dilations, auto_pad=site.auto_pad,
                        spatial=site.in_spatial, dtype=str(site.weight.dtype), G=g, mult=form != "gather",
                        batch=batch)
        if form == "stacked":  # keys of the older two forms unchanged
            geometry["stacked"] = True
        elif form not in ("gather", "multiplier"):  # another family's form ("ssvd:...", "tucker:...")
            geometry["form"] = form
        blob = json.dumps({"env": env, "layer": geometry}, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def get(self, key: str, usable: Callable[[dict], bool] | None = None) -> dict | None:
        """The entry under key if there is one and `usable` accepts it (a miss otherwise)."""
        hit = self.entries.get(key)
        if hit is not None and usable is not None and not usable(hit):
            hit = None
        self.hits += hit is not None
        self.misses += hit is None
        return hit

    def put(self, key: str, value: dict) -> None:
        self.entries[key] = value

    def save(self) -> None:
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        write_json_atomic(self.path, self.entries, sort_keys=True)


def default_cache_path() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "onnx-gdws", "latency.json")


def conclusive(entry: dict) -> bool:
    """A cached layer measurement that can be reused: it has its spread (older entries held a
    median only) and its interval (`Ratio.bounds`) decides the FASTER question; others are
    measured again."""
    if any(entry.get(k) is None for k in _CACHED):
        return False
    return verdict(ratio_of(entry), FASTER) != "undecided"


_CACHED = ("median", "p10", "p90", "baseline_ms", "candidate_ms")


@dataclass
class FallbackStep:
    """One whole-model measurement of the never-slower check."""

    rewritten: list[str]
    ratios: dict[int, dict]  # batch -> Ratio as a dict
    reverted: str = ""  # layer reverted after this step, if the model was not faster


@dataclass
class NeverSlowerResult:
    kept: list[str]
    steps: list[FallbackStep] = field(default_factory=list)
    faster: bool = False


def never_slower(original: onnx.ModelProto, build: Callable[[list[str]], onnx.ModelProto],
                 layers_worst_first: list[str], probes: dict[int, Probe],
                 also: tuple[float, ...] = ()) -> NeverSlowerResult:
    """Measure original vs optimized at every batch; unless every batch is measurably faster
    (interval of the median ratio below 1), revert the layer with the worst measured layer
    ratio and measure again. With nothing left, the original is kept: the result is never a
    model that did not measure faster. `also`: further thresholds each measurement should
    settle (a latency budget's 1/R), so that its interval says whether the budget is met."""
    kept = list(layers_worst_first)
    result = NeverSlowerResult(kept=[])
    while kept:
        candidate = build(kept)
        ratios = {b: p.compare(original, candidate, threshold=(1.0, *also)) for b, p in probes.items()}
        step = FallbackStep(rewritten=list(kept), ratios={b: asdict(r) for b, r in ratios.items()})
        result.steps.append(step)
        if all(faster(r, 1.0) for r in ratios.values()):
            result.kept, result.faster = kept, True
            return result
        step.reverted = kept.pop(0)
    return result


def environment_key(ep: str, threads: int | None) -> dict:
    """What a cached layer latency depends on besides the layer itself."""
    from gdws_onnx.runtime.bench import BenchConfig, environment

    env = environment(BenchConfig(ep=ep, threads=threads))
    return {"ep": ep, "cpu": env["cpu"], "cpus": env["cpus"], "threads": threads or 0, "ort": ort.__version__}


def layer_probes(timing: TimingOptions, run: RunOptions, kind: str) -> dict[int, Probe]:
    """A probe per batch: `timing.probe_factory`'s, else ONNX Runtime's on `timing.ep` (model
    probes feed the model at `run.input_shapes`; layer models have static shapes)."""
    from gdws_onnx.runtime.bench import BenchConfig, OrtProbe, Rounds

    out = {}
    for b in timing.batches:
        if timing.probe_factory is not None:
            out[b] = timing.probe_factory(b, kind)
        else:
            shapes = run.input_shapes if kind == "model" else {}
            out[b] = OrtProbe(BenchConfig(ep=timing.ep, batch=b, threads=run.threads, runs=timing.runs,
                                          warmup=3, input_shapes=shapes, seed=run.seed),
                              rounds=Rounds(max_rounds=max(timing.max_rounds, timing.runs),
                                            max_seconds=timing.measure_seconds, confidence=CONFIDENCE))
    return out
