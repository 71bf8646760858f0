"""The clairvoyant bound (`streamtc.bench.bound`): its schedule search against exhaustive enumeration
on small made-up tables, and its action measurements against forwards run here."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from torch.nn import functional as TF
from transformers import Dinov2Config, Dinov2Model

from streamtc.bench.bound import ActionTable, best_mean_schedule, best_worst_frame, bound_rows, curves, measure_actions
from streamtc.errors import InputError
from streamtc.tokens import token_cosine


def made_up_table(frames: int, seed: int) -> ActionTable:
    """Random cosines; reuse at one ratio (cost 0.3), skip, and two downscale grids (0.35 and 0.55)."""
    rng = random.Random(seed)
    table = ActionTable(frames, reuse_cost={0.25: 0.3})
    for reference in range(frames):
        for frame in range(reference + 1, frames):
            table.reuse[(reference, frame, 0.25)] = rng.uniform(0.3, 1.0)
            table.skip[(reference, frame)] = rng.uniform(0.2, 1.0)
    table.downscale = [[(rng.uniform(0.7, 0.95), 0.35, "a"), (rng.uniform(0.8, 0.97), 0.55, "b")] for _ in range(frames)]
    return table


def every_schedule(table: ActionTable) -> list[tuple[list[float], float]]:
    """(cosines, total cost) of every sequence of actions, by brute force."""
    out = []

    def walk(frame: int, reference: int | None, cosines: list[float], cost: float) -> None:
        if frame == table.frames:
            out.append((cosines, cost))
            return
        for cosine, action_cost, after, _ in table.options(frame, reference):
            walk(frame + 1, after, cosines + [cosine], cost + action_cost)

    walk(0, None, [], 0.0)
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_the_schedule_search_finds_what_exhaustive_enumeration_finds(seed: int, budget: float) -> None:
    table = made_up_table(5, seed)
    schedules = every_schedule(table)
    affordable = [(c, cost) for c, cost in schedules if cost <= budget * table.frames + 1e-9]
    best_mean = max(sum(c) / len(c) for c, _ in affordable)
    best = best_mean_schedule(table, budget, step=0.01)
    assert best.cost <= budget + 1e-9 and len(best.cosines) == table.frames
    # Costs are counted in buckets of 0.01 rounded up, so the search may miss a schedule that fits
    # only by less than a bucket per frame; with these costs (multiples of 0.05) it misses none.
    assert sum(best.cosines) / table.frames == pytest.approx(best_mean, abs=1e-12)
    assert best_worst_frame(table, budget, tolerance=1e-6) == pytest.approx(max(min(c) for c, _ in affordable), abs=1e-5)


def test_without_skipping_the_search_never_uses_it_and_does_no_better() -> None:
    table = made_up_table(5, 7)
    with_skip, without = best_mean_schedule(table, 0.4, step=0.01), best_mean_schedule(table, 0.4, skip=False, step=0.01)
    assert "skip" not in without.actions and sum(without.cosines) <= sum(with_skip.cosines) + 1e-12
    assert best_mean_schedule(table, 1.0, step=0.01).actions == ["R"] * 5  # everything affordable: refresh all


def tiny_dinov2() -> Dinov2Model:
    torch.manual_seed(0)
    return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                                    patch_size=8, attn_implementation="eager")).eval()


def test_measured_actions_match_forwards_run_here() -> None:
    """Reuse at update ratio 1 recomputes every token (the full forward again); skip is the cosine of
    two full forwards; a downscale is the tower's forward on the resized frame, resized back."""
    tower = tiny_dinov2()
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    table = measure_actions(tower, x, ratios=(1.0, 0.25), max_gap=1)
    with torch.no_grad():
        full = tower(pixel_values=x).last_hidden_state[:, 1:]
        small = TF.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)  # a 4 x 4 grid
        last = tower(pixel_values=small, output_hidden_states=True).hidden_states[-1]
        grid = TF.interpolate(last[:, 1:].reshape(3, 4, 4, -1).permute(0, 3, 1, 2), size=(7, 7), mode="bilinear",
                              align_corners=False).permute(0, 2, 3, 1).reshape(3, 49, -1)
        downscaled = tower.layernorm(torch.cat([last[:, :1], grid], 1))[:, 1:]
    assert set(table.reuse) == {(0, 1, 1.0), (1, 2, 1.0), (0, 1, 0.25), (1, 2, 0.25)} and set(table.skip) == {(0, 1), (1, 2)}
    assert table.reuse[(0, 1, 1.0)] == pytest.approx(1.0, abs=1e-5) and table.reuse[(0, 1, 0.25)] < 0.999
    assert table.reuse_cost[1.0] == pytest.approx(1.0, abs=0.05) and 0.1 < table.reuse_cost[0.25] < 0.5
    for reference, frame in ((0, 1), (1, 2)):
        assert table.skip[(reference, frame)] == pytest.approx(float(token_cosine(full[reference], full[frame])), abs=1e-6)
    assert [label for _, _, label in table.downscale[0]] == ["4x4", "5x5", "6x6"]  # from half the side up
    assert table.downscale[2][0][0] == pytest.approx(float(token_cosine(downscaled[2], full[2])), abs=1e-5)
    rows = bound_rows(table, (0.5, 1.0))
    assert rows[1]["cosine_mean"] == pytest.approx(1.0) and rows[1]["best_worst_frame"] == pytest.approx(1.0, abs=1e-3)
    assert rows[0]["cost"] <= 0.5 + 1e-9 and math.isfinite(rows[0]["best_worst_frame"])
    assert rows[0]["cosine_mean_without_skip"] <= rows[0]["cosine_mean"] + 1e-12


