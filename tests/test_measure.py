"""The measurement layer: clock, peak memory, the environment record, and that every result kind
(`run --output`, `bench vit`, `bench pipeline`, `bench pruner`, `eval run`) carries the same record."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from streamtc import measure
from streamtc.checks import is_positive_int, positive_int
from streamtc.errors import ConfigError, InputError
from streamtc.tokens import token_cosine

ENVIRONMENT_KEYS = {"date", "versions", "machine", "torch_threads", "git", "config"}


def test_timed_returns_the_result_and_at_least_the_time_spent() -> None:
    result, ms = measure.timed(lambda: time.sleep(0.02) or 7)
    assert result == 7 and ms >= 20.0  # a sleep never returns early: a lower bound holds under any load


def test_peak_memory_sees_a_large_allocation_after_a_reset() -> None:
    measure.reset_peak_memory("cpu")
    block = np.ones(96 * 2**20, dtype=np.uint8)  # 96 MiB, touched
    assert measure.peak_memory_bytes("cpu") >= 96 * 2**20
    del block


def test_the_environment_record_names_what_produced_a_result() -> None:
    record = measure.environment("cpu", {"frames": [2, 4]})
    assert set(record) == ENVIRONMENT_KEYS
    versions = record["versions"]
    assert versions["torch"] == torch.__version__ and versions["streamtc"] and versions["transformers"]
    assert {"python", "numpy", "av"} <= set(versions)
    assert record["machine"]["cpu_count"] and record["machine"]["device"] == "cpu"
    assert record["torch_threads"] == torch.get_num_threads() and record["config"] == {"frames": [2, 4]}
    assert json.loads(json.dumps(record)) == record  # JSON as it is


def test_every_result_kind_carries_the_same_environment_record(tmp_path) -> None:
    """bench pruner and run --output here; bench vit, bench pipeline and eval run in their own files
    assert the same key set on their reports."""
    from typer.testing import CliRunner

    from streamtc.cli import app

    runner = CliRunner()
    out = tmp_path / "pruner.json"
    result = runner.invoke(app, ["bench", "pruner", "--frames", "1", "--repeats", "1", "--warmup", "0",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert set(json.loads(out.read_text())["environment"]) == ENVIRONMENT_KEYS
    out = tmp_path / "run.json"
    result = runner.invoke(app, ["run", "demo", "--max-seconds", "1", "--fps", "1", "--ask", "1:What?",
                                 "--max-new-tokens", "1", "--output", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert set(record["environment"]) == ENVIRONMENT_KEYS
    assert record["environment"]["config"]["stc"] == record["stc"] and record["environment"]["config"]["fps"] == 1.0


# -- validation once ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -3, 2.0, True, "4", None])
def test_positive_int_refuses_what_is_not_a_count(value) -> None:
    with pytest.raises(ConfigError, match=rf"frames must be an int >= 1, got {value!r}"):
        positive_int(value, "frames")
    assert not is_positive_int(value)


def test_positive_int_optional_error_type_and_hint() -> None:
    assert positive_int(None, "history", optional=True) is None and positive_int(3, "history") == 3
    with pytest.raises(ConfigError, match=r"history must be None or an int >= 1 \(None is unbounded\), got 0"):
        positive_int(0, "history", optional=True, hint="None is unbounded")
    with pytest.raises(InputError, match="max_new_tokens must be an int >= 1"):
        positive_int(0, "max_new_tokens", error=InputError)


def test_token_cosine_per_frame_and_for_one_frame() -> None:
    a = torch.randn(3, 5, 8)
    assert torch.allclose(token_cosine(a, a), torch.ones(3))
    assert torch.allclose(token_cosine(a, -a), -torch.ones(3))
    assert token_cosine(a[0], a[0]).shape == ()


# -- the paired time ratio of `run --compare` --------------------------------------------------------


def test_paired_ratio_marks_noise_and_real_differences() -> None:
    rng = random.Random(3)
    base = [10.0 + rng.uniform(-3, 3) for _ in range(12)]
    noisy = [b * (1.6 if i % 2 else 0.6) for i, b in enumerate(base)]  # as often slower as faster
    assert measure.paired_ratio(base, noisy)["noise"]
    faster = measure.paired_ratio(base, [0.4 * b * rng.uniform(0.9, 1.1) for b in base])
    assert not faster["noise"] and faster["low"] <= faster["ratio"] <= faster["high"] < 1.0
    assert measure.paired_ratio(base[:2], [b / 2 for b in base[:2]])["noise"]  # two frames say nothing


@pytest.mark.parametrize("factor, noise", [(1.004, True), (0.996, True), (1.006, False), (0.994, False)])
def test_an_interval_printed_as_one_is_within_noise(factor: float, noise: bool) -> None:
    """Every frame `factor` times slower: the interval is [factor, factor]; printed to two decimals,
    1.004 reads "1.00", which shows no difference, while 1.006 reads "1.01"."""
    base = [10.0 + i for i in range(8)]
    ratio = measure.paired_ratio(base, [factor * b for b in base])
    assert ratio["low"] == pytest.approx(factor) and ratio["high"] == pytest.approx(factor)
    assert ratio["noise"] is noise


def test_importing_the_measurement_layer_imports_no_torch() -> None:
    code = "import sys, streamtc.measure; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
