"""`streamtc bench vit` on a tiny tower and real footage: paired per-frame ratios, the refresh
schedule, the FLOP model and fidelity, for the baseline, its control and a cacher."""

from __future__ import annotations

import math

import pytest

from streamtc.bench.vit import Variant, load_benchmark_frames, run_vit_benchmark
from streamtc.config import CacherConfig
from streamtc.measure import environment
from streamtc.presets import build_config, build_model

from cacher_reference import counted_flop_ratio
from helpers import tiny_dinov2_and_head

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
    assert set(report["environment"]) == set(environment())  # the record every result carries
    assert report["environment"]["config"]["preset"] == "tiny-siglip"


def test_cacher_rows_follow_the_schedule_the_flop_model_and_differ_from_full(report):
    layer = build_model("tiny-siglip", num_layers=1).encoder.layers[0]
    tokens = report["tokens_per_frame"]
    for name in ("stc N=2", "stc N=2, torch kernels"):
        row = by_name(report)[name]
        assert row["refresh_frames"] == FRAMES // 2
        expected = counted_flop_ratio(layer, tokens, 0.25, 2)  # torch's count on an independent implementation
        assert row["flop_ratio"] == pytest.approx(expected, rel=1e-9)
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


# ---------------------------------------------------------------------------------------------
# Real-weights mode on a tiny DINOv2 with a random saliency head: baselines at matched cost and
# saliency fidelity (the published weights run in `streamtc bench vit --weights dinov2-s`).




@pytest.fixture(scope="module")
def real_mode_report():
    import numpy as np
    import torch

    from streamtc.bench.vit import load_frames_at_rate, real_weights_variants
    from streamtc.weights import normalize_frames

    tower, head = tiny_dinov2_and_head()
    frames = load_frames_at_rate("demo", 1.0)[:5]
    pixel_values = torch.nn.functional.interpolate(normalize_frames(torch.from_numpy(np.ascontiguousarray(frames))), size=56)
    variants = real_weights_variants(tokens=50, width=32, mlp_width=128, prefix=1)
    return run_vit_benchmark(pixel_values, preset="tiny-dinov2", model=tower, head=head, variants=variants, repeats=1,
                             warmup=0)


def test_real_mode_reports_saliency_and_class_token_fidelity(real_mode_report):
    full = by_name(real_mode_report)["full"]
    assert full["saliency_corr_min"] == pytest.approx(1.0) and full["saliency_kl_max"] == pytest.approx(0.0, abs=1e-6)
    assert full["cls_cosine_mean"] == pytest.approx(1.0)
    stc = by_name(real_mode_report)["stc N=2 r=0.25"]
    assert stc["refresh_pattern"] == "R.R.R"
    assert stc["saliency_corr_min"] < 0.9999 and stc["saliency_kl_mean"] > 0


def test_a_frame_encoded_again_after_its_reuse_check_is_marked_and_left_out_of_the_per_kind_times():
    import torch

    tower, head = tiny_dinov2_and_head()
    still = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    frames = torch.cat([still + 0.01 * i * still.roll(1, dims=-1) for i in range(2)])  # reused by the pixels
    variants = (Variant("full", None), Variant("checked", CacherConfig.robust(2, reuse_check=1e-9)),
                Variant("unchecked", CacherConfig.robust(2, reuse_check=None)))
    rows = by_name(run_vit_benchmark(frames, preset="tiny-dinov2", model=tower, head=head, variants=variants,
                                     repeats=1, warmup=0))
    assert rows["unchecked"]["refresh_pattern"] == "R." and rows["checked"]["refresh_pattern"] == "Rd"
    assert math.isnan(rows["checked"]["downscale_frame_ratio"]) and rows["checked"]["refresh_frames"] == 1


def test_baselines_run_at_their_cost_and_frame_skipping_reuses_the_last_full_frame(real_mode_report):
    rows = by_name(real_mode_report)
    skip = rows["skip frames, every 2nd"]
    assert skip["kind"] == "FrameSkipping" and skip["refresh_pattern"] == "R.R.R" and skip["flop_ratio"] == pytest.approx(3 / 5)
    cosines = skip["per_frame_token_cosine"]
    assert cosines[0] == pytest.approx(1.0) and cosines[2] == pytest.approx(1.0) and cosines[1] < 0.999
    drop = next(v for v in real_mode_report["variants"] if v["kind"] == "UniformTokenDropping")
    assert 0.3 < drop["flop_ratio"] < 0.8 and max(drop["per_frame_token_cosine"]) < 0.9999


def test_token_dropping_that_keeps_every_token_is_the_tower_and_frame_skipping_follows_its_rate():
    import torch

    from streamtc.baselines.vit import FrameSkipping, UniformTokenDropping

    tower, _ = tiny_dinov2_and_head()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.allclose(UniformTokenDropping(1.0)(tower, x), tower(pixel_values=x).last_hidden_state, atol=1e-5)
    schedule = FrameSkipping(0.4)
    pattern = []
    for _ in range(10):
        pattern.append(schedule.encodes_next())
        schedule.frames += 1
        schedule.encoded += pattern[-1]
        schedule.last = x
    assert sum(pattern) == 4 and pattern[0]


def test_refresh_signal_study_correlates_both_signals_with_the_reused_cosine():
    import torch

    from streamtc.bench.real_footage import refresh_signal_study

    tower, _ = tiny_dinov2_and_head()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 3, 56, 56, generator=g)
    # Growing motion away from frame 0, then a cut: more pixel change goes with a lower cosine.
    sequence = torch.cat([base + 0.2 * i * torch.randn(1, 3, 56, 56, generator=g) for i in range(4)]
                         + [torch.randn(1, 3, 56, 56, generator=g)])
    study = refresh_signal_study(tower, sequence, max_gap=2)
    assert study["pairs"] == 4 + 3 - 0 and len(study["signals"]) == 2
    pixels = study["signals"]["pixels (minus relative change)"]
    assert pixels["spearman"] > 0.3 and -1 <= pixels["pearson"] <= 1