def test_a_reference_serves_only_within_the_gap() -> None:
    table = made_up_table(4, 1)
    assert all(label not in ("skip", "reuse 0.25") for *_, label in table.options(2, None))
    assert any(label == "skip" for *_, label in table.options(3, 0))
    assert not any(label == "skip" for *_, label in made_up_table(12, 1).options(10, 0))  # 10 frames back


@pytest.mark.parametrize("budgets", ["0.5,x", "0,0.5", "1.5"])
def test_the_command_refuses_bad_budgets_before_loading_anything(budgets: str) -> None:
    from typer.testing import CliRunner

    from streamtc.cli import app

    result = CliRunner().invoke(app, ["bench", "bound", "--streams", "demo@1", "--budgets", budgets])
    assert result.exit_code == 2 and "budget" in result.output


def vit_run(video: str, fps: float, kind: str, robust: list[float], robust_flops: float) -> dict:
    return {"video": video, "fps": fps, "kind": kind, "variants": [
        {"name": "full", "per_frame_token_cosine": [1.0] * len(robust), "flop_ratio": 1.0},
        {"name": "robust", "per_frame_token_cosine": robust, "flop_ratio": robust_flops}]}


def bound_stream(label: str, kind: str, cosines: list[float], cost: float, best_worst: float) -> dict:
    return {"stream": label, "kind": kind, "frames": len(cosines),
            "rows": [{"per_frame_cosine": cosines, "cost": cost, "best_worst_frame": best_worst}]}


def test_curves_pool_each_kind_and_each_stream_over_their_frames() -> None:
    vit = {"runs": [vit_run("a", 1.0, "steady", [0.9, 0.7], 0.6), vit_run("b", 2.0, "steady", [1.0, 0.8, 0.6, 0.5], 0.3),
                    vit_run("c", 1.0, "cuts", [0.4], 0.9)]}
    bound = {"budgets": [0.5], "streams": [bound_stream("a at 1 fps", "steady", [1.0, 0.9], 0.5, 0.9),
                                           bound_stream("b at 2 fps", "steady", [1.0, 1.0, 0.9, 0.8], 0.45, 0.8)]}
    (steady,) = curves(vit, bound)  # "c" is not in the bound: not shown
    assert steady["group"] == "steady" and steady["frames"] == 6 and steady["streams"] == ["a at 1 fps", "b at 2 fps"]
    robust, best = steady["rows"]
    assert robust["name"] == "robust" and robust["flop_ratio"] == pytest.approx((2 * 0.6 + 4 * 0.3) / 6)
    assert robust["cosine_mean"] == pytest.approx(4.5 / 6) and robust["cosine_min"] == 0.5
    assert robust["cosine_p10"] == pytest.approx(0.55)  # numpy's linear 10th percentile of the six
    assert best["name"] == "bound, budget 0.5" and best["best_worst_frame"] == 0.8 and best["cosine_mean"] == pytest.approx(5.6 / 6)
    assert [group["group"] for group in curves(vit, bound, by="stream")] == ["a at 1 fps", "b at 2 fps"]
    with pytest.raises(InputError, match="lacks the streams"):
        curves({"runs": vit["runs"][:1]}, bound)


