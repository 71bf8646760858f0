"""Every `--help` and every argument refusal answers without importing torch or transformers (their
import alone takes seconds on a small machine): each command runs as a user runs it, in its own
process, which reports at exit which of the two it imported. No clock is read; the timings are in
docs/benchmarks.md ("CLI refusals and --help")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
# `streamtc ARGS`, reporting at exit (also after SystemExit) the heavy modules it imported
WRAPPER = ("import atexit, sys\n"
           "atexit.register(lambda: print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules),"
           " file=sys.stderr))\n"
           "from streamtc.cli import main\n"
           "sys.argv = ['streamtc', *sys.argv[1:]]\n"
           "main()\n")

HELP = [[], ["run"], ["presets"], ["variants"], ["bench"], ["bench", "vit"], ["bench", "pipeline"],
        ["bench", "pruner"], ["bench", "soak"], ["eval"], ["eval", "run"], ["eval", "report"],
        ["eval", "benchmarks"], ["serve"]]

REFUSALS = [  # arguments, a piece of the message
    (["run", "{missing}"], "no such video file"),
    (["run", "{folder}"], "is a directory; give a video file"),
    (["run", "{text}"], "cannot open as video"),
    (["run", "demo", "--preset", "nosuch"], "is not a preset"),
    (["run", "demo", "--memory", "bogus"], "choose from full, window"),
    (["run", "demo", "--fps", "nan"], "must be a finite number > 0"),
    (["run", "demo", "--ask", "soon:what?"], "SECONDS:QUESTION"),
    (["run", "demo", "--variant", "warp drive"], "unknown variant"),
    (["run", "demo", "--compare", "--no-stc"], "drop --no-stc"),
    (["run", "demo", "--output", "{text}/run.json"], "cannot be written"),
    (["serve", "--host", "0.0.0.0"], "give --token TOKEN"),
    (["serve", "--token", "short"], "at least 8 characters"),
    (["eval", "run", "ovobench", "{missing}", "--videos", "{folder}", "--output", "{folder}/o.jsonl", "--protocol",
      "bogus"], "--protocol must be one of"),
    (["bench", "vit", "--suite", "bogus"], "--suite takes"),
    (["bench", "pipeline", "--frames", "a,b"], "--frames takes"),
]


def streamtc(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.mark.parametrize("command", HELP, ids=lambda c: " ".join(c) or "streamtc")
def test_help_imports_neither_torch_nor_transformers(command: list[str]) -> None:
    result = streamtc(*command, "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Usage: streamtc" in result.stdout
    assert "HEAVY []" in result.stderr, result.stderr


@pytest.mark.parametrize("args, message", REFUSALS, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_a_refusal_imports_neither_torch_nor_transformers(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("not a video\n")
    paths = {"missing": tmp_path / "missing.mp4", "folder": tmp_path / "folder", "text": tmp_path / "notes.txt"}
    result = streamtc(*(a.format(**paths) for a in args))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in " ".join((result.stdout + result.stderr).replace("│", " ").split())
    assert "Traceback" not in result.stdout + result.stderr
    assert "HEAVY []" in result.stderr, result.stderr


def test_the_memory_names_of_the_command_line_are_the_memories() -> None:
    from streamtc.cli.common import MEMORY_KINDS
    from streamtc.memory import MEMORIES

    assert MEMORY_KINDS == MEMORIES
