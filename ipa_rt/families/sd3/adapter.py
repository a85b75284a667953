"""SD3.5 IP-Adapter (InstantX layout): the step-independent part of the image side computed once per call, the scale
a device tensor.

The TimeResampler takes the timestep, so the adapter tokens and every block's image keys/values change at every
step; :class:`SD3ImageSide` computes once per call only what does not (``proj_in``, the repeated latent queries and
the first resampler block's ``ln1`` of them), memoised on the identity of the embeddings tensor diffusers passes at
every step. The scale is a 0-d float32 tensor and the branch adds ``where(scale != 0, ip * scale, 0)``
(docs/guides/sd3.md, "What is computed once, and what cannot be").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import IPAdapterTimeImageProjection
from diffusers.models.normalization import AdaLayerNorm, RMSNorm
from torch import Tensor, nn

from ...adapters.variants import key_renamer
from ...errors import ConfigError, ScaleError
from ...runtime.graphs import StaticImage
from ...runtime.lru import IdentityMemo
from ..base import MovableSide

DEFAULT_SCALE = 0.5  # diffusers' SD3IPAdapterJointAttnProcessor2_0 default: what a freshly loaded adapter runs at
_MEMO = 2  # embeddings tensors kept: the current call's (CFG's negative and positive are one tensor) and a spare


class SD3BlockAdapter(nn.Module):
    """One block's adapter weights, under diffusers' ``SD3IPAdapterJointAttnProcessor2_0`` names (so its checkpoint
    keys load strictly): ``norm_ip`` (AdaLayerNorm on the resampler's timestep embedding), bias-free ``to_k_ip`` /
    ``to_v_ip``, and RMS norms of the branch's query, image keys and adapter keys."""

    def __init__(self, inner: int, head_dim: int, temb_dim: int) -> None:
        super().__init__()
        self.norm_ip = AdaLayerNorm(temb_dim, output_dim=inner * 2, norm_eps=1e-6, chunk_dim=1)
        self.to_k_ip = nn.Linear(inner, inner, bias=False)
        self.to_v_ip = nn.Linear(inner, inner, bias=False)
        self.norm_q = RMSNorm(head_dim, 1e-6)
        self.norm_k = RMSNorm(head_dim, 1e-6)
        self.norm_ip_k = RMSNorm(head_dim, 1e-6)

    def attend(self, tokens: Tensor, temb: Tensor, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """The branch for the block's un-normalised image ``query``/``key``/``value`` ``[B, H, N, d]``, as
        ``[B, N, H·d]``, in diffusers' order of operations (keys/values depend on ``temb``: per step, not cached)."""
        b, heads, _, head_dim = query.shape
        norm_tokens = self.norm_ip(tokens, temb=temb)
        ip_key = self.to_k_ip(norm_tokens).view(b, -1, heads, head_dim).transpose(1, 2)
        ip_value = self.to_v_ip(norm_tokens).view(b, -1, heads, head_dim).transpose(1, 2)
        query = self.norm_q(query)
        key = torch.cat([self.norm_k(key), self.norm_ip_k(ip_key)], dim=2)
        value = torch.cat([value, ip_value], dim=2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(b, -1, heads * head_dim).to(query.dtype)


@dataclass
class SD3Prepared:
    """One call's step-independent resampler inputs (see the module docstring)."""

    features: Tensor  # proj_in(image embeds) [B, T, hidden]
    latents: Tensor  # the learned queries, repeated [B, Q, hidden]
    ln1_latents: Tensor  # the first block's ln1 of them
    inputs: Tensor  # the embeddings they came from (held, so their identity stays theirs)


@dataclass
class SD3StepTokens:
    """One step's adapter tokens ``[B, Q, inner]``, with the timestep embedding that modulates every block's
    ``norm_ip``; ``side`` is read at attention time for its current scale (a ``.to()`` may have replaced it)."""

    tokens: Tensor
    temb: Tensor
    side: SD3ImageSide
    scale: Tensor | None = None  # an engine's scale input (traced); None: the side's current scale

    def add(self, layer: int, out: Tensor, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """``out + where(scale != 0, branch · scale, 0)``: diffusers' ``out + branch * scale`` bitwise for a non-zero
        scale (the product is taken in float32, as diffusers' Python-float scale is for half types too), exactly
        ``out`` at 0 (even were the branch not finite), without reading the scale on the host."""
        ip = self.side.ip_blocks[layer].attend(self.tokens, self.temb, query, key, value)
        scale = self.side.scale if self.scale is None else self.scale
        return out + torch.where(scale != 0, (ip.float() * scale).to(ip.dtype), 0.0)


def _resampler_block(block: nn.Module, x: Tensor, latents: Tensor, temb: Tensor, ln1_latents: Tensor | None) -> Tensor:
    """diffusers' ``IPAdapterTimeImageProjectionBlock.forward``, op for op, taking ``ln1(latents)`` precomputed for
    the first block (the one part of a block that does not depend on the timestep)."""
    emb = block.adaln_proj(block.adaln_silu(temb))
    shift_msa, scale_msa, shift_mlp, scale_mlp = emb.chunk(4, dim=1)
    residual = latents
    x = block.ln0(x)
    normed = ln1_latents if ln1_latents is not None else block.ln1(latents)
    latents = normed * (1 + scale_msa[:, None]) + shift_msa[:, None]
    b, attn = latents.shape[0], block.attn
    query = attn.to_q(latents)
    key, value = attn.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    weight = (query * attn.scale) @ (key * attn.scale).transpose(-2, -1)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    latents = (weight @ value).transpose(1, 2).reshape(b, -1, attn.heads * head_dim)
    latents = attn.to_out[1](attn.to_out[0](latents)) + residual
    residual = latents
    latents = block.adaln_norm(latents) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return block.ff(latents) + residual


class SD3ImageSide(MovableSide, IPAdapterTimeImageProjection):
    """The transformer's ``image_proj`` while ipa_rt's adapter is installed: diffusers' TimeResampler (same weights,
    same names, so diffusers' transformer calls it as its own), the blocks' adapter weights (``ip_blocks``) and the
    0-d float32 ``scale``.

    ``forward(embeds, timestep)`` returns ``(SD3StepTokens, temb)`` as diffusers' returns ``(tokens, temb)``; the
    step-independent part (:class:`SD3Prepared`) is computed the first time an embeddings tensor is seen."""

    def __init__(self, resampler: dict[str, int], blocks: list[SD3BlockAdapter], origin: str) -> None:
        super().__init__(**resampler)
        self.ip_blocks = nn.ModuleList(blocks)
        self.origin = origin
        self.scale = torch.tensor(DEFAULT_SCALE, dtype=torch.float32, device="cpu")  # not meta when built there
        self.host_scale = DEFAULT_SCALE  # the last value written: per-call decisions (is_ip_adapter_active) read it
        self._memo = IdentityMemo(_MEMO)
        self.static = StaticImage()  # the step-independent part as a captured transformer reads it

    def set_scale(self, value: float) -> None:
        """Write ``value`` into the scale tensor in place (no new tensor, nothing recompiles)."""
        self.scale.fill_(value)
        self.host_scale = value

    def prepare(self, embeds: Tensor) -> SD3Prepared:
        """The step-independent part for ``embeds`` ``[B, T, C]`` (memoised on its identity)."""
        if isinstance(embeds, (list, tuple)):
            raise ConfigError("SD3 pipelines take one IP-Adapter: ip_adapter_image_embeds must be one tensor")
        return self._memo.get([embeds]) or self._memo.put([embeds], self.around(self.proj_in(embeds), embeds))

    def around(self, features: Tensor, inputs: Tensor) -> SD3Prepared:
        """The step-independent part around ``features`` (``proj_in`` of ``inputs``): the learned queries repeated
        over its batch and the first block's ``ln1`` of them (an engine computes these in its graph: they are
        constants of the adapter's weights)."""
        latents = self.latents.repeat(features.size(0), 1, 1)
        return SD3Prepared(features, latents, self.layers[0].ln1(latents), inputs)

    def step(
        self, prepared: SD3Prepared, timestep: Tensor, scale: Tensor | None = None
    ) -> tuple[SD3StepTokens, Tensor]:
        """The per-step part: everything here depends on the timestep (``scale``: an engine's scale input)."""
        temb = self.time_embedding(self.time_proj(timestep).to(dtype=prepared.inputs.dtype))
        features = prepared.features + temb[:, None]
        latents = prepared.latents
        for i, block in enumerate(self.layers):
            latents = _resampler_block(block, features, latents, temb, prepared.ln1_latents if i == 0 else None)
        tokens = self.norm_out(self.proj_out(latents))
        return SD3StepTokens(tokens, temb, self, scale), temb

    @torch.no_grad()
    def forward(self, x: Tensor, timestep: Tensor) -> tuple[SD3StepTokens, Tensor]:  # type: ignore[override]
        # inside a captured transformer the staged static copy feeds the per-step part (which is in the graph)
        return self.step(self.static.current if self.static.is_frozen else self.prepare(x), timestep)


class SD3JointProcessor:
    """diffusers' ``JointAttnProcessor2_0`` (the base model's attention, op for op) plus the adapter branch from
    :class:`SD3StepTokens` for ``layer``. A plain object: the transformer's parameters stay the base model's and the
    adapter's live in :class:`SD3ImageSide`."""

    def __init__(self, layer: int) -> None:
        self.layer = layer

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        ip_hidden_states: SD3StepTokens | None = None,
        temb: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        b, n = hidden_states.shape[:2]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        img = (query, key, value)  # the branch reads the image q/k/v before the block's own norms
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            projs = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            ctx = [p(encoder_hidden_states).view(b, -1, attn.heads, head_dim).transpose(1, 2) for p in projs]
            if attn.norm_added_q is not None:
                ctx[0] = attn.norm_added_q(ctx[0])
            if attn.norm_added_k is not None:
                ctx[1] = attn.norm_added_k(ctx[1])
            query, key, value = (torch.cat([a, c], dim=2) for a, c in zip((query, key, value), ctx, strict=True))
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            out, encoder_hidden_states = out[:, :n], out[:, n:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        if isinstance(ip_hidden_states, SD3StepTokens):
            out = ip_hidden_states.add(self.layer, out, *img)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if encoder_hidden_states is None else (out, encoder_hidden_states)


def sd3_scale(scale: Any) -> float:
    """``set_ip_adapter_scale``'s input as diffusers' ``SD3IPAdapterMixin`` takes it: one finite number."""
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise ScaleError(
            f"scale is {scale!r} ({type(scale).__name__}); expected one number (SD3 IP-Adapters have one scale for "
            "every block: diffusers' SD3IPAdapterMixin takes a float)"
        )
    if not math.isfinite(float(scale)):
        raise ScaleError(f"scale is {scale!r}; expected a finite number")
    return float(scale)


# An InstantX TimeResampler key in diffusers' ``IPAdapterTimeImageProjection`` names (SD3Transformer2DLoadersMixin's
# conversion; diffusers' names pass as is)
diffusers_resampler_name = key_renamer(
    [
        (rf"^layers\.(\d+)\.{old}\.", rf"layers.\1.{new}.")
        for old, new in (
            (r"0\.norm1", "ln0"),
            (r"0\.norm2", "ln1"),
            (r"0\.to_q", "attn.to_q"),
            (r"0\.to_kv", "attn.to_kv"),
            (r"0\.to_out", "attn.to_out.0"),
            (r"1\.0", "adaln_norm"),
            (r"1\.1", "ff.net.0.proj"),
            (r"1\.3", "ff.net.2"),
            (r"2\.1", "adaln_proj"),
        )
    ]
)