def test_the_command_refuses_a_report_without_its_streams(tmp_path) -> None:
    from typer.testing import CliRunner

    from streamtc.cli import app

    report = tmp_path / "real.json"
    report.write_text(json.dumps({"runs": [vit_run("demo", 1.0, "cuts", [1.0], 1.0)]}))
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "bound", "--streams", "demo@2", "--against", str(report)])
    assert result.exit_code == 2 and "lacks the streams" in result.output
    result = runner.invoke(app, ["bench", "bound", "--streams", "demo@1", "--against", str(tmp_path / "none.json")])
    assert result.exit_code == 2 and "cannot read" in result.output


def family_run(video: str, fps: float, kind: str, variants: dict[str, tuple[list[float], float]]) -> dict:
    """A `bench vit --weights` run: variant name -> (per-frame cosines, FLOP ratio), after "full" and
    "full (control)" (a `curves` row, not drawn)."""
    frames = len(next(iter(variants.values()))[0])
    return {"video": video, "fps": fps, "kind": kind, "variants": [
        *({"name": name, "per_frame_token_cosine": [1.0] * frames, "flop_ratio": 1.0} for name in ("full", "full (control)")),
        *({"name": name, "per_frame_token_cosine": cosines, "flop_ratio": flops} for name, (cosines, flops) in variants.items())]}


def full_row(budget: float, cosines: list[float], cost: float, best_worst: float) -> dict:
    return {"budget": budget, "per_frame_cosine": cosines, "cost": cost, "best_worst_frame": best_worst,
            "cosine_mean": sum(cosines) / len(cosines), "cosine_p10": min(cosines), "cosine_min": min(cosines)}


def family_reports() -> tuple[dict, dict]:
    """Two "steady" streams (1 frame and 3 frames) and one "cuts" stream (1 frame), bound at budgets 0.3
    and 0.6; the variants are named as `bench vit --weights` names them, one or two per family."""
    def variants(cosines: tuple, flops: tuple) -> dict[str, tuple[list[float], float]]:
        names = ("stc N=2 r=0.25", "robust (N=2 budget)", "robust (N=2 budget), no hints", "stc N=4 r=0.25",
                 "adaptive pixels budget 2, subsample over budget", "skip frames, every 2nd", "codec skip, change > 0.5")
        return dict(zip(names, zip(cosines, flops)))

    a = variants(*zip(([0.9], 0.7), ([1.0], 0.6), ([0.3], 0.6), ([0.5], 0.4), ([0.2], 0.7), ([1.0], 1.0), ([1.0], 1.0)))
    b = variants(*zip(([0.8, 0.6, 1.0], 0.5), ([0.9, 0.9, 0.9], 0.6), ([0.3, 0.3, 0.3], 0.6), ([0.7, 0.9, 0.5], 0.2),
                      ([0.2, 0.2, 0.2], 0.7), ([1.0, 0.4, 1.0], 0.5), ([1.0, 1.0, 1.0], 1.0)))
    c = {name: ([0.5], 0.5) for name in a}
    vit = {"runs": [family_run("demo", 1.0, "steady", a), family_run("carphone", 2.0, "steady", b),
                    family_run("cup", 2.0, "cuts", c)]}
    streams = [("demo at 1 fps", "steady", [([0.95], 0.3, 0.95), ([1.0], 0.6, 1.0)]),
               ("carphone at 2 fps", "steady", [([0.9, 0.8, 1.0], 0.3, 0.8), ([1.0, 0.9, 1.0], 0.6, 0.9)]),
               ("cup at 2 fps", "cuts", [([0.7], 0.3, 0.7), ([0.8], 0.6, 0.8)])]
    bound = {"budgets": [0.3, 0.6], "streams": [
        {"stream": label, "kind": kind, "frames": len(rows[0][0]),
         "rows": [full_row(budget, *row) for budget, row in zip((0.3, 0.6), rows)]} for label, kind, rows in streams]}
    bound["pooled"] = [full_row(0.3, [0.95, 0.9, 0.8, 1.0, 0.7], 0.3, 0.7), full_row(0.6, [1.0, 1.0, 0.9, 1.0, 0.8], 0.6, 0.8)]
    return vit, bound


