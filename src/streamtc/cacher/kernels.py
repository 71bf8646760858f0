"""CPU matrix products of the patched layers: oneDNN's kernels where PyTorch would call MKL.

PyTorch runs a float32 `nn.Linear` on CPU through MKL's sgemm. On the AMD EPYC machine of
docs/benchmarks.md, routing the same products through oneDNN's JIT kernels makes a full
SigLIP-so400m frame (729-row products) 0.91 of its MKL time and a non-refresh frame (182-row
products) about 0.86: MKL's small products were where STC-Cacher's saved FLOPs were being lost.
The patched layers route their projections and MLPs through `linear` and `feed_forward` below.

PyTorch's own path (`module(x)`) is kept wherever the swap could change more than the kernel:
tensors off the CPU or in another dtype, autograd recording, projections that are not plain
`nn.Linear` (quantised or adapter-wrapped layers) or carry hooks, and whenever the caller passes
onednn=False (`CacherConfig(cpu_kernels="torch")`, and the compiled path, where inductor picks
kernels itself). Results agree with MKL's to float rounding (summation order), not bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def onednn_available() -> bool:
    """Whether this torch build has oneDNN and its linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in ONEDNN_DTYPES
        and weight.dtype == x.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def linear(module: nn.Module, x: torch.Tensor, onednn: bool) -> torch.Tensor:
    """module(x) for a projection of a patched layer, through oneDNN when `onednn` and it applies."""
    if onednn and type(module) is nn.Linear and not _has_hooks(module) and _onednn_applies(x, module.weight):
        return torch.ops.mkldnn._linear_pointwise(x, module.weight, module.bias, "none", [], "")
    return module(x)


def linear_rows(module: nn.Module, x: torch.Tensor, rows: slice, onednn: bool) -> torch.Tensor:
    """Output channels `rows` of module(x), computing only those (one row block of a fused projection)."""
    if type(module) is not nn.Linear or _has_hooks(module):
        return module(x)[..., rows]
    weight = module.weight[rows]  # a contiguous view: a row block of a row-major matrix
    bias = None if module.bias is None else module.bias[rows]
    if onednn and _onednn_applies(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return nn.functional.linear(x, weight, bias)


def feed_forward(mlp: nn.Module, x: torch.Tensor, onednn: bool) -> torch.Tensor:
    """mlp(x); the fc1 -> activation_fn -> fc2 MLP of most towers with its products via `linear`."""
    if onednn and not _has_hooks(mlp) and hasattr(mlp, "fc1"):
        return linear(mlp.fc2, mlp.activation_fn(linear(mlp.fc1, x, onednn)), onednn)
    return mlp(x)


__all__ = ["ONEDNN_DTYPES", "onednn_available", "linear", "linear_rows", "feed_forward"]
