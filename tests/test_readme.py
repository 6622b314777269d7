"""The README as a new user meets it: every Python block runs as written, every `tiercache` command line in
it parses, and the first screen holds the two commands and a result that names its machine.

A block that cannot run here (it needs a GPU or vLLM) carries `<!-- readme-test: skip (reason) -->` on
the line before its opening fence; it is reported as skipped, with the reason.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((.+?)\)\s*-->")


def blocks(lang: str) -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason or None) of every ```lang block."""
    lines = README.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == f"```{lang}":
            start = i + 1
            j = start
            while lines[j].strip() != "```":
                j += 1
            m = SKIP.search(lines[i - 1]) if i else None
            out.append((start + 1, "\n".join(lines[start:j]), m.group(1) if m else None))
            i = j
        i += 1
    return out


PYTHON = blocks("python")


def test_the_readme_has_python_blocks():
    assert len(PYTHON) >= 2


@pytest.mark.parametrize("line,code,skip", PYTHON, ids=[f"README.md:{n}" for n, _, _ in PYTHON])
def test_python_block_runs(line, code, skip, tmp_path, monkeypatch, capsys):
    if skip:
        pytest.skip(skip)
    if "transformers" in code:
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


def commands() -> list[list[str]]:
    """Every `tiercache ...` command line of the bash blocks (continuations joined, comments cut)."""
    out = []
    for _, code, _ in blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("tiercache "):
                out.append(shlex.split(line)[1:])
    return out


@pytest.mark.parametrize("argv", commands(), ids=lambda a: " ".join(a)[:60])
def test_command_lines_parse(argv):
    """Each command line the README shows is accepted by that command's own parser."""
    from tiercache import cli
    from tiercache.tools import bench, demo, plan

    cmd, rest = argv[0], argv[1:]
    assert cmd in cli._COMMANDS, f"README shows an unknown command: {cmd}"
    parsers = {"demo": demo.build_parser().parse_args, "plan": plan.build_parser().parse_args,
               "bench": bench.parse_args}
    if cmd in parsers:
        parsers[cmd](rest)  # argparse exits (SystemExit 2) on an unknown option or a bad value


def test_first_screen_has_the_two_commands_and_a_result_naming_its_machine():
    text = README.read_text()
    first = "\n".join(text.splitlines()[:45])
    assert "tiercache demo" in first and "python -m pytest -q" in first
    assert "cores" in first and "Xeon" in first   # the measured result says what it ran on
    for placeholder in ("DEMO_OUTPUT", "PLAN_OUTPUT"):
        assert placeholder not in text
    demo_block = next(code for _, code, _ in blocks("text") if "tiercache demo  model" in code)
    assert "speedup" in demo_block and " cores" in demo_block  # the demo's own output names the machine
