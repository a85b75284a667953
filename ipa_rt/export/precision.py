"""Precision of exported graphs: the engine's dtype written into the ONNX itself, as strongly typed TensorRT needs.

An fp16/bf16 engine is exported from the model in that dtype, with what must stay fp32 cast explicitly in the graph:
group and layer normalisation statistics (a sum of squares over thousands of activations overflows fp16's 65504;
PyTorch's CUDA kernels compute them in fp32 too) and the timestep embedding; an SDXL VAE that diffusers upcasts is
exported in fp32 altogether (docs/design.md, engines: TensorRT).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

LOW = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def fp32_normalization() -> Iterator[None]:
    """While tracing: ``F.group_norm`` / ``F.layer_norm`` on fp16/bf16 inputs run as cast -> fp32 norm -> cast back
    (``nn.GroupNorm``, ``nn.LayerNorm`` and diffusers call these functions)."""
    group_norm, layer_norm = F.group_norm, F.layer_norm

    def up(t):
        return t.float() if t is not None else None

    def group(x, num_groups, weight=None, bias=None, eps=1e-5):
        if x.dtype not in LOW:
            return group_norm(x, num_groups, weight, bias, eps)
        return group_norm(x.float(), num_groups, up(weight), up(bias), eps).to(x.dtype)

    def layer(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        if x.dtype not in LOW:
            return layer_norm(x, normalized_shape, weight, bias, eps)
        return layer_norm(x.float(), normalized_shape, up(weight), up(bias), eps).to(x.dtype)

    F.group_norm, F.layer_norm = group, layer
    try:
        yield
    finally:
        F.group_norm, F.layer_norm = group_norm, layer_norm


@contextlib.contextmanager
def decomposed_rms_norm() -> Iterator[None]:
    """While tracing: ``F.rms_norm`` (``nn.RMSNorm``: Flux's per-head query/key norms) as its arithmetic, in fp32 as
    PyTorch computes it; the tracing exporter has no ``aten::rms_norm`` below ONNX opset 23."""
    rms_norm = F.rms_norm

    def decomposed(x, normalized_shape, weight=None, eps=None):
        dims = tuple(range(-len(normalized_shape), 0))
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        y = x.float()
        y = (y * torch.rsqrt(y.pow(2).mean(dims, keepdim=True) + eps)).to(x.dtype)
        return y * weight if weight is not None else y

    F.rms_norm = decomposed
    try:
        yield
    finally:
        F.rms_norm = rms_norm
