"""The layer latency table `onnx-gdws profile` writes on the target device and
`optimize --target latency --latency-table` reads on the host (format documented in docs/cli.md,
"Profile on the device, optimize on the host").

A table is JSON: what it is (`format`, `version`), the environment the layers were measured in,
the model's identity, which planner's forms it holds (`conv`: "auto" for every family's forms on
the auto planner's error ladder at `error_budget`, or "gdws" for the GDWS planner's ladder, all a
version-1 table holds), and per layer the measured realizations. Each measurement is stored under
the same key the latency cache uses (`measure.LatencyCache.key`: the layer's geometry, the
realization's total rank and form, the batch, and `key_environment`), so the host finds a
layer's numbers from the layer itself, whatever the model file is called or however its bytes
differ. Only reading, writing and checking the format live here (no ONNX, no ONNX Runtime).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property

from gdws_onnx.errors import OptionError, literal
from gdws_onnx.files import write_json_atomic

FORMAT = "onnx-gdws-latency-table"
VERSION = 2
READS = (1, 2)  # version 1: GDWS planner forms only (no `conv`, `families`, `error_budget`)
MEASUREMENT_FIELDS = ("baseline", "candidate", "median", "p10", "p90", "baseline_ms", "candidate_ms")


@dataclass
class LayerMeasurement:
    """One realization of one layer timed against the original layer at one batch:
    the fields of `bench.Ratio` (candidate / baseline) with the cache key it is stored under."""

    key: str
    total_rank: int  # G, the depthwise width (channel-multiplier form: sum of the uniform ranks)
    multiplier: bool
    batch: int
    ratio: dict  # bench.Ratio as a dict: median, p10, p90, ci_low, ci_high, rounds, baseline_ms, ...
    family: str = "gdws"  # the factorization family (families.FAMILIES key)
    form: str = ""  # the realization (auto tables: families.Form.realization)
    ranks: list[int] | None = None  # auto tables, Tucker-2: (r1, r2)
    error: float | None = None  # auto tables: the form's relative weight error


@dataclass
class LatencyTable:
    """Layer latencies measured on one device (see the module docstring)."""

    environment: dict  # ep, provider package, onnxruntime version and package, cpu, cpus, threads, ...
    key_environment: dict  # what the layer keys were hashed with (`measure.environment_key`)
    model: dict  # name, sha256, input_shapes
    batches: list[int]
    model_ms: dict[int, float]  # batch -> the whole original model's median time on the device
    layers: dict[str, list[LayerMeasurement]] = field(default_factory=dict)
    conv: str = "gdws"  # whose forms: "auto" (every family in `families`) or "gdws" (the GDWS planner's)
    families: list[str] = field(default_factory=list)  # conv="auto": the families measured
    error_budget: float | None = None  # conv="auto": the budget whose error ladder was measured
    format: str = FORMAT
    version: int = VERSION

    @cached_property
    def entries(self) -> dict[str, dict]:
        """key -> measured Ratio dict, over every layer (built once: a table is not changed after
        it is made or read)."""
        return {m.key: m.ratio for ms in self.layers.values() for m in ms}

    def require(self, conv: str, families: list[str], error_budget: float | None, batches: list[int],
                source: str) -> None:
        """OptionError (on `latency_table`, naming what to change) unless the table holds what a
        plan needs: `conv`'s forms ("auto": of each of `families`, on the ladder of `error_budget`)
        at every batch of `batches`."""
        absent = [b for b in batches if b not in self.batches or b not in self.model_ms]
        if absent:
            raise OptionError(f"{{0}} was profiled at batch {literal(self.batches)}, not at {literal(absent)}: "
                              "give {1} from those or profile again", "latency_table", "batches")
        if conv != self.conv:
            held = ("the GDWS planner's forms only (" + ("format version 1)" if self.version == 1 else "profiled for {2})")
                    if self.conv == "gdws" else "the forms of every family (profiled for {2})")
            raise OptionError(f"{{0}} {literal(source)} holds {held}: profile the model again for {{1}}",
                              "latency_table", f"conv={conv}", *(() if self.version == 1 else (f"conv={self.conv}",)))
        missing = [f for f in families if f not in self.families]
        if missing:
            raise OptionError(f"{{0}} {literal(source)} holds no {', '.join(missing)} forms (it has "
                              f"{', '.join(self.families) or 'none'}): profile the model again with this onnx-gdws",
                              "latency_table")
        if conv == "auto" and error_budget is not None and self.error_budget is not None \
                and abs(error_budget - self.error_budget) > 1e-12:
            raise OptionError(f"{{0}} {literal(source)} holds the forms of error budget {self.error_budget:g}, not "
                              f"{error_budget:g}: give {{1}} {self.error_budget:g} or profile again at this budget",
                              "latency_table", "error_budget")

    def to_dict(self) -> dict:
        """The JSON form (batch keys as strings, as JSON has them)."""
        d = asdict(self)
        d["model_ms"] = {str(b): t for b, t in d["model_ms"].items()}
        return {"format": d.pop("format"), "version": d.pop("version"), **d}

    def save(self, path: str) -> None:
        """Write the table as JSON, atomically."""
        write_json_atomic(path, self.to_dict(), indent=1, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict, source: str = "the table") -> LatencyTable:
        """A table from its JSON form; OptionError (on `latency_table`) if it is not one this
        version reads."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise OptionError(f"{{0}} {literal(source)} is not an onnx-gdws latency table "
                              "(written by `onnx-gdws profile`)", "latency_table")
        if d.get("version") not in READS:
            raise OptionError(f"{{0}} {literal(source)} has format version {literal(d.get('version'))}; this "
                              f"onnx-gdws reads versions {', '.join(map(str, READS))}: profile the model again with it",
                              "latency_table")
        try:
            layers = {name: [LayerMeasurement(**m) for m in ms] for name, ms in d["layers"].items()}
            bad = [m.key for ms in layers.values() for m in ms
                   if any(not isinstance(m.ratio.get(k), (int, float, str)) for k in MEASUREMENT_FIELDS)]
            if bad:
                raise ValueError(f"measurement {bad[0]} lacks a field of {MEASUREMENT_FIELDS}")
            return cls(environment=dict(d["environment"]), key_environment=dict(d["key_environment"]),
                       model=dict(d["model"]), batches=[int(b) for b in d["batches"]],
                       model_ms={int(b): float(t) for b, t in d["model_ms"].items()}, layers=layers,
                       conv=str(d.get("conv", "gdws")), families=[str(f) for f in d.get("families", [])],
                       error_budget=None if d.get("error_budget") is None else float(d["error_budget"]),
                       version=int(d["version"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise OptionError(f"{{0}} {literal(source)} is malformed: {literal(e)}", "latency_table") from None

    @classmethod
    def load(cls, path: str) -> LatencyTable:
        """Read a table file; OptionError (on `latency_table`) if it cannot be read or is not one."""
        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as e:
            raise OptionError(f"cannot read {{0}} {literal(path)}: {literal(e.strerror)}", "latency_table") from None
        except ValueError as e:
            raise OptionError(f"{{0}} {literal(path)} is not JSON: {literal(e)}", "latency_table") from None
        return cls.from_dict(data, path)
