"""The prose numbers of README.md and docs/*.md that come from a measurement, tied to it.

A timed or attacked number cannot be re-measured in the test suite, but it can be tied to the
report of the command that measured it. `--record` keeps the few values a claim needs from such a
report (`onnx-gdws bench --report`, `validate --report`, `evaluate -o`, `optimize --report`) in
docs/measured/NAME.json; docs/measured/claims.json lists each claim: the file, the text it shows,
the record and the value's key. `--check` (and tests/test_readme_examples.py) fails when a claimed
text is missing from its file or differs from the recorded value, so a re-measurement that is
recorded but not written into the prose (or the other way round) is caught.

    python tools/measured_claims.py --record auto_bench out/auto/bench_all.json   # after re-measuring
    python tools/measured_claims.py --check

Formats: ratio "0.167 [0.165-0.173]" (median [95 % CI]); accuracy "86.7 / 77.3" (clean / robust,
percent); count "12 of 13".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ROOT / "docs" / "measured"
CLAIMS = MEASURED / "claims.json"


def summarize(report: dict) -> dict:
    """The values claims can use, from one report: bench ratios by batch and candidate, clean and
    robust accuracy, the rewritten-conv count."""
    if "runs" in report:  # onnx-gdws bench --report
        return {"ratios": {str(run["batch"]): {r["candidate"]: [r["median"], r["ci_low"], r["ci_high"]]
                                               for r in run["ratios"]} for run in report["runs"]}}
    if "original" in report and "optimized" in report:  # validate --report
        return {side: [report[side]["clean_accuracy"], report[side]["robust_accuracy"]]
                for side in ("original", "optimized")}
    if "result" in report and "settings" in report:  # evaluate -o
        return {"result": [report["result"]["clean_accuracy"], report["result"]["robust_accuracy"]],
                "by_attack": report["result"]["robust_accuracy_by_attack"]}
    if "summary" in report:  # optimize --report
        s = report["summary"]
        return {"rewritten": [s["rewritten"], s["convs"]], "families": s.get("families", {})}
    raise SystemExit("not a bench, validate, evaluate or optimize report")


def value(record: dict, key: list) -> object:
    for k in key:
        record = record[k]
    return record


def render(v: object, fmt: str) -> str:
    if fmt == "ratio":
        return f"{v[0]:.3f} [{v[1]:.3f}-{v[2]:.3f}]"
    if fmt == "accuracy":
        return f"{100 * v[0]:.1f} / {100 * v[1]:.1f}"
    if fmt == "count":
        return f"{v[0]} of {v[1]}"
    raise ValueError(f"unknown format {fmt!r}")


def problems(root: Path = ROOT) -> list[str]:
    """Every claim whose text is not in its file, or does not match its recorded value."""
    measured = root / "docs" / "measured"
    claims = json.loads((measured / "claims.json").read_text())["claims"]
    out = []
    for c in claims:
        record = json.loads((measured / f"{c['from']}.json").read_text())
        expected = render(value(record, c["key"]), c["format"])
        text = (root / c["file"]).read_text()
        if c["text"] != expected:
            out.append(f"{c['file']}: claims {c['text']!r} but {c['from']} {c['key']} gives {expected!r}")
        elif c["text"] not in " ".join(text.split()):
            out.append(f"{c['file']}: the claimed {c['text']!r} ({c['from']} {c['key']}) is not in the text")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--record", nargs=2, metavar=("NAME", "REPORT"))
    p.add_argument("--check", action="store_true")
    a = p.parse_args(argv)
    if a.record:
        name, report = a.record
        MEASURED.mkdir(parents=True, exist_ok=True)
        summary = {"source": os.path.relpath(report, ROOT) if os.path.isabs(report) else report,
                   **summarize(json.loads(Path(report).read_text()))}
        (MEASURED / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    if a.check:
        bad = problems()
        for line in bad:
            print(line, file=sys.stderr)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
