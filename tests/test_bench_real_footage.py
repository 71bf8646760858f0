"""The real-footage suite's plumbing: stream specs, frame records with codec hints, pooled statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from streamtc.bench.real_footage import StreamSpec, load_stream, parse_streams, run_real_footage, stream_path
from streamtc.errors import InputError
from streamtc.weights import normalize_frames

from helpers import tiny_dinov2_and_head


def test_streams_parse_and_bad_ones_are_refused():
    assert parse_streams("demo@0.5, vtest@1") == [StreamSpec("demo", 0.5), StreamSpec("vtest", 1.0)]
    for bad in ("demo", "demo@0", "@1", "demo@x", ""):
        with pytest.raises(InputError):
            parse_streams(bad)


def test_each_frame_is_recorded_with_its_source_frame_time_and_hints():
    images, hints, records = load_stream(StreamSpec("demo", 1.0), (4, 4))
    assert len(images) == len(hints) == len(records) == 10  # the street clip: 10 s at 25 fps
    assert [r["time_s"] for r in records] == [float(t) for t in range(10)]
    assert [r["source_frame"] for r in records] == [25 * t for t in range(10)]  # the decoded frame shown at that time
    assert all(h is not None and h.change.shape == (1, 16) for h in hints)
    assert [bool(h.cut[0]) for h in hints] == [r["codec"]["cut"] for r in records]
    assert any(r["codec"]["cut"] for r in records)  # the clip has cuts


def test_the_pooled_table_pools_every_frame_of_every_stream():
    tower, head = tiny_dinov2_and_head()

    def normalize(frames: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(normalize_frames(frames), size=56)

    result = run_real_footage([StreamSpec("demo", 0.5), StreamSpec("carphone", 1.0)], tower, head, normalize,
                              repeats=1, warmup=0)
    runs = {run["video"]: run for run in result["runs"]}
    assert runs["demo"]["kind"] == "moving camera, cuts" and runs["carphone"]["tuned_on"]
    pooled = {row["name"]: row for row in result["pooled"]}
    robust = pooled["robust (N=2 budget)"]
    cosines = np.concatenate([next(v for v in run["variants"] if v["name"] == "robust (N=2 budget)")["per_frame_token_cosine"]
                              for run in result["runs"]])
    assert robust["frames"] == len(cosines) == 5 + 4
    assert robust["token_cosine_mean"] == pytest.approx(cosines.mean())
    assert robust["token_cosine_p10"] == pytest.approx(np.percentile(cosines, 10))
    assert robust["token_cosine_min"] == pytest.approx(cosines.min())
    assert pooled["full"]["token_cosine_min"] == pytest.approx(1.0)
    assert pooled["robust (N=2 budget), no hints"]["frames"] == 9


def test_each_stream_gets_its_own_plot_files():
    """Two streams of one run must not overwrite each other's plots."""
    names = {stream_path(Path("out/real.json"), {"video": video, "fps": fps}).name
             for video, fps in (("demo", 1.0), ("demo", 0.5), ("/clips/walk.mp4", 2.0))}
    assert names == {"real.demo@1.json", "real.demo@0.5.json", "real.walk@2.json"}