@pytest.mark.parametrize(("name", "family"), [
    ("stc N=4 r=0.25", "stc N="), ("robust (N=4 budget)", "robust ("), ("robust (N=2 budget), no hints", "other"),
    ("robust (N=2 budget), codec+keys tokens", "other"), ("skip frames, rate 0.479 (= N=4)", "skip frames"),
    ("drop tokens, keep 0.66 (= N=2)", "drop tokens"), ("codec skip, change > 0.25", "codec skip"),
    ("downscale every frame, 12x12 (0.54)", "downscale every frame"), ("bound, budget 0.479", "bound, budget"),
    ("adaptive pixels budget 2, subsample over budget", "other")])
def test_each_variant_name_falls_in_its_family(name: str, family: str) -> None:
    from streamtc.bench.bound import curve_family

    assert curve_family(name) == family


def test_the_curves_plot_draws_each_family_pooled_per_kind_in_flop_order(tmp_path) -> None:
    from streamtc.bench.bound import plot_curves

    vit, bound = family_reports()
    drawn = plot_curves(curves(vit, bound), tmp_path / "plots" / "bound.curves.png")
    assert (tmp_path / "plots" / "bound.curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(drawn) == ["steady", "cuts"]
    steady = drawn["steady"]
    assert set(steady) == {"stc N=", "robust (", "skip frames", "codec skip", "bound, budget", "other"}
    # Points are (FLOP ratio weighted by frames, cosine mean, numpy's linear 10th percentile) over the
    # four frames of the kind, sorted by FLOP ratio: N=4 (cheaper) before N=2, whatever the report's order.
    expected = {"stc N=": [(0.25, 0.65, 0.5), (0.55, 0.825, 0.66)],
                "robust (": [(0.6, 0.925, 0.9)],
                "skip frames": [(0.625, 0.85, 0.58)],
                "codec skip": [(1.0, 1.0, 1.0)],
                "bound, budget": [(0.3, 0.9125, 0.83), (0.6, 0.975, 0.93)],
                "other": [(0.6, 0.3, 0.3), (0.7, 0.2, 0.2)]}  # the no-hints ablation and the adaptive row
    for family, points in expected.items():
        assert steady[family] == [pytest.approx(point) for point in points], family
    assert drawn["cuts"]["stc N="] == [pytest.approx((0.5, 0.5, 0.5))] * 2
    assert drawn["cuts"]["bound, budget"] == [pytest.approx((0.3, 0.7, 0.7)), pytest.approx((0.6, 0.8, 0.8))]


def test_the_command_writes_the_curves_plot_beside_the_report(tmp_path, monkeypatch) -> None:
    """With --against and --output, `bench bound` writes <stem>.curves.png and says so (the measurement
    and the weights replaced by the made-up bound report)."""
    from typer.testing import CliRunner

    import streamtc.bench.bound
    import streamtc.weights
    from streamtc.cli import app

    vit, bound = family_reports()
    monkeypatch.setattr(streamtc.weights, "load_dinov2_small", lambda: (None, None))
    monkeypatch.setattr(streamtc.bench.bound, "run_bound", lambda *args, **kwargs: json.loads(json.dumps(bound)))
    (tmp_path / "real.json").write_text(json.dumps(vit))
    args = ["bench", "bound", "--streams", "demo@1,carphone@2,cup@2", "--budgets", "0.3,0.6",
            "--against", str(tmp_path / "real.json")]
    result = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "bound.json")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bound.curves.png").is_file() and "bound.curves.png" in result.output.replace("\n", "")
    assert [g["group"] for g in json.loads((tmp_path / "bound.json").read_text())["curves_by_kind"]] == ["steady", "cuts"]
    result = CliRunner().invoke(app, args)  # no --output: no plot
    assert result.exit_code == 0 and "curves.png" not in result.output
