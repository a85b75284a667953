"""The math of IP-Adapter's decoupled cross-attention: the documented reference every fast path is tested against
(:func:`decoupled_attention_reference`, diffusers' ``IPAdapterAttnProcessor2_0`` term for term) and the form exported
to ONNX (:func:`decoupled_attention_decomposed`). The fused kernel's package holds it: the kernel, its self-test and
the processors all answer to it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def decoupled_attention_reference(
    q: Tensor,
    k_text: Tensor,
    v_text: Tensor,
    image_kv: Sequence[tuple[Tensor, Tensor]],
    scales: Tensor,
    attn_mask: Tensor | None = None,
    masks: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """IP-Adapter's decoupled cross-attention, exactly as diffusers' ``IPAdapterAttnProcessor2_0``.

    ``out = softmax(Q K_textᵀ/√d) V_text + Σ_s w_s · M_s ⊙ softmax(Q K_sᵀ/√d) V_s``: one softmax per segment
    (the text, then each image segment), never one softmax over all keys. Unmasked, a segment is one
    adapter with all its images' tokens; with regional masks diffusers gives each image its own segment.

    Args:
        q: queries ``[B, H, N, d]``.
        k_text, v_text: text keys/values ``[B, H, L, d]``.
        image_kv: per segment ``(K_s, V_s)``, each ``[B, H, T_s, d]``.
        scales: ``[S]`` device tensor, the weight of each segment, or ``[B, S]``: one weight per batch row (a
            batched call of several requests, each with its own scale). A zero weight contributes exactly
            nothing (``where``, not ``0 * x``, so an overflowing image branch cannot leak NaN).
        attn_mask: optional text attention mask, as diffusers passes it to SDPA (image segments have none).
        masks: optional per-segment query multipliers ``[B, N]`` (regional masks), ``None`` entries = no mask.

    Returns ``[B, N, H·d]`` in ``q``'s dtype, summed in diffusers' order (text, segment 0, 1, …), each
    branch cast to the query dtype before the sum.
    """
    b, h, _, d = q.shape
    out = F.scaled_dot_product_attention(q, k_text, v_text, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(b, -1, h * d).to(q.dtype)
    for i, (k_s, v_s) in enumerate(image_kv):
        out = out + image_segment(q, k_s, v_s, _row_weight(scales, i), masks[i] if masks is not None else None)
    return out


def image_segment(q: Tensor, k: Tensor, v: Tensor, w: Tensor, mask: Tensor | None = None) -> Tensor:
    """One image segment's term ``w · M ⊙ softmax(Q Kᵀ/√d) V`` as ``[B, N, H·d]`` in ``q``'s dtype (diffusers'
    order: attention, cast, mask, scale); exactly zero where ``w == 0``."""
    b, h, _, d = q.shape
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    o = o.transpose(1, 2).reshape(b, -1, h * d).to(q.dtype)
    if mask is not None:
        o = o * mask[:, :, None].to(o.dtype)
    return torch.where(w != 0, o * w, torch.zeros((), dtype=o.dtype, device=o.device))


def _row_weight(scales: Tensor, segment: int) -> Tensor:
    """Segment ``segment``'s weight: a 0-dim tensor for ``[S]`` scales, ``[B, 1, 1]`` (one per row) for ``[B, S]``."""
    w = scales[..., segment]
    return w.view(-1, 1, 1) if w.ndim else w


def decoupled_attention_decomposed(
    q: Tensor,
    k_text: Tensor,
    v_text: Tensor,
    image_kv: Sequence[tuple[Tensor, Tensor]],
    scales: Tensor,
) -> Tensor:
    """The same math in MatMul / Softmax / Mul / Where only: the form exported to ONNX, where ONNX Runtime and
    TensorRT recognise and fuse each attention segment."""
    b, h, _, d = q.shape
    qs = q * d**-0.5  # scaled before the product: fp16 scores then stay far from overflow

    def attend(k: Tensor, v: Tensor) -> Tensor:
        p = torch.softmax(torch.matmul(qs, k.transpose(-1, -2)), dim=-1)
        return torch.matmul(p, v).transpose(1, 2).reshape(b, -1, h * d)

    out = attend(k_text, v_text)
    for i, (k_s, v_s) in enumerate(image_kv):
        w = _row_weight(scales, i).to(q.dtype)
        out = out + torch.where(w != 0, attend(k_s, v_s) * w, torch.zeros_like(w))
    return out
