"""The documentation's example outputs, kept current: run every ```-fenced block of README.md and
docs/*.md that starts with `$ onnx-gdws ...`, and compare its printed output with the one shown,
or write it back.

    python tools/readme_examples.py --list             # the blocks, their kind, their commands
    python tools/readme_examples.py --check            # run them all; exit 1 if any differs
    python tools/readme_examples.py --check --kind exact --fast   # what tests/test_readme_examples.py runs
    python tools/readme_examples.py --write            # regenerate the outputs in the files
    python tools/readme_examples.py --list --file docs/cli.md     # one file only (repeatable)

A block is marked by an HTML comment on the line before its fence (no comment: exact):

    <!-- example: exact -->        deterministic output, compared character for character
    <!-- example: timing -->       output that depends on measured time: compared by its skeleton
                                   (numbers blanked, table borders and spacing dropped, lines
                                   sorted), so headers, row names and statuses must match, numbers not
    <!-- example: exact, slow -->  ... and too slow for the test suite (`--fast` skips it)

Inside a block each `$ onnx-gdws ...` line is a command (a trailing backslash continues it) and
the lines up to the next `$ ` line are its standard output. The files are read in the order of
`files()`: README.md, then docs/*.md sorted by name. The blocks run in that order in one scratch
folder, each after the earlier blocks that write a file it reads (`-o`, `--report`, `--out` of an
earlier command named in a later one; an earlier block may sit in an earlier file), with
`models/` linked to the repository's, a fresh latency cache (XDG_CACHE_HOME), and `onnx-gdws` run
as `python -m gdws_onnx` from this checkout. Run them one at a time on a quiet machine: the timing
blocks measure latency.

`--check` also fails when README.md is longer than README_MAX_LINES: the README leads, the
measurements and the command reference live in docs/.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 300
PROMPT = "$ "
MARK = re.compile(r"<!--\s*example:\s*([a-z, ]+?)\s*-->")
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?[kMG%x]?")
BORDERS = re.compile(r"[\u2500-\u257f]")  # box-drawing characters


@dataclass
class Command:
    """One `$ command` of a block and the output the README shows for it."""

    line: str  # as written after the prompt, continuations joined
    output: list[str] = field(default_factory=list)


@dataclass
class Block:
    """A fenced example block: where it is (file and line), its kind and its commands."""

    start: int  # index of the opening fence line
    end: int  # index of the closing fence line
    kind: str  # "exact" or "timing"
    slow: bool
    commands: list[Command]
    path: str = ""  # the file it was read from, relative to the repository ("" for a string)

    @property
    def key(self) -> tuple[str, int]:
        """Where the block is: unique across files."""
        return (self.path, self.start)

    @property
    def where(self) -> str:
        return f"{self.path or '<text>'}:{self.start + 1}"


def files() -> list[Path]:
    """The files whose example blocks are checked, in the order they run: README.md, then
    docs/*.md sorted by name."""
    return [README, *sorted(DOCS.glob("*.md"))]


def _relative(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def parse(text: str, path: str = "") -> list[Block]:
    """Every fenced block of `text` whose first line is a `$ onnx-gdws` command (`path`: the
    file the text came from, recorded in each block)."""
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```") and i + 1 < len(lines) and lines[i + 1].startswith(PROMPT + "onnx-gdws"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            mark = MARK.search(lines[i - 1]) if i > 0 else None
            words = {w.strip() for w in mark.group(1).split(",")} if mark else {"exact"}
            kind = "timing" if "timing" in words else "exact"
            blocks.append(Block(i, end, kind, "slow" in words, _commands(lines[i + 1:end]), path))
            i = end
        i += 1
    return blocks


def parse_files(paths: list[Path]) -> list[Block]:
    """The example blocks of every file in `paths`, file after file, each in its file's order."""
    return [b for path in paths for b in parse(Path(path).read_text(), _relative(path))]


def readme_length_problem(path: Path = README, limit: int = README_MAX_LINES) -> str | None:
    """A message if the README is longer than `limit` lines, else None."""
    n = len(Path(path).read_text().splitlines())
    return (f"{_relative(path)} has {n} lines, more than {limit}: move measurements to docs/results.md "
            "and command reference to docs/cli.md") if n > limit else None


def _commands(body: list[str]) -> list[Command]:
    out: list[Command] = []
    k = 0
    while k < len(body):
        line = body[k]
        if line.startswith(PROMPT):
            cmd = line[len(PROMPT):]
            while cmd.endswith("\\") and k + 1 < len(body):
                k += 1
                cmd = cmd[:-1].rstrip() + " " + body[k].strip()
            out.append(Command(cmd))
        elif out:
            out[-1].output.append(line)
        k += 1
    return out


def run(cmd: Command, cwd: str, env: dict[str, str]) -> list[str]:
    """Run one command (onnx-gdws as `python -m gdws_onnx` of this checkout); its stdout lines,
    trailing spaces stripped. A failing command raises RuntimeError with its stderr."""
    argv = shlex.split(cmd.line)
    if argv[0] != "onnx-gdws":
        raise RuntimeError(f"not an onnx-gdws command: {cmd.line}")
    proc = subprocess.run([sys.executable, "-m", "gdws_onnx", *argv[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{cmd.line}` exited {proc.returncode}:\n{proc.stderr.strip()}")
    lines = [line.rstrip() for line in proc.stdout.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def skeleton(lines: list[str]) -> list[str]:
    """What a timing-dependent output must keep: its lines with numbers blanked to '#', table
    borders and runs of spaces dropped, sorted (rows ordered by time may swap), blank lines
    and border-only lines left out."""
    out = []
    for line in lines:
        s = " ".join(BORDERS.sub(" ", NUMBER.sub("#", line)).split())
        if s:
            out.append(s)
    return sorted(out)


def differences(block: Block, outputs: list[list[str]]) -> list[str]:
    """Unified diffs between what the file shows and what the commands printed ([] if none)."""
    problems = []
    for cmd, got in zip(block.commands, outputs):
        want = [line.rstrip() for line in cmd.output]
        if block.kind == "timing":
            want, got = skeleton(want), skeleton(got)
        if want != got:
            diff = difflib.unified_diff(want, got, block.path or "README.md", "now", lineterm="", n=1)
            problems.append(f"{block.where}: $ {cmd.line}  ({block.kind})\n" + "\n".join(diff))
    return problems


class Scratch:
    """A scratch folder with `models/` linked to the repository's, and the environment to run in."""

    def __enter__(self) -> tuple[str, dict[str, str]]:
        self._tmp = tempfile.TemporaryDirectory(prefix="readme-examples-")
        path = self._tmp.name
        os.symlink(ROOT / "models", os.path.join(path, "models"))
        env = {**os.environ, "XDG_CACHE_HOME": os.path.join(path, "cache"),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        return path, env

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()


OUTPUT_FLAGS = ("-o", "--output", "--report", "--out")


def _writes(cmd: Command) -> set[str]:
    """The files a command writes (the values of its output flags)."""
    argv = shlex.split(cmd.line)
    return {argv[i + 1] for i, a in enumerate(argv[:-1]) if a in OUTPUT_FLAGS}


def needed(blocks: list[Block], chosen: list[Block]) -> list[Block]:
    """The chosen blocks and, before them, every other block that writes a file a later needed
    command reads (an argument that is not one of its own outputs), in the order of `blocks`
    (files in the order of `files()`, each in its own order)."""
    keep = {b.key for b in chosen}
    wanted: set[str] = set()
    for b in reversed(blocks):
        if b.key in keep or any(_writes(c) & wanted for c in b.commands):
            keep.add(b.key)
            for c in b.commands:
                wanted |= set(shlex.split(c.line)[1:]) - _writes(c)
    return [b for b in blocks if b.key in keep]


def run_blocks(blocks: list[Block], chosen: list[Block]) -> dict[tuple[str, int], list[list[str]]]:
    """The outputs of the chosen blocks' commands (keyed by `Block.key`), run in the order of
    `blocks` in one scratch folder, after the blocks that write the files they read (`needed`)."""
    keys = {b.key for b in chosen}
    out = {}
    with Scratch() as (cwd, env):
        for b in needed(blocks, chosen):
            outputs = [run(c, cwd, env) for c in b.commands]
            if b.key in keys:
                out[b.key] = outputs
    return out


def check(blocks: list[Block], chosen: list[Block]) -> list[str]:
    """Run the chosen blocks (and what they depend on) and return their differences from the
    files (empty: all current)."""
    outputs = run_blocks(blocks, chosen)
    return [p for b in chosen for p in differences(b, outputs[b.key])]


def write(text: str, fresh: dict[tuple[str, ...], list[list[str]]]) -> tuple[str, int]:
    """`text` with the body of each block whose commands are a key of `fresh` replaced by those
    commands and their outputs (blocks found again in `text`: it may have been edited while the
    commands ran). Returns the new text and how many blocks it replaced."""
    lines = text.split("\n")
    todo = [(b, fresh[key]) for b in parse(text) if (key := tuple(c.line for c in b.commands)) in fresh]
    for block, outs in sorted(todo, key=lambda p: -p[0].start):
        body = []
        for cmd, out in zip(block.commands, outs):
            body += [PROMPT + cmd.line, *out]
        lines[block.start + 1:block.end] = body
    return "\n".join(lines), len(todo)


def select(blocks: list[Block], kind: str, fast: bool) -> list[Block]:
    return [b for b in blocks if (kind == "all" or b.kind == kind) and not (fast and b.slow)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="run the blocks and compare (exit 1 on a difference)")
    mode.add_argument("--write", action="store_true", help="run the blocks and write their outputs into their files")
    mode.add_argument("--list", action="store_true", help="list the blocks")
    p.add_argument("--kind", choices=["all", "exact", "timing"], default="all")
    p.add_argument("--fast", action="store_true", help="leave out blocks marked slow")
    p.add_argument("--file", "--readme", dest="files", action="append", metavar="PATH",
                   help="only the blocks of this file (repeatable; default: README.md and docs/*.md). "
                        "Blocks of the other files still run first where they write a file these read")
    a = p.parse_args(argv)
    every = parse_files(files())
    only = {_relative(Path(f)) for f in a.files} if a.files else None
    if only:
        every += parse_files([Path(f) for f in a.files if _relative(Path(f)) not in {b.path for b in every}])
    chosen = [b for b in select(every, a.kind, a.fast) if only is None or b.path in only]
    if a.list:
        for b in chosen:
            print(f"{b.where}: {b.kind}{', slow' if b.slow else ''}: "
                  + "; ".join(c.line for c in b.commands))
        return 0
    if a.write:
        outputs = run_blocks(every, chosen)
        fresh = {tuple(c.line for c in b.commands): outputs[b.key] for b in chosen}
        for path in dict.fromkeys(b.path for b in chosen):
            target = ROOT / path
            new, n = write(target.read_text(), fresh)  # read again: others may have edited it
            target.write_text(new)
            print(f"wrote {n} example block(s) into {path}")
        return 0
    problems = check(every, chosen)
    if (too_long := readme_length_problem()) and (only is None or _relative(README) in only):
        problems.append(too_long)
    for prob in problems:
        print(prob, end="\n\n")
    print(f"{len(problems)} problem(s): command output differs, or the README is too long" if problems
          else f"{len(chosen)} example block(s) current")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
