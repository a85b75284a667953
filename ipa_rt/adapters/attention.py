"""Decoupled cross-attention with the adapter scale as data.

:func:`decoupled_attention_reference` is the one documented reference of the math; the SDPA processor
below runs it inside diffusers' ``Attention`` modules and is the CPU path and the oracle for the fused kernel.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..runtime.graphs import StaticBuffers


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


@dataclass
class ImageContext:
    """Per-request image state every cross-attention processor reads (refiners' "context" idea), changed only
    through the methods below (by the runtime, ComfyUI, ``doctor``, the export contracts); the adapter weights that
    compute it live in :class:`~ipa_rt.adapters.stack.IPAdapterStack`. ``scale``: ``[adapters, layers]``, or
    ``[rows, adapters, layers]`` in a batched call (:meth:`per_row`; always inside an engine's UNet). ``kv[layer]``:
    all image keys and values laid end to end (``[B, H, T, d]``), ``None`` without an image prompt; ``segments``:
    each segment's ``(start, end)`` token range, ``seg_offsets`` / ``seg_adapter`` the same on the device for the
    fused kernel. Each tensor lives in a static buffer set per shape key (:meth:`hold`), written in place."""

    scale: Tensor
    scale_eff: Tensor | None = None  # scale x per-step gate, rewritten by the loop each step; read by layers
    kv: list[tuple[Tensor, Tensor]] | None = None
    segments: list[tuple[int, int]] = field(default_factory=list)
    seg_offsets: Tensor | None = None
    seg_adapter: Tensor | None = None
    masks: dict[int, Tensor] = field(default_factory=dict)  # query count -> [S, B, N] regional masks
    seg_owner: Tensor | None = None  # [S] adapter of each segment (per-image segments)
    seg_mult: Tensor | None = None  # [S, L] per-image scale factors, None when segments are adapters
    prepared_key: Any = None  # the reference the buffers hold (None: unknown), for the reference cache
    store_key: tuple | None = None  # the static buffer set the layers read (a captured graph is keyed on it)
    buffers: StaticBuffers = field(default_factory=lambda: StaticBuffers(contiguous=True))
    segment_tables: dict[tuple, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)  # per buffer set
    row_tables: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # per row count (per_row)

    def bind(self, scale: Tensor, scale_eff: Tensor) -> None:
        """The ``[adapters, layers]`` scale tensors the layers read (the stack's buffers, again after a move)."""
        self.scale, self.scale_eff = scale, scale_eff

    def set_scale(self, table: Tensor, gated_only: bool = False) -> None:
        """The ``[adapters, layers]`` scale, written in place (nothing recaptures); ``gated_only``: only what the
        layers read, the table already gated (ComfyUI's sigma window)."""
        if not gated_only:
            self.scale.copy_(table, non_blocking=True)
        self.scale_eff.copy_(table, non_blocking=True)

    def gate(self, column: Tensor) -> None:
        """One step's adapter gate (step ranges): the layers read ``scale x column``."""
        if self.scale_eff is not None:
            torch.mul(self.scale, column, out=self.scale_eff)

    @contextlib.contextmanager
    def per_row(self, table: Tensor) -> Iterator[None]:
        """Every UNet row its own scales for one batched call: ``table`` ``[rows, A, L]`` goes into the pair of
        buffers kept for that row count (a CUDA graph captured with them keeps reading that memory); the layers
        read it instead of the ``[A, L]`` scale until the block ends."""
        rows, base = table.shape[0], (self.scale, self.scale_eff)
        if rows not in self.row_tables:
            self.row_tables[rows] = tuple(torch.empty_like(table, device=self.scale.device) for _ in range(2))
        for buf in self.row_tables[rows]:
            buf.copy_(table)
        self.scale, self.scale_eff = self.row_tables[rows]
        try:
            yield
        finally:
            self.scale, self.scale_eff = base

    def hold(self, key: tuple, prepared: Any, kv: list, bounds: list[int], owners: list[int], masks: dict, mult):
        """One request's image state into the static buffer set kept for ``key`` (segment layout, batch, device,
        dtype, mask sizes): per layer keys/values, segment tables, regional masks ``{queries: [S, B, N]}`` and
        per-image factors ``[S, L]`` (None: segments are adapters). ``prepared``: the reference it holds."""
        self.prepared_key, self.store_key = prepared, key
        device = kv[0][0].device
        if key not in self.segment_tables:  # made once per set: no host-to-device copy per request
            self.segment_tables[key] = (
                torch.tensor(bounds, dtype=torch.int32, device=device),
                torch.arange(len(bounds) - 1, dtype=torch.int32, device=device),
                torch.tensor(owners, dtype=torch.long, device=device),
            )
        self.segments = list(itertools.pairwise(bounds))
        self.seg_offsets, self.seg_adapter, self.seg_owner = self.segment_tables[key]
        self.kv, self.masks, self.seg_mult = self.buffers.write((kv, masks, mult), key=(key, mult is not None))

    def clear(self, prepared: Any = None) -> None:
        """No image prompt (``prepared``: the key of what an engine's own buffers hold, if anything)."""
        self.prepared_key, self.store_key, self.kv = prepared, None, None
        self.segments, self.masks, self.seg_mult = [], {}, None

    def forget(self) -> None:
        """The next request prepares its reference again (the caches were dropped)."""
        self.prepared_key = None

    def drop_buffers(self) -> None:
        """Forget every static buffer (after a device move the next request allocates anew)."""
        self.buffers.clear()
        self.segment_tables.clear()
        self.row_tables.clear()
        self.clear()

    def trace(self, kv: list[tuple[Tensor, Tensor]], segments: list[tuple[int, int]], scale: Tensor) -> None:
        """What an exported UNet reads: keys/values computed in the graph, the scale an input, no masks."""
        self.kv, self.segments, self.scale_eff, self.seg_mult, self.masks = kv, segments, scale, None, {}


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
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
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
        fused = None
        if self.fused and attention_mask is None and not _exporting():
            fused = self._fused(query, key, value, kv, scales, mask)
        if fused is not None:
            hidden_states = fused
        else:
            image_kv = [(kv[0][:, :, s:e], kv[1][:, :, s:e]) for s, e in ctx.segments] if kv is not None else ()
            if _exporting():
                hidden_states = decoupled_attention_decomposed(query, key, value, image_kv, scales)
            else:
                hidden_states = decoupled_attention_reference(
                    query, key, value, image_kv, scales, attn_mask=attention_mask, masks=mask
                )

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
