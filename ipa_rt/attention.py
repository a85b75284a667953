"""Decoupled cross-attention with the adapter scale as data.

:func:`decoupled_attention_reference` is the one documented reference of the math; the SDPA processor
below runs it inside diffusers' ``Attention`` modules and is the CPU path and the oracle for the fused kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
) -> Tensor:
    """IP-Adapter's decoupled cross-attention, exactly as diffusers' ``IPAdapterAttnProcessor2_0``.

    ``out = softmax(Q K_textᵀ/√d) V_text + Σ_a s_a · softmax(Q K_aᵀ/√d) V_a``: one softmax per segment (text,
    then each adapter; all images of one adapter share a segment), never one softmax over all keys.

    Args:
        q: queries ``[B, H, N, d]``.
        k_text, v_text: text keys/values ``[B, H, L, d]``.
        image_kv: per adapter ``(K_a, V_a)``, each ``[B, H, T_a, d]`` (``T_a`` = images × tokens per image).
        scales: ``[A]`` device tensor of adapter scales for this layer. A zero scale contributes exactly
            nothing (``where``, not ``0 * x``, so an overflowing image branch cannot leak NaN).
        attn_mask: optional text attention mask, as diffusers passes it to SDPA (image segments have none).

    Returns ``[B, N, H·d]`` in ``q``'s dtype, summed in the order diffusers sums (text, adapter 0, 1, …),
    each branch cast to the query dtype before the sum.
    """
    b, h, _, d = q.shape
    out = F.scaled_dot_product_attention(q, k_text, v_text, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(b, -1, h * d).to(q.dtype)
    for a, (k_a, v_a) in enumerate(image_kv):
        o_a = F.scaled_dot_product_attention(q, k_a, v_a, dropout_p=0.0, is_causal=False)
        o_a = o_a.transpose(1, 2).reshape(b, -1, h * d).to(q.dtype)
        s = scales[a]
        out = out + torch.where(s != 0, o_a * s, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


@dataclass
class ImageContext:
    """Per-request image state every cross-attention processor reads (refiners' "context" idea).

    ``scale`` is the ``[adapters, layers]`` device tensor; ``kv[layer]`` holds each adapter's precomputed
    image keys/values for that layer, or is ``None`` when the request has no image prompt.
    """

    scale: Tensor
    kv: list[list[tuple[Tensor, Tensor]]] | None = None
    heads: list[int] = field(default_factory=list)


class DecoupledCrossAttnProcessor:
    """Drop-in for diffusers' ``AttnProcessor2_0`` on ``attn2`` that adds the image branches.

    It is a plain object, not an ``nn.Module``: the UNet's parameters and state dict stay the base model's.
    Image keys/values and scales come from the shared :class:`ImageContext`, so nothing here changes when
    the scale or the reference image does.
    """

    def __init__(self, layer: int, context: ImageContext) -> None:
        self.layer = layer
        self.context = context

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | tuple | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        if isinstance(encoder_hidden_states, tuple):  # a diffusers UNet that still projects image embeds
            encoder_hidden_states = encoder_hidden_states[0]
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        ctx = self.context
        image_kv = ctx.kv[self.layer] if ctx.kv is not None else ()
        hidden_states = decoupled_attention_reference(
            query, key, value, image_kv, ctx.scale[:, self.layer], attn_mask=attention_mask
        )

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
