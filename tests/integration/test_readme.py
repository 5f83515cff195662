"""The README's offline walkthroughs run as written (blocks marked ``<!-- readme-test: ... -->``).

The bash block is run command by command through the CLI entry point in a fresh folder (one
process, so the models load once); the python block is executed as a script. A command that a
change breaks, renames or makes slower to type fails here before a newcomer finds it.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from vitdecomp.cli.main import main

README = Path(__file__).resolve().parents[2] / "README.md"


def _block(kind: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- readme-test: {kind} -->\n```\w+\n(.*?)\n```", text, re.S)
    assert match, f"the README has no block marked readme-test: {kind}"
    return match.group(1)


def _commands(block: str) -> list[list[str]]:
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


def test_the_offline_walkthrough_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = _commands(_block("offline"))
    assert len(commands) >= 10 and all(c[0] == "vitdecomp" for c in commands)
    for words in commands:
        assert main(words[1:]) == 0, f"README command failed: {' '.join(words)}"
    # what the block promises exists
    for produced in ("labels.json", "scores/score.json", "swin-align/align.json", "swin-labels.json",
                     "ablation/ablate.json", "maps/heatmaps.json", "seg/results.json"):
        assert (tmp_path / produced).is_file(), produced


def test_the_python_walkthrough_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _block("python")
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    stack, heat = namespace["stack"], namespace["heat"]
    assert stack.error() <= 1e-5
    assert tuple(heat.patch.shape) == (2, 8, 8)


@pytest.mark.parametrize("kind", ["offline", "python"])
def test_walkthroughs_use_only_offline_models(kind):
    block = _block(kind)
    specs = re.findall(r"(?:--model |load\(\"|decompose )(\S+?:\S+)", block)
    assert specs and all(s.strip('"').startswith("synth:") for s in specs), specs
