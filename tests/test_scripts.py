"""The scripts under scripts/ stay runnable: every Python script imports (its imports from streamtc
resolve; main is not run), every shell script parses, and the GPU check's dry run passes on this
CPU machine with the current environment (`bash scripts/gpu-check.sh --dry-run --no-install`), as
it must on the day a GPU is lent."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
PYTHON_SCRIPTS = sorted(SCRIPTS.glob("*.py"))
SHELL_SCRIPTS = sorted(SCRIPTS.glob("*.sh"))


def test_the_scripts_folder_is_what_these_tests_read() -> None:
    assert [p.name for p in PYTHON_SCRIPTS] == ["gpu_bench.py"]
    assert {p.name for p in SHELL_SCRIPTS} >= {"gpu-check.sh", "gpu-wheels.sh", "setup.sh", "test.sh"}


@pytest.mark.parametrize("path", PYTHON_SCRIPTS, ids=lambda p: p.name)
def test_every_python_script_imports(path: Path) -> None:
    spec = importlib.util.spec_from_file_location(f"scripts_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs its imports; `main` only runs under __main__
    assert callable(module.main)


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_every_shell_script_parses(path: Path) -> None:
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_the_gpu_check_refuses_an_unknown_argument() -> None:
    result = subprocess.run(["bash", str(SCRIPTS / "gpu-check.sh"), "--bogus"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and "unknown argument --bogus" in result.stderr


@pytest.mark.slow
def test_the_gpu_check_dry_run_passes_on_the_cpu(tmp_path: Path) -> None:
    """The whole check's plumbing with this Python (first on PATH, as in an activated venv): the gpu
    tier collected, the tiny ViT and pre-fill benchmarks run, their JSON written, every step ok."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = ["bash", str(SCRIPTS / "gpu-check.sh"), "--dry-run", "--no-install", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = (tmp_path / "steps.txt").read_text().splitlines()
    assert [line.split()[0] for line in steps] == ["gpu-tests", "vit-fp32", "vit-bf16", "prefill"]
    assert all(line.split()[1] == "ok" for line in steps)
    assert "tests/test_gpu.py::" in (tmp_path / "gpu-tests.log").read_text()
    for name in ("bench-vit-float32.json", "bench-vit-bfloat16.json", "bench-prefill-float32.json"):
        part = json.loads((tmp_path / name).read_text())
        assert all("error" not in p for p in part["passes"]) and part["environment"]
    assert "stc N=2 eager" in (tmp_path / "table.txt").read_text()
