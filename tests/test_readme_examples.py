"""The example outputs of README.md and docs/*.md are what the commands print
(tools/readme_examples.py); the README leads in at most 300 lines; the links between these files
resolve.

The fast deterministic blocks are run and compared exactly here; the timed and the slow ones
are checked with `python tools/readme_examples.py --check` on a quiet machine.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import readme_examples  # noqa: E402

SAMPLE = """text
<!-- example: timing -->
```
$ onnx-gdws optimize m.onnx -o o.onnx --target latency \\
    --batch 1
│ conv1 │ 3x3 │ skipped: not measurably faster on cpu (best layer ratio 1.38 [1.31-1.45]) │
│ conv2 │ 3x3 │ rewritten (gather+dw+pw), layer ratio 0.62 [0.58-0.66]                     │
latency on cpu (layer cache hits 0, misses 12):
```

<!-- example: exact, slow -->
```
$ onnx-gdws optimize m.onnx -o e.onnx -q
$ onnx-gdws validate m.onnx e.onnx
acc 88.20%
```

```
plain code, not an example
```

```
$ onnx-gdws bench m.onnx o.onnx
ratio 1.2
```
"""


def test_blocks_are_parsed_with_their_kind_and_commands():
    timing, slow, bench = readme_examples.parse(SAMPLE)
    assert (timing.kind, timing.slow, slow.kind, slow.slow) == ("timing", False, "exact", True)
    assert timing.commands[0].line == "onnx-gdws optimize m.onnx -o o.onnx --target latency --batch 1"
    assert len(timing.commands[0].output) == 3
    assert [c.line.split()[1] for c in slow.commands] == ["optimize", "validate"]
    assert slow.commands[0].output == [] and slow.commands[1].output == ["acc 88.20%"]
    assert readme_examples.select([timing, slow, bench], "exact", fast=True) == [bench]
    # a block runs after the earlier blocks that write what it reads, and only those
    assert readme_examples.needed([timing, slow, bench], [bench]) == [timing, bench]
    assert readme_examples.needed([timing, slow, bench], [slow]) == [slow]


def test_blocks_of_several_files_are_told_apart_and_run_in_file_order(tmp_path):
    """Blocks at the same line of two files are different blocks; a block reads what a block of an
    earlier file wrote."""
    first, second = tmp_path / "a.md", tmp_path / "b.md"
    first.write_text("```\n$ onnx-gdws optimize m.onnx -o w.onnx\n```\n")
    second.write_text("```\n$ onnx-gdws bench m.onnx w.onnx\n```\n")
    writer, reader = readme_examples.parse_files([first, second])
    assert writer.start == reader.start and writer.key != reader.key
    assert readme_examples.needed([writer, reader], [reader]) == [writer, reader]
    assert readme_examples.needed([writer, reader], [writer]) == [writer]


def test_the_documentation_files_are_the_readme_then_docs():
    paths = readme_examples.files()
    assert paths[0] == readme_examples.README
    assert {p.name for p in paths[1:]} >= {"cli.md", "results.md", "methods.md", "auto.md", "python.md"}


def test_timed_output_is_compared_by_its_skeleton():
    timing, slow, _ = readme_examples.parse(SAMPLE)
    shown = timing.commands[0].output
    renumbered = [line.replace("1.38", "2.07").replace("0.62", "0.71").replace("12", "9") for line in shown]
    assert readme_examples.differences(timing, [renumbered[::-1]]) == []  # numbers and row order may change
    restatused = [line.replace("rewritten (gather+dw+pw)", "skipped: reverted") for line in shown]
    assert readme_examples.differences(timing, [restatused])  # statuses may not
    assert readme_examples.differences(slow, [[], ["acc 88.10%"]])  # exact blocks: every character


def test_write_replaces_only_the_outputs_of_the_blocks_given():
    fresh = {("onnx-gdws optimize m.onnx -o e.onnx -q", "onnx-gdws validate m.onnx e.onnx"): [[], ["acc 90.00%"]]}
    new, n = readme_examples.write(SAMPLE, fresh)
    assert n == 1 and "acc 90.00%" in new and "acc 88.20%" not in new
    assert new.replace("acc 90.00%", "acc 88.20%") == SAMPLE


def test_the_fast_exact_examples_are_current():
    every = readme_examples.parse_files(readme_examples.files())
    chosen = readme_examples.select(every, "exact", fast=True)
    assert chosen, "README.md and docs/*.md have no fast exact example left to check"
    problems = readme_examples.check(every, chosen)
    assert not problems, ("example output is out of date; regenerate it with "
                          "`python tools/readme_examples.py --write`:\n" + "\n\n".join(problems))


def test_the_readme_leads_in_at_most_300_lines():
    assert readme_examples.README_MAX_LINES == 300
    assert readme_examples.readme_length_problem() is None, readme_examples.readme_length_problem()
    assert readme_examples.readme_length_problem(limit=10)  # and it would say so


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, spaces
    to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and (m := re.match(r"#{1,6} (.+)", line)):
            a = _anchor(m.group(1))
            n = seen.get(a, 0)
            seen[a] = n + 1
            out.add(a if n == 0 else f"{a}-{n}")
    return out


def test_the_anchor_rule_is_githubs():
    assert _anchor("Paper width: the decisive table (`models/vgg16_fmnist_fgsm.onnx`)") == \
        "paper-width-the-decisive-table-modelsvgg16_fmnist_fgsmonnx"
    assert _anchor("`--target latency` on onnx's light zoo (never slower)") == \
        "--target-latency-on-onnxs-light-zoo-never-slower"


def test_the_links_of_the_readme_and_docs_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists and, with a
    #fragment into a markdown file, a heading of that file."""
    broken = []
    for path in readme_examples.files():
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)  # not inside code blocks
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http:, mailto:
            file, _, fragment = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_first_command_runs_on_the_shipped_model(tmp_path, monkeypatch):
    """The README's opening command (install, then the main job on a shipped model) works as
    written: here its `onnx-gdws` part, writing into a temporary folder. What it keeps is timed
    and so not asserted; that it ends with a valid model is."""
    import shlex

    import onnx
    from click.testing import CliRunner

    from gdws_onnx.cli import main

    text = readme_examples.README.read_text()
    first = next(ln.strip() for ln in text.splitlines() if ln.startswith("    pip install -e . && onnx-gdws "))
    argv = shlex.split(first.split(" && ", 1)[1])[1:]
    model = ROOT / argv[1]
    assert argv[0] == "optimize" and model.is_file()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    argv[1] = str(model)
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 0, r.output
    out = onnx.load(tmp_path / argv[argv.index("-o") + 1])
    original = onnx.load(model, load_external_data=False)
    assert [i.name for i in out.graph.input] == [i.name for i in original.graph.input]
    assert out.ir_version == original.ir_version and "wrote" in r.output


