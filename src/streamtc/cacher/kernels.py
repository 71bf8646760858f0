"""CPU matrix products of the patched layers: oneDNN's kernels where PyTorch would call MKL.

PyTorch runs a float32 `nn.Linear` on CPU through MKL's sgemm. On the AMD EPYC machine of
docs/benchmarks.md, routing the same products through oneDNN's JIT kernels makes a full
SigLIP-so400m frame (729-row products) 0.91 of its MKL time and a non-refresh frame (182-row
products) about 0.86: MKL's small products were where STC-Cacher's saved FLOPs were being lost.
The patched layers route their projections and MLPs through `linear` and `feed_forward` below.

Two more things make oneDNN's small products fast (docs/benchmarks.md, issue 24):
- the weights are reordered once into oneDNN's blocked layout and kept (`packed_weight`) instead
  of being reordered on every call; a copy of each patched weight, repacked when the weight is
  changed in place or replaced, freed with the weight;
- the MLP's GELU runs inside the first product's kernel (a oneDNN post-op) where the activation
  is exactly PyTorch's GELU.

PyTorch's own path (`module(x)`) is kept wherever the swap could change more than the kernel:
tensors off the CPU or in another dtype, autograd recording, projections that are not plain
`nn.Linear` (quantised or adapter-wrapped layers) or carry hooks, and whenever the caller passes
onednn=False (`CacherConfig(cpu_kernels="torch")`, and the compiled path, where inductor picks
kernels itself). Results agree with MKL's to float rounding (summation order), not bit for bit.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import nn
from transformers.activations import GELUActivation, GELUTanh

ONEDNN_DTYPES = (torch.float32, torch.bfloat16)

# id(weight) -> (weak reference to the weight, its version and storage when packed, the packed copy)
_PACKED: dict[int, tuple[weakref.ref, tuple[int, int], torch.Tensor]] = {}


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


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] in oneDNN's blocked layout, reordered on first use and kept while it is valid.

    The copy is redone when the weight changes in place (its version counter moves) or gets new
    storage, and dropped when the weight is freed. Inference tensors have no version counter to
    check: they are reordered on every call, as oneDNN does for a plain weight.
    """
    if weight.is_inference():
        return weight
    key, state = id(weight), (weight._version, weight.data_ptr())
    entry = _PACKED.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == state:
        return entry[2]
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    _PACKED[key] = (weakref.ref(weight, lambda _, key=key: _PACKED.pop(key, None)), state, packed)
    return packed


def _onednn_weight(module: nn.Module, x: torch.Tensor, onednn: bool) -> torch.Tensor | None:
    """The packed weight to run module(x) with through oneDNN, or None where PyTorch's path is kept."""
    if onednn and type(module) is nn.Linear and not _has_hooks(module) and _onednn_applies(x, module.weight):
        return packed_weight(module.weight)
    return None


def linear(module: nn.Module, x: torch.Tensor, onednn: bool) -> torch.Tensor:
    """module(x) for a projection of a patched layer, through oneDNN when `onednn` and it applies."""
    weight = _onednn_weight(module, x, onednn)
    if weight is None:
        return module(x)
    return torch.ops.mkldnn._linear_pointwise(x, weight, module.bias, "none", [], "")


def linear_rows(module: nn.Module, x: torch.Tensor, rows: slice, onednn: bool) -> torch.Tensor:
    """Output channels `rows` of module(x), computing only those (one row block of a fused projection)."""
    if type(module) is not nn.Linear or _has_hooks(module):
        return module(x)[..., rows]
    weight = module.weight[rows]  # a contiguous view: a row block of a row-major matrix
    bias = None if module.bias is None else module.bias[rows]
    if onednn and _onednn_applies(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return nn.functional.linear(x, weight, bias)


def gelu_algorithm(activation: nn.Module) -> str | None:
    """oneDNN's name for `activation` where it is exactly PyTorch's GELU ("none": erf, "tanh"), else None."""
    if _has_hooks(activation):
        return None
    if type(activation) is nn.GELU:
        return activation.approximate
    if type(activation) is GELUActivation and activation.act is nn.functional.gelu:
        return "none"
    act = getattr(activation, "act", None)
    if type(activation) is GELUTanh and isinstance(act, functools.partial) and act.func is nn.functional.gelu:
        return act.keywords.get("approximate")
    return None


def feed_forward(mlp: nn.Module, x: torch.Tensor, onednn: bool) -> torch.Tensor:
    """mlp(x); the fc1 -> activation_fn -> fc2 MLP of most towers with its products via `linear`,
    and an exact PyTorch GELU run inside the fc1 product's kernel where oneDNN runs it."""
    if not onednn or _has_hooks(mlp) or not hasattr(mlp, "fc1"):
        return mlp(x)
    algorithm = gelu_algorithm(mlp.activation_fn)
    weight = _onednn_weight(mlp.fc1, x, onednn)
    if algorithm is not None and weight is not None:
        hidden = torch.ops.mkldnn._linear_pointwise(x, weight, mlp.fc1.bias, "gelu", [], algorithm)
    else:
        hidden = mlp.activation_fn(linear(mlp.fc1, x, onednn))
    return linear(mlp.fc2, hidden, onednn)


__all__ = [
    "ONEDNN_DTYPES", "onednn_available", "packed_weight", "linear", "linear_rows", "gelu_algorithm", "feed_forward",
]
