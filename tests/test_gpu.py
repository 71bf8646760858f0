"""The CUDA paths: the Cacher's layers, its compiled and CUDA-graph paths, bf16, the session, the
Pruner and the measurements, on a GPU.

Marked `gpu`: skipped where CUDA is absent, run by `scripts/gpu-check.sh` (or `pytest -m gpu`) on
a GPU machine. `STREAMTC_GPU_DRY_RUN=1` runs them on the CPU to check their own logic; the tests
taking `cuda_only` (CUDA graphs, CUDA's memory counters, the GPU's name) then skip.
"""

from __future__ import annotations

import pytest
import torch

from streamtc import STCConfig
from streamtc.bench.qwen_towers import build_qwen_tower, temporal_patches
from streamtc.bench.vit import load_qwen_frames
from streamtc.cacher import STCCacher
from streamtc.config import CacherConfig, PrunerConfig
from streamtc.measure import environment, peak_memory_bytes, reset_peak_memory, timed
from streamtc.presets import build_model
from streamtc.pruner import STCPruner
from streamtc.session import StreamingSession

pytestmark = pytest.mark.gpu

QUESTION = "What is the man holding?"


def pixel_frames(count: int, seed: int = 0, size: int = 56) -> torch.Tensor:
    """A slowly changing synthetic scene [F, 3, S, S]: a base image plus accumulating motion."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 3, size, size, generator=g)
    return base + (0.15 * torch.randn(count, 3, size, size, generator=g)).cumsum(0)


def encode(tower: torch.nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """One chunk per frame, as a stream encodes them; [F, T, C] in float32 on the CPU."""
    with torch.inference_mode():
        return torch.cat([tower(pixel_values=f[None]).last_hidden_state for f in frames]).float().cpu()


def siglip_on(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return build_model("tiny-siglip", dtype=dtype).to(device)


def streamed(config: CacherConfig, tower: torch.nn.Module, frames: torch.Tensor) -> torch.Tensor:
    cacher = STCCacher(config).attach(tower)
    try:
        return encode(tower, frames)
    finally:
        cacher.detach()


# -- the Cacher's layers on the GPU ----------------------------------------------------------------


@pytest.mark.parametrize("config", [CacherConfig(cache_interval=1), CacherConfig(cache_interval=3, update_ratio=1.0)],
                         ids=["every-chunk-refreshes", "ratio-1"])
def test_exact_settings_reproduce_the_unpatched_tower_on_the_gpu(gpu, config):
    tower, frames = siglip_on(gpu), pixel_frames(6).to(gpu)
    expected = encode(tower, frames)
    got = streamed(config, tower, frames)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    assert torch.equal(encode(tower, frames), expected)  # detached: the original forward again


def test_the_selective_path_on_the_gpu_matches_the_cpu(gpu):
    """N = 2, r = 0.25: gathers, scatters, top-k and the mixed-value attention on the device give
    what they give on the CPU (the selection from the same keys, to float rounding)."""
    config = CacherConfig(cache_interval=2, update_ratio=0.25, cpu_kernels="torch")
    frames = pixel_frames(6, seed=1)
    on_cpu = streamed(config, siglip_on(torch.device("cpu")), frames)
    on_gpu = streamed(config, siglip_on(gpu), frames.to(gpu))
    full = encode(siglip_on(gpu), frames.to(gpu))
    assert torch.allclose(on_gpu, on_cpu, atol=1e-3, rtol=1e-3), (on_gpu - on_cpu).abs().max()
    assert not torch.allclose(on_gpu[1], full[1], atol=1e-3)  # frame 1 was reused: the check can fail


def test_cpu_kernels_setting_changes_nothing_off_the_cpu(gpu, cuda_only):
    """oneDNN products are a CPU path: on CUDA "onednn" and "torch" must run the same kernels."""
    tower, frames = siglip_on(gpu), pixel_frames(5).to(gpu)
    onednn = streamed(CacherConfig(cache_interval=2, cpu_kernels="onednn"), tower, frames)
    plain = streamed(CacherConfig(cache_interval=2, cpu_kernels="torch"), tower, frames)
    assert torch.equal(onednn, plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_towers_follow_their_full_forward(gpu, cuda_only, dtype):
    """bf16/fp16 on the GPU: N = 1 stays within the dtype's rounding of the unpatched tower, and
    the selective path of N = 2 stays close to the full forward (cosine of every frame > 0.9)."""
    tower, frames = siglip_on(gpu, dtype), pixel_frames(6).to(gpu, dtype)
    expected = encode(tower, frames)
    exact = streamed(CacherConfig(cache_interval=1), tower, frames)
    scale = expected.abs().max()
    assert (exact - expected).abs().max() <= 2e-2 * scale
    stc = streamed(CacherConfig(cache_interval=2, update_ratio=0.25), tower, frames)
    cosine = torch.nn.functional.cosine_similarity(stc, expected, dim=-1).mean(-1)
    assert cosine.min() > 0.9 and torch.isfinite(stc).all()


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"], ids=["compiled", "cuda-graphs"])
def test_compiled_and_cuda_graph_paths_match_the_eager_cacher(gpu, cuda_only, mode):
    """torch.compile (fullgraph, static shapes) and CUDA graphs ("reduce-overhead") over refresh and
    non-refresh chunks: equal to the eager cacher, chunk after chunk (graphs replayed on buffers the
    references are written into in place)."""
    tower, frames = siglip_on(gpu), pixel_frames(8, seed=2).to(gpu)
    eager = streamed(CacherConfig(cache_interval=2, update_ratio=0.25), tower, frames)
    compiled = streamed(CacherConfig(cache_interval=2, update_ratio=0.25, compile_mode=mode), tower, frames)
    assert torch.allclose(compiled, eager, atol=1e-3, rtol=1e-3), (compiled - eager).abs().max()


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_qwen_towers_on_the_gpu(gpu, name):
    """A Qwen tower at checkpoint width (two blocks; 224 px frames, a multiple of both merge units,
    28 and 32) on the device: N = 1 reproduces it; N = 2 reuses the second temporal patch."""
    tower = build_qwen_tower(name, depth=2).to(gpu)
    patches, grid = temporal_patches(load_qwen_frames("demo", name, 6, image_size=224), tower.config)
    grid = grid.to(gpu)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([tower(p.to(gpu), grid_thw=grid).last_hidden_state for p in patches]).float().cpu()

    full = run()
    cacher = STCCacher(CacherConfig(cache_interval=1)).attach(tower)
    exact = run()
    cacher.detach()
    cacher = STCCacher(CacherConfig(cache_interval=2, update_ratio=0.25)).attach(tower)
    reused = run()
    cacher.detach()
    assert torch.allclose(exact, full, atol=1e-3, rtol=1e-3), (exact - full).abs().max()
    assert not torch.allclose(reused, full, atol=1e-3)
    assert torch.equal(run(), full)


# -- the Pruner and the session -------------------------------------------------------------------


@pytest.mark.parametrize("scoring", ["dual_anchor", "gaussian"])
def test_the_pruner_keeps_the_same_tokens_on_the_gpu(gpu, scoring):
    features = torch.randn(8, 196, 64, generator=torch.Generator().manual_seed(0))
    kept = {}
    for device in (torch.device("cpu"), gpu):
        pruner = STCPruner(PrunerConfig(scoring=scoring, tokens_per_frame=59))
        kept[device.type] = [pruner.prune(chunk.to(device)).indices.cpu() for chunk in features.split(2)]
    assert all(torch.equal(a, b) for a, b in zip(kept["cpu"], kept[gpu.type]))


def test_a_session_on_the_gpu_gives_the_cpu_logits(gpu, make_frames):
    frames = make_frames(4)
    logits = {}
    for device in (torch.device("cpu"), gpu):
        session = StreamingSession.from_preset("tiny-llava-ov", stc=None, device=device)
        session.push(frames, [float(t) for t in range(len(frames))])
        logits[device.type] = session.next_token_logits(QUESTION).float().cpu()
        session.close()
    assert torch.allclose(logits[gpu.type], logits["cpu"], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stc_session_on_the_gpu_answers_and_measures(gpu, cuda_only, make_frames, dtype):
    session = StreamingSession.from_preset("tiny-llava-ov", stc=STCConfig(), device=gpu, dtype=dtype)
    session.push(make_frames(6), [float(t) for t in range(6)])
    answer = session.ask(QUESTION, max_new_tokens=2)
    stats = session.stats
    assert isinstance(answer.text, str)
    assert stats.memory_kind == "cuda" and stats.peak_memory_bytes > 0
    assert stats.vit_ms > 0 and stats.prefill_ms > 0
    assert torch.isfinite(session.next_token_logits(QUESTION).float()).all()
    session.close()


# -- measurement -----------------------------------------------------------------------------------


def test_measurement_reads_cuda_memory_and_names_the_gpu(gpu, cuda_only):
    reset_peak_memory(gpu)
    block, ms = timed(lambda: torch.ones(64 * 2**20 // 4, device=gpu), gpu)  # 64 MiB
    assert peak_memory_bytes(gpu) >= 64 * 2**20 and ms > 0
    del block
    record = environment(gpu, {"check": True})
    assert record["machine"]["device"].startswith("cuda") and record["machine"]["gpu"]
    assert record["versions"]["torch"] == torch.__version__ and record["config"] == {"check": True}

