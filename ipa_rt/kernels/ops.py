"""``torch.ops.ipa_rt.decoupled_attention``: the fused kernel as a custom op with a fake implementation.

The fake (meta) implementation lets ``torch.compile`` and ``torch.export`` trace through the op without
running it. Whether the kernel may run at all is decided once, when a pipeline is built
(:func:`fused_available`), never per call on runtime values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from . import decoupled_kernel as _k


def fused_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """``None`` when the fused kernel can serve a layer with these properties, else why not."""
    return _k.kernel_supports(device, dtype, head_dim)


MODES = ("auto", "triton", "sdpa")  # a pipeline's attention choice for the image branch


def choose(mode: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the image branch runs the kernel: ``auto`` on CUDA where it can, ``triton`` wherever it can (the CPU
    under ``TRITON_INTERPRET=1``) or a :class:`ConfigError` saying why not, ``sdpa`` never."""
    if mode not in MODES:
        raise ConfigError(f"attention {mode!r} is unknown; expected one of {MODES}")
    if mode == "sdpa":
        return False
    why = fused_available(device, dtype, head_dim)
    if mode == "triton" and why is not None:
        raise ConfigError(f"attention='triton' cannot run here: {why}")
    return why is None and (mode == "triton" or device.type == "cuda")


@torch.library.custom_op("ipa_rt::decoupled_attention", mutates_args=())
def decoupled_attention(
    q: Tensor,
    k_text: Tensor,
    v_text: Tensor,
    k_img: Tensor,
    v_img: Tensor,
    seg_offsets: Tensor,
    seg_adapter: Tensor,
    scales: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """Fused decoupled cross-attention; see :mod:`ipa_rt.kernels.decoupled_kernel` for the layout."""
    return _k.launch(q, k_text, v_text, k_img, v_img, seg_offsets, seg_adapter, scales, mask)


@decoupled_attention.register_fake
def _(q, k_text, v_text, k_img, v_img, seg_offsets, seg_adapter, scales, mask=None):
    b, h, n, d = q.shape
    return q.new_empty(b, n, h * d)
