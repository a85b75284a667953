"""Decoupled cross-attention with the adapter scale as data.

:func:`~ipa_rt.kernels.reference.decoupled_attention_reference` is the one documented reference of the math; the
SDPA processor below runs it inside diffusers' ``Attention`` modules and is the CPU path and the oracle for the fused
kernel. The per-request state the processors read is :class:`~ipa_rt.runtime.image_state.ImageContext`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..kernels.reference import decoupled_attention_decomposed, decoupled_attention_reference
from ..runtime.image_state import ImageContext


def _exporting() -> bool:
    """Tracing for ONNX (TorchScript or dynamo exporter) or torch.export: use the standard-op form."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


_EMPTY: dict[torch.device, tuple[Tensor, Tensor]] = {}
_WARNED: set[str] = set()  # kernel failure reasons already reported


def _empty_segments(device: torch.device) -> tuple[Tensor, Tensor]:
    if device not in _EMPTY:
        _EMPTY[device] = (
            torch.zeros(1, dtype=torch.int32, device=device),
            torch.zeros(0, dtype=torch.int32, device=device),
        )
    return _EMPTY[device]


class DecoupledCrossAttnProcessor:
    """Drop-in for diffusers' ``AttnProcessor2_0`` on ``attn2`` that adds the image branches.

    It is a plain object, not an ``nn.Module``: the UNet's parameters and state dict stay the base model's.
    Image keys/values and scales come from the shared :class:`ImageContext`, so nothing here changes when
    the scale or the reference image does.
    """

    def __init__(self, layer: int, context: ImageContext, fused: bool = False) -> None:
        self.layer = layer
        self.context = context
        self.fused = fused  # decided once at install from device, dtype and head dim: never per call

    def _fused(self, query, key, value, kv, scales, mask) -> Tensor | None:
        """The fused kernel, or ``None`` if it fails here (a compile or launch error on this GPU): the layer then
        runs SDPA from now on, with one warning, rather than failing the call."""
        ctx = self.context
        if kv is None:
            k_img = v_img = key[:, :, :0]
            offsets, segs = _empty_segments(query.device)
        else:
            (k_img, v_img), offsets, segs = kv, ctx.seg_offsets, ctx.seg_adapter
        try:
            return torch.ops.ipa_rt.decoupled_attention(query, key, value, k_img, v_img, offsets, segs, scales, mask)
        except Exception as exc:
            self.fused = False
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"[:300]
            if reason not in _WARNED:
                _WARNED.add(reason)
                msg = f"fused attention kernel failed ({reason}); such layers run SDPA from now on"
                warnings.warn(msg, stacklevel=2)
            return None

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
        table = ctx.scale_eff if ctx.scale_eff is not None else ctx.scale
        scales = table[..., self.layer]  # [A] or [rows, A]: a strided view, no copy, no sync
        kv = ctx.kv[self.layer] if ctx.kv is not None else None
        mask = ctx.masks.get(query.shape[2]) if kv is not None and ctx.masks else None
        if kv is not None and ctx.seg_mult is not None:  # per-image segments: adapter scale x image factor
            scales = scales.index_select(-1, ctx.seg_owner) * ctx.seg_mult[:, self.layer]
        out = None
        if self.fused and attention_mask is None and not _exporting():
            out = self._fused(query, key, value, kv, scales, mask)
        if out is None:
            image_kv = [(kv[0][:, :, s:e], kv[1][:, :, s:e]) for s, e in ctx.segments] if kv is not None else ()
            if _exporting():
                out = decoupled_attention_decomposed(query, key, value, image_kv, scales)
            else:
                out = decoupled_attention_reference(
                    query, key, value, image_kv, scales, attn_mask=attention_mask, masks=mask
                )

        hidden_states = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
