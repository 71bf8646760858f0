"""`streamtc bench pipeline` on the tiny preset and real footage: every field for every variant,
and timings that move when the timed work moves (a variant with an injected sleep)."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from streamtc.bench.pipeline import CSV_FIELDS, PipelineSettings, load_video_frames, run_pipeline_benchmark, write_outputs
from streamtc.cli import app
from streamtc.errors import ConfigError
from streamtc.measure import environment

# Every test here reads one report of seven variants streamed twice: minutes on a loaded 2-core machine.
pytestmark = pytest.mark.slow
from streamtc.variants import VARIANTS as VARIANTS_BY_NAME
from streamtc.variants import Variant as PipelineVariant

DELAY_MS = 250.0  # large next to the tiny preset's frame time, so a loaded machine cannot hide it


@pytest.fixture(scope="module")
def report():
    variants = [VARIANTS_BY_NAME[name] for name in ("none", "stc", "pruner dual_anchor 25%", "tome 25%",
                                                    "visionzip 25%", "cacher N=2")]
    variants.append(PipelineVariant("none + sleep", delay_ms=DELAY_MS))
    settings = PipelineSettings(frames=(2, 4), repeats=2, warmup_frames=1, max_new_tokens=3)
    return run_pipeline_benchmark(settings, variants, frames=load_video_frames("demo", 4))


def rows_of(report, name):
    return {row["frames"]: row for row in report["rows"] if row["variant"] == name}


def test_every_variant_has_every_field_at_every_checkpoint(report):
    assert {(r["variant"], r["frames"]) for r in report["rows"]} == {
        (v["name"], n) for v in report["variants"] for n in (2, 4)}
    for row in report["rows"]:
        for name in CSV_FIELDS:
            if name.startswith("vit_cosine") and row["variant"] == "tome 25%":
                assert row[name] is None  # merged tokens have no per-token counterpart
            else:
                assert row[name] is not None, (row["variant"], name)
        for name in ("vit_ms_per_frame", "prefill_ms", "push_ms", "ttft_ms", "peak_memory_bytes", "kv_cache_bytes"):
            assert row[name] > 0, (row["variant"], name)
        assert len(row["vit_frame_ms"]) == row["frames"]
    assert report["environment"]["versions"]["torch"] and report["settings"]["frames"] == [2, 4]
    assert set(report["environment"]) == set(environment())  # the record every result carries
    assert "proxies" in report["note"]


def test_the_uncompressed_variant_is_the_reference(report):
    for row in rows_of(report, "none").values():
        assert row["vit_ratio"] == row["prefill_ratio"] == row["e2e_speedup"] == 1.0
        assert row["next_token_kl"] == 0.0 and row["answer_agreement"] == 1.0
        assert row["vit_cosine_min"] == pytest.approx(1.0, abs=1e-6)


def test_an_injected_sleep_shows_up_where_it_was_put(report):
    """A sleep never returns early, so its lower bounds hold on any machine, however loaded; the
    one upper bound keeps half of what a misplaced sleep would add as its margin."""
    base, slow = rows_of(report, "none")[4], rows_of(report, "none + sleep")[4]
    assert slow["vit_ms_per_frame"] >= DELAY_MS  # every vision forward holds one sleep
    assert slow["push_ms"] >= 4 * DELAY_MS  # four frames pushed, four sleeps inside the push
    assert slow["e2e_speedup"] < 1.0
    # The sleep is in the ViT, not in the pre-fill: counted there, the four frames' pre-fill would
    # carry 4 * DELAY_MS more than the uncompressed one; a busy machine moves it by far less.
    assert slow["prefill_ms"] < base["prefill_ms"] + 2 * DELAY_MS
    assert slow["next_token_kl"] == pytest.approx(0.0, abs=1e-6) and slow["answer_agreement"] == 1.0


def test_compression_shows_in_tokens_and_kv_cache(report):
    base = rows_of(report, "none")[4]
    for name in ("stc", "pruner dual_anchor 25%", "tome 25%", "visionzip 25%"):
        row = rows_of(report, name)[4]
        assert row["tokens_per_frame"] < base["tokens_per_frame"] == 16
        assert row["kv_cache_bytes"] < base["kv_cache_bytes"]
    cacher = rows_of(report, "cacher N=2")[4]
    assert cacher["tokens_per_frame"] == 16 and cacher["vit_cosine_min"] < 1.0  # reused tokens differ a little
    assert cacher["vit_cosine"][0] == pytest.approx(1.0, abs=1e-5)  # frame 1 is a refresh frame


def test_outputs_json_csv_and_plots(report, tmp_path):
    paths = write_outputs(report, tmp_path)
    assert {p.name for p in paths} == {"report.json", "report.csv", "latency_vs_frames.png", "fidelity_vs_speedup.png"}
    assert json.loads((tmp_path / "report.json").read_text())["rows"][0]["variant"] == "none"
    with (tmp_path / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(report["rows"]) and set(rows[0]) == set(CSV_FIELDS)
    assert all(p.stat().st_size > 1000 for p in paths if p.suffix == ".png")


def test_settings_and_variants_are_validated():
    with pytest.raises(ConfigError, match="first variant"):
        run_pipeline_benchmark(PipelineSettings(frames=(1,)), [VARIANTS_BY_NAME["stc"]])
    with pytest.raises(ConfigError, match="frames"):
        PipelineSettings(frames=(0,))
    with pytest.raises(ConfigError, match="baseline"):
        PipelineVariant("x", baseline="magic")
    with pytest.raises(ConfigError, match="GPU only"):
        PipelineSettings(preset="llava-ov-7b", device="cpu")


def test_cli_runs_and_writes_the_report(tmp_path):
    result = CliRunner().invoke(app, ["bench", "pipeline", "--frames", "2", "--variants", "stc,uniform 25%",
                                      "--repeats", "1", "--warmup-frames", "0", "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["none", "stc", "uniform 25%"]
    assert "2 frames" in result.output and "proxies" in result.output
    listing = CliRunner().invoke(app, ["bench", "pipeline", "--list"])
    assert listing.exit_code == 0 and "tome 25%" in listing.output
    assert VARIANTS_BY_NAME["stc"].describe() == "Cacher N=2 r=0.25 (per_layer, fixed refresh); Pruner gaussian 30%"
    bad = CliRunner().invoke(app, ["bench", "pipeline", "--variants", "warp drive"])
    assert bad.exit_code != 0 and "unknown variants" in bad.output