def test_prose_numbers_match_their_recorded_measurements(tmp_path):
    """Every claim of docs/measured/claims.json is in its file and equals its recorded value
    (tools/measured_claims.py); a changed text or a changed record is caught."""
    import json
    import shutil

    sys.path.insert(0, str(ROOT / "tools"))
    import measured_claims

    assert measured_claims.problems() == []
    claims = json.loads((ROOT / "docs" / "measured" / "claims.json").read_text())["claims"]
    assert {c["format"] for c in claims} == {"ratio", "accuracy", "count"} and len(claims) >= 10
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "README.md", copy / "README.md")
    first = claims[0]
    readme = copy / first["file"]
    readme.write_text(readme.read_text().replace(first["text"], "0.999 [0.998-0.999]"))
    assert any("is not in the text" in p for p in measured_claims.problems(copy))
    shutil.copy(ROOT / first["file"], readme)
    record = copy / "docs" / "measured" / f"{first['from']}.json"
    data = json.loads(record.read_text())
    node = data
    for k in first["key"][:-1]:
        node = node[k]
    node[first["key"][-1]] = [0.5, 0.4, 0.6]
    record.write_text(json.dumps(data))
    assert any("gives '0.500 [0.400-0.600]'" in p for p in measured_claims.problems(copy))
