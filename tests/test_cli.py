"""`streamtc run` end to end on a real clip with the tiny preset, and its error handling; the command
line's start-up imports nothing heavy; `streamtc bench pruner`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from streamtc.cli import app
from streamtc.errors import ConfigError
from streamtc.sources import builtin_clip_path

runner = CliRunner()


def test_run_compare_on_a_real_clip_writes_answers_and_stats(tmp_path):
    out = tmp_path / "run.json"
    result = runner.invoke(app, ["run", str(builtin_clip_path()), "--compare", "--fps", "1", "--max-seconds", "4",
                                 "--ask", "2:What is happening?", "--max-new-tokens", "4", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "STC / no STC" in result.output and "random weights" in result.output
    report = json.loads(out.read_text())
    base, stc = report["stats"]["no STC"], report["stats"]["STC"]
    assert base["frames"] == stc["frames"] == 5
    assert stc["visual_tokens"] < base["visual_tokens"] == base["visual_tokens_encoded"]
    # the default Cacher is the robust profile, given the file's codec side data with every frame
    assert report["cacher_profile"] == {"no STC": None, "STC": "robust"} and "STC robust" in result.output
    assert report["stc"]["STC"]["cacher"]["refresh"] == "budget" and stc["cacher"]["hinted_chunks"] == 5
    assert stc["cacher"]["refresh_chunks"] >= 1 and stc["cacher"]["flop_ratio"] < 1.0
    assert [a["question"] for a in report["answers"]["STC"]] == ["What is happening?"]
    assert report["stc"]["STC"]["cacher"]["cache_interval"] == 2
    flops = " ".join(result.output.split())  # the console wraps long lines
    assert f"ViT FLOPs [STC]: {stc['cacher']['flop_ratio']:.2f} of a full encode" in flops
    assert "ViT FLOPs [no STC]" not in flops


def test_the_summary_says_why_a_cacher_that_saved_flops_took_longer(capsys):
    from types import SimpleNamespace

    from streamtc.cli.run import _print_vit_flops

    def summary(time_ratio: float, cacher: dict | None) -> str:
        stats = {"no STC": {"vit_ms_per_frame": 2.0, "cacher": None}, "STC": {"vit_ms_per_frame": 3.0, "cacher": cacher}}
        _print_vit_flops(SimpleNamespace(stats=stats, ratios={"vit_ms": {"ratio": time_ratio}}))
        return " ".join(capsys.readouterr().out.split())

    counts = {"flop_ratio": 0.61, "chunks": 10, "refresh_chunks": 3, "downscaled_chunks": 2, "subsampled_chunks": 0,
              "failed_reuses": 1}
    slower = summary(1.5, counts)
    assert ("ViT FLOPs [STC]: 0.61 of a full encode of the same frames (chunks: 3 refreshed, 5 reused, 2 downscaled; "
            "1 reuse rejected by the check and encoded again)") in slower
    assert "note: STC's ViT did fewer FLOPs than no STC's but took 1.50× its time: at 2.0 ms a frame" in slower
    faster = summary(0.7, {**counts, "failed_reuses": 0, "subsampled_chunks": 1})
    assert "ViT FLOPs [STC]: 0.61" in faster and "note:" not in faster
    assert "(chunks: 3 refreshed, 4 reused, 2 downscaled, 1 subsampled)" in faster
    assert summary(1.5, None) == ""  # no Cacher: no FLOP count, nothing to explain


def test_run_with_the_papers_cacher_refreshes_every_other_chunk(tmp_path):
    out = tmp_path / "run.json"
    result = runner.invoke(app, ["run", str(builtin_clip_path()), "--cacher", "paper", "--fps", "1", "--max-seconds",
                                 "4", "--max-new-tokens", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["cacher_profile"] == {"STC": "paper"} and report["stc"]["STC"]["cacher"]["refresh"] == "fixed"
    assert report["stats"]["STC"]["cacher"]["refresh_chunks"] == 3  # N = 2 over 5 one-frame chunks
    assert runner.invoke(app, ["run", "demo", "--cacher", "fast"]).exit_code == 2


def test_missing_video_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "streamtc.cli", "run", str(tmp_path / "nope.mp4")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "nope.mp4" in result.stdout and "Traceback" not in result.stdout + result.stderr


def test_bad_ask_spec_is_rejected():
    result = runner.invoke(app, ["run", "demo", "--ask", "soon:what?"])
    assert result.exit_code != 0
    assert "SECONDS:QUESTION" in result.output


def test_run_with_a_bounded_window_keeps_the_cache_small(tmp_path):
    out = tmp_path / "run.json"
    result = runner.invoke(app, ["run", "demo", "--no-stc", "--fps", "1", "--max-seconds", "4", "--ask", "3:What?",
                                 "--max-new-tokens", "2", "--window-tokens", "32", "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    stats = report["stats"]["no STC"]
    assert report["memory"]["kind"] == "window" and report["memory"]["window_tokens"] == 32
    assert stats["visual_tokens"] == 5 * 16  # 5 frames pre-filled ...
    per_token = 2 * 2 * 2 * 16 * 4  # keys and values x 2 layers x 2 KV heads x 16 dims x fp32 (tiny Qwen2)
    assert stats["kv_cache_bytes"] == per_token * (stats["prompt_tokens"] + 2 * 16)  # ... the cache: prefix + 2 frames
    assert stats["cache_tokens"] == stats["prompt_tokens"] + 2 * 16


def test_run_with_retrieval_memory_on_disk_reports_the_memory(tmp_path):
    out = tmp_path / "run.json"
    result = runner.invoke(app, ["run", "demo", "--no-stc", "--fps", "1", "--max-seconds", "4", "--ask", "3:What?",
                                 "--max-new-tokens", "2", "--memory", "retrieval", "--window-tokens", "32",
                                 "--retrieve-frames", "1", "--offload-dir", str(tmp_path / "blocks"),
                                 "--offload-budget", "1000000", "--output", str(out)])
    assert result.exit_code == 0, result.output
    memory = json.loads(out.read_text())["stats"]["no STC"]["memory"]
    assert memory["window_frames"] == 2 and memory["offloaded_blocks"] == 3 and memory["questions"] == 1
    assert memory["last_retrieved_blocks"] == 1  # at 3 s: two frames offloaded, one retrieved per layer
    assert "retrieval, " in result.output and "3 blocks offloaded" in result.output
    assert not (tmp_path / "blocks").exists() or not any((tmp_path / "blocks").iterdir())  # closed: no files left
    bad = runner.invoke(app, ["run", "demo", "--memory", "window", "--offload-dir", str(tmp_path)])
    assert isinstance(bad.exception, ConfigError) and "retrieval memory" in str(bad.exception)


def test_bench_soak_writes_its_samples_and_plot(tmp_path):
    result = runner.invoke(app, ["bench", "soak", "--frames", "24", "--question-every", "12", "--sample-every", "6",
                                 "--warmup", "6", "--memory", "retrieval,full", "--window-tokens", "32",
                                 "--offload-dir", str(tmp_path / "blocks"), "--offload-budget", "1000000",
                                 "--no-stc", "--text-layers", "1", "--output", str(tmp_path / "soak")])
    assert result.exit_code == 0, result.output
    assert "text layers 1" in result.output
    report = json.loads((tmp_path / "soak" / "soak.json").read_text())
    assert report["config"]["text_layers"] == 1 and report["config"]["vit_layers"] is None
    stats = report["runs"][1]["final_stats"]  # the full cache: K and V of 2 heads x 16 dims, fp32, one layer
    assert stats["kv_cache_bytes"] == stats["cache_tokens"] * 2 * 2 * 16 * 4 * 1
    retrieval, full = report["runs"]
    assert [s["frames"] for s in retrieval["samples"]] == [6, 12, 18, 24] and len(retrieval["questions"]) == 2
    assert retrieval["final_stats"]["memory"]["offloaded_blocks"] == 22 and full["final_stats"]["memory"] is None
    assert retrieval["samples"][-1]["disk_bytes"] > 0  # one segment of 16 blocks was written
    assert retrieval["summary"]["disk_within_budget"] and retrieval["files_left"] == 0
    assert (tmp_path / "soak" / "soak.png").stat().st_size > 0


def test_the_command_line_and_the_preset_table_import_no_torch():
    code = ("import sys, streamtc.cli, streamtc.presets as p; p.get_preset('tiny-llava-ov'); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_bench_pruner_times_every_method_at_every_call_size(tmp_path):
    out = tmp_path / "cost.json"
    result = runner.invoke(app, ["bench", "pruner", "--frames", "1,2", "--tokens", "16", "--width", "8", "--keep",
                                 "4", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert {(r["method"], r["frames_per_call"]) for r in rows} == {
        (m, f) for m in ("stc gaussian", "stc dual_anchor", "stc dual_anchor W=16", "uniform", "random", "visionzip",
                         "vidcom2") for f in (1, 2)}
    assert all(r["ms_per_frame"] > 0 for r in rows)
    bad = runner.invoke(app, ["bench", "pruner", "--keep", "300"])
    assert bad.exit_code != 0 and "--keep" in bad.output


def test_run_compares_a_named_variant_with_the_uncompressed_model(tmp_path):
    out = tmp_path / "run.json"
    result = runner.invoke(app, ["run", "demo", "--variant", "uniform 25%", "--compare", "--fps", "1", "--max-seconds",
                                 "2", "--ask", "1:What?", "--max-new-tokens", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "/ no STC" in result.output and "uniform 25%" in result.output  # the ratio row (the column wraps)
    report = json.loads(out.read_text())
    assert report["variant"] == "uniform 25%" and list(report["stats"]) == ["no STC", "uniform 25%"]
    assert report["stats"]["uniform 25%"]["visual_tokens"] == 3 * 4 and report["stats"]["no STC"]["visual_tokens"] == 3 * 16
    assert report["ratios"]["visual_tokens"]["ratio"] == 0.25
    bad = runner.invoke(app, ["run", "demo", "--variant", "warp drive"])
    assert bad.exit_code != 0 and "unknown variant 'warp drive'" in str(bad.exception)
    listing = runner.invoke(app, ["variants"])
    assert listing.exit_code == 0 and "visionzip 25%" in listing.output and "Cacher N=2" in listing.output


def test_run_save_and_resume_continue_the_stream_as_one_run(tmp_path):
    common = ["--fps", "1", "--max-new-tokens", "2", "--ask", "6:What is happening?|cars|bikes|people"]
    whole = runner.invoke(app, ["run", "demo", "--max-seconds", "6", *common, "--output", str(tmp_path / "whole.json")])
    assert whole.exit_code == 0, whole.output
    first = runner.invoke(app, ["run", "demo", "--max-seconds", "3", "--fps", "1", "--ask", "1:What?",
                                "--max-new-tokens", "2", "--save", str(tmp_path / "saved")])
    assert first.exit_code == 0 and "note: saved to" in first.output, first.output
    assert (tmp_path / "saved" / "stc" / "CURRENT").is_file()
    second = runner.invoke(app, ["run", "demo", "--max-seconds", "6", *common, "--resume", str(tmp_path / "saved"),
                                 "--output", str(tmp_path / "second.json")])
    assert second.exit_code == 0, second.output
    expected, got = (json.loads((tmp_path / name).read_text()) for name in ("whole.json", "second.json"))
    assert got["stats"]["STC"]["frames"] == expected["stats"]["STC"]["frames"] == 7  # 0..6 s, none twice
    assert got["stc"] == expected["stc"]
    [want], [have] = expected["answers"]["STC"], got["answers"]["STC"]
    assert have["token_ids"] == want["token_ids"]
    for letter, value in want["option_logprobs"].items():
        assert abs(have["option_logprobs"][letter] - value) <= 2e-4  # rounded to 4 decimals
    refused = runner.invoke(app, ["run", "demo", "--resume", str(tmp_path / "saved"), "--no-stc"])
    assert refused.exit_code != 0 and "drop --no-stc" in refused.output
    missing = runner.invoke(app, ["run", "demo", "--resume", str(tmp_path / "nothing")])
    assert "no stream saved by `run --save`" in str(missing.exception)  # a ConfigError: exit code 2 from `streamtc`


def test_bench_vit_without_matplotlib_writes_the_json_and_says_how_to_get_the_plots(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from streamtc.cli import main; sys.argv = ['streamtc', "
            "'bench', 'vit', '--preset', 'tiny-siglip', '--num-layers', '1', '--frames', '2', '--repeats', '1', "
            f"'--warmup', '0', '--suite', 'fidelity', '--output', {str(tmp_path / 'vit.json')!r}]; main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0 and "Traceback" not in result.stdout + result.stderr, result.stderr
    assert json.loads((tmp_path / "vit.json").read_text())["variants"]
    assert "no plots: they need matplotlib, `pip install 'streamtc[plots]'`" in result.stdout
    assert not list(tmp_path.glob("*.png"))
