"""`streamtc bench vit` on a tiny tower and real footage: paired per-frame ratios, the refresh
schedule, the FLOP model and fidelity, for the baseline, its control and a cacher."""

from __future__ import annotations

import pytest

from streamtc.bench.vit import Variant, load_benchmark_frames, run_vit_benchmark
from streamtc.cacher import functional as F
from streamtc.config import CacherConfig
from streamtc.presets import build_config

FRAMES = 4


@pytest.fixture(scope="module")
def report():
    variants = (
        Variant("full", None),
        Variant("full (control)", None),
        Variant("stc N=2", CacherConfig(cache_interval=2)),
        Variant("stc N=2, torch kernels", CacherConfig(cache_interval=2, cpu_kernels="torch")),
    )
    pixel_values = load_benchmark_frames("demo", FRAMES, build_config("tiny-siglip").image_size)
    return run_vit_benchmark(pixel_values, preset="tiny-siglip", num_layers=2, variants=variants, repeats=2, warmup=0)


def by_name(report):
    return {v["name"]: v for v in report["variants"]}


def test_the_baseline_is_its_own_reference(report):
    full = by_name(report)["full"]
    assert full["time_ratio"] == full["refresh_frame_ratio"] == 1.0
    assert full["token_cosine_min"] == pytest.approx(1.0)
    control = by_name(report)["full (control)"]
    assert control["refresh_frames"] == FRAMES and control["time_ratio"] > 0
    assert control["token_cosine_min"] == pytest.approx(1.0)


def test_cacher_rows_follow_the_schedule_the_flop_model_and_differ_from_full(report):
    config = build_config("tiny-siglip", num_layers=2)
    tokens = report["tokens_per_frame"]
    for name in ("stc N=2", "stc N=2, torch kernels"):
        row = by_name(report)[name]
        assert row["refresh_frames"] == FRAMES // 2
        expected = F.flop_ratio(tokens, config.hidden_size, config.intermediate_size, 0.25, 2)
        assert row["flop_ratio"] == pytest.approx(expected)
        cosines = row["per_frame_token_cosine"]
        assert cosines[0] == pytest.approx(1.0, abs=1e-5) and cosines[2] == pytest.approx(1.0, abs=1e-5)
        assert min(cosines[1], cosines[3]) < 0.999
        assert len(row["time_ratio_per_repeat"]) == 2 and len(row["per_frame_ms"]) == FRAMES
    # Same algorithm, different kernels: the same fidelity to float rounding.
    a, b = by_name(report)["stc N=2"], by_name(report)["stc N=2, torch kernels"]
    assert a["per_frame_token_cosine"] == pytest.approx(b["per_frame_token_cosine"], abs=1e-5)


def test_the_first_variant_must_be_the_baseline():
    with pytest.raises(ValueError, match="baseline"):
        run_vit_benchmark(load_benchmark_frames("demo", 1, 56), preset="tiny-siglip",
                          variants=(Variant("stc", CacherConfig()),))


def test_the_table_keeps_whole_names_and_shows_no_nan(report, capsys):
    from streamtc.bench.vit import print_report

    print_report(report)
    out = capsys.readouterr().out
    for variant in report["variants"]:
        assert variant["name"] in out
    assert "nan" not in out.lower()
    full = next(line for line in out.splitlines() if line.startswith("│ full "))
    assert "│ - │" in " ".join(full.split())  # the unpatched tower has no non-refresh frame


def test_plots_are_written_beside_the_report(report, tmp_path):
    from streamtc.bench.vit import write_plots

    paths = write_plots(report, tmp_path / "vit.json")
    assert [p.name for p in paths] == ["vit_per_frame.png", "vit_fidelity.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    assert report["variants"][2]["per_frame_refresh"] == [True, False, True, False]
