"""Flux / Chroma IP-Adapter (XLabs-AI layout) with the image side computed once and the scale as a tensor.

:class:`FluxImageSide` takes the place of the transformer's ``encoder_hid_proj`` and turns a call's image embeddings
into one :class:`FluxImageTokens` (tokens and every double block's keys/values); the very same tensors at the next
step return the same object. :class:`FluxDecoupledProcessor` reads it and its column of the ``[adapters, blocks]``
scale tensor (docs/guides/flux.md, "What changes, and what does not").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import MultiIPAdapterImageProjection, apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections
from torch import Tensor, nn

from ...adapters.checkpoint import RawAdapter
from ...adapters.stack import copied_linear
from ...adapters.variants import EMBEDS, adapter_family, build_projection, detect_variant
from ...errors import ConfigError, IncompatibleAdapterError, ScaleError
from ...kernels.reference import image_segment
from ...runtime.graphs import StaticImage
from ...runtime.lru import IdentityMemo
from ..base import MovableSide
from .kernel import FusedKV, fuse, fused_branch

_MEMO = 4  # image-embedding sets kept per transformer: cond and true-CFG negative of the current call, and spares


@dataclass
class FluxImageTokens:
    """One call's image side: tokens per adapter and, per double block, each adapter's ``(K, V)`` ``[B, H, T, d]``.

    ``side`` is read at attention time for its current scale tensor (a ``.to()`` may have replaced it)."""

    tokens: list[Tensor]
    kv: list[list[tuple[Tensor, Tensor]]]
    side: FluxImageSide
    scale: Tensor | None = None  # an engine's ``ip_scale`` input while exporting; else the side's tensor
    fused: FusedKV | None = None  # the keys/values end to end, when the side runs the kernel

    def attend(self, layer: int, query: Tensor, like: Tensor) -> Tensor:
        """Σ_a scale[a, layer] · softmax(Q K_aᵀ/√d) V_a for ``query`` ``[B, N, H, d]`` (normalised, not rotated),
        summed into zeros like ``like`` in adapter order, as diffusers sums it (or by the fused kernel)."""
        q = query.transpose(1, 2)
        scale = self.scale if self.scale is not None else self.side.scale
        if self.fused is not None and self.side.use_kernel:
            out = fused_branch(q, self.fused, layer, scale)
            if out is not None:
                return out
            self.side.use_kernel = False  # failed here: SDPA from now on (fused_branch warned once)
        out = torch.zeros_like(like)
        for a, (k, v) in enumerate(self.kv[layer]):
            out = out + image_segment(q, k, v, scale[a, layer])
        return out


class FluxImageSide(MovableSide, MultiIPAdapterImageProjection):
    """The transformer's ``encoder_hid_proj`` while ipa_rt's adapters are installed (see the module docstring).

    Holds each adapter's projection (diffusers' ``ImageProjection``), per double block and adapter the image key
    and value projections (``Linear`` with bias, as XLabs trained them), and the ``[adapters, blocks]`` float32
    scale tensor.
    """

    def __init__(
        self,
        projections: Sequence[nn.Module],
        to_k_ip: Sequence[Sequence[nn.Linear]],
        to_v_ip: Sequence[Sequence[nn.Linear]],
        heads: int,
        origins: Sequence[str],
    ) -> None:
        super().__init__(list(projections))
        self.to_k_ip = nn.ModuleList(nn.ModuleList(ks) for ks in to_k_ip)  # [block][adapter]
        self.to_v_ip = nn.ModuleList(nn.ModuleList(vs) for vs in to_v_ip)
        self.heads = heads
        self.origins = list(origins)
        self.scale = torch.ones(len(projections), len(to_k_ip))
        self.use_kernel = False  # decided once by the pipeline (kernel.choose), never per call
        self._memo = IdentityMemo(_MEMO)
        self.static = StaticImage()  # what a captured transformer reads (Graphed stages into it)

    def use_attention(self, use_kernel: bool) -> None:
        """The image branch's attention from now on: the fused kernel or SDPA (prepared tokens hold the kernel's
        fused keys/values or not, so they are prepared again)."""
        self.use_kernel = use_kernel
        self._memo.clear()

    @property
    def num_blocks(self) -> int:
        return len(self.to_k_ip)

    def set_scale(self, table: Sequence[Sequence[float]]) -> None:
        """Write ``[adapters][blocks]`` scales into the scale tensor in place (no new tensor, nothing recompiles)."""
        self.scale.copy_(torch.tensor(table, dtype=torch.float32))

    def _kv(self, linear: nn.Linear, tokens: Tensor) -> Tensor:
        b = tokens.shape[0]
        return linear(tokens).view(b, -1, self.heads, linear.out_features // self.heads).transpose(1, 2)

    def project(self, image_embeds: list[Tensor]) -> list[Tensor]:
        """Image tokens ``[B, n_img, T, C]`` per adapter (diffusers' ``MultiIPAdapterImageProjection``)."""
        return super().forward(image_embeds)

    def image_kv(self, tokens: Sequence[Tensor]) -> list[list[tuple[Tensor, Tensor]]]:
        """Per double block, each adapter's image ``(K, V)`` ``[B, H, n_img·T, d]`` (diffusers' view and layout)."""
        return [
            [(self._kv(k, t), self._kv(v, t)) for k, v, t in zip(ks, vs, tokens, strict=True)]
            for ks, vs in zip(self.to_k_ip, self.to_v_ip, strict=True)
        ]

    @torch.no_grad()
    def forward(self, image_embeds: list[Tensor]) -> FluxImageTokens:  # type: ignore[override]
        if self.static.is_frozen:  # inside a captured transformer: the staged static copy, never computed here
            return self.static.current
        embeds = list(image_embeds) if isinstance(image_embeds, (list, tuple)) else [image_embeds]
        prepared = self._memo.get(embeds)
        if prepared is None:
            tokens = self.project(image_embeds)
            kv = self.image_kv(tokens)
            prepared = FluxImageTokens(tokens, kv, self, fused=fuse(kv) if self.use_kernel else None)
            self._memo.put(embeds, prepared)
        return prepared


class FluxDecoupledProcessor:
    """Drop-in for diffusers' ``FluxIPAdapterAttnProcessor`` on a double-stream block, reading the image side
    from :class:`FluxImageTokens`. A plain object: the transformer's parameters stay the base model's and the
    adapter's live in :class:`FluxImageSide`."""

    _attention_backend = None  # diffusers' attention-backend selection applies to the joint attention
    _parallel_config = None

    def __init__(self, layer: int) -> None:
        self.layer = layer

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: Tensor | None = None,
        ip_hidden_states: FluxImageTokens | None = None,
        ip_adapter_masks: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        if ip_adapter_masks is not None:
            raise ConfigError("ip_adapter_masks: Flux IP-Adapters have no regional masks (diffusers ignores them)")
        query, key, value, enc_q, enc_k, enc_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (attn.heads, -1)))
        key = attn.norm_k(key.unflatten(-1, (attn.heads, -1)))
        value = value.unflatten(-1, (attn.heads, -1))
        ip_query = query  # the image branch reads the normalised query before the text joins and before RoPE
        if encoder_hidden_states is not None:
            query = torch.cat([attn.norm_added_q(enc_q.unflatten(-1, (attn.heads, -1))), query], dim=1)
            key = torch.cat([attn.norm_added_k(enc_k.unflatten(-1, (attn.heads, -1))), key], dim=1)
            value = torch.cat([enc_v.unflatten(-1, (attn.heads, -1)), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text = encoder_hidden_states.shape[1]
        enc_out, out = out.split_with_sizes([text, out.shape[1] - text], dim=1)
        out = attn.to_out[1](attn.to_out[0](out))
        enc_out = attn.to_add_out(enc_out)
        if ip_hidden_states is None:  # no image prompt this call: the base model's block exactly
            return out, enc_out
        return out, enc_out, ip_hidden_states.attend(self.layer, ip_query, out)


def build_image_side(transformer: nn.Module, raws: Sequence[RawAdapter]) -> FluxImageSide:
    """The adapters of ``raws`` checked against a Flux/Chroma transformer (every shape; errors name the file)."""
    cfg = transformer.config
    joint, heads, blocks = cfg.joint_attention_dim, cfg.num_attention_heads, cfg.num_layers  # double blocks
    inner = heads * cfg.attention_head_dim
    projections = []
    per_block = {"to_k_ip": [[] for _ in range(blocks)], "to_v_ip": [[] for _ in range(blocks)]}  # [block][adapter]
    for raw in raws:
        family = adapter_family(raw.ip_adapter)
        if family.name != "flux":
            raise IncompatibleAdapterError(
                f"IP-Adapter '{raw.origin}' is a {family.description} adapter; this pipeline is a Flux/Chroma "
                "transformer; expected an XLabs-AI Flux IP-Adapter (e.g. XLabs-AI/flux-ip-adapter)"
            )
        spec = detect_variant(raw.image_proj, raw.origin)
        if spec.encoder_output != EMBEDS or spec.name != "base":
            raise IncompatibleAdapterError(
                f"IP-Adapter '{raw.origin}': a Flux adapter with a {spec.description} projection; diffusers' Flux "
                "loader only knows the ImageProjection layout (proj + norm)"
            )
        proj = build_projection(spec, raw.image_proj, raw.origin)
        if spec.out_dim(proj) != joint:
            raise IncompatibleAdapterError(
                f"IP-Adapter '{raw.origin}' makes image tokens of width {spec.out_dim(proj)}, but the transformer's "
                f"joint_attention_dim is {joint}; expected an adapter trained for this base model"
            )
        for i in range(blocks):
            for kind, linears in per_block.items():
                w, b = raw.ip_adapter.get(f"{i}.{kind}.weight"), raw.ip_adapter.get(f"{i}.{kind}.bias")
                if w is None or b is None:
                    raise IncompatibleAdapterError(
                        f"IP-Adapter '{raw.origin}' has no {i}.{kind} weight/bias; the transformer has {blocks} "
                        "double-stream blocks and expects one image key/value projection each"
                    )
                if tuple(w.shape) != (inner, joint) or tuple(b.shape) != (inner,):
                    raise IncompatibleAdapterError(
                        f"IP-Adapter '{raw.origin}': {i}.{kind}.weight is {list(w.shape)}; expected [{inner}, {joint}] "
                        "for this transformer (inner dim, joint_attention_dim)"
                    )
                linears[i].append(copied_linear(w, b))
        extra = sorted({int(k.split(".")[0]) for k in raw.ip_adapter if k.split(".")[0].isdigit()} - set(range(blocks)))
        if extra:
            raise IncompatibleAdapterError(
                f"IP-Adapter '{raw.origin}' has weights for block {extra[0]}, but the transformer has only {blocks} "
                "double-stream blocks; expected an adapter trained for this base model"
            )
        projections.append(proj.eval())
    return FluxImageSide(projections, per_block["to_k_ip"], per_block["to_v_ip"], heads, [r.origin for r in raws])


def expand_flux_scale(scale: Any, adapters: int, blocks: int) -> list[list[float]]:
    """``set_ip_adapter_scale`` input → ``[adapters][blocks]`` floats, by diffusers' ``FluxIPAdapterMixin`` rules:
    a number (every block of every adapter), a list of ``blocks`` numbers (one adapter), or one entry per adapter
    (a number or a list of ``blocks`` numbers)."""

    def number(x: Any, where: str) -> float:
        if isinstance(x, bool) or not isinstance(x, Real):
            raise ScaleError(f"{where} is {x!r} ({type(x).__name__}); expected a number")
        return float(x)

    if isinstance(scale, (list, tuple)) and adapters == 1 and all(not isinstance(s, (list, tuple)) for s in scale):
        scale = [list(scale)]  # per-block scales of the only adapter
    if not isinstance(scale, (list, tuple)):
        scale = [number(scale, "scale")] * adapters
    if len(scale) != adapters:
        raise ScaleError(f"scale has {len(scale)} entries for {adapters} IP-Adapter(s); expected one per adapter")
    out = []
    for a, s in enumerate(scale):
        if isinstance(s, (list, tuple)):
            if len(s) != blocks:
                raise ScaleError(
                    f"scale[{a}] has {len(s)} values; expected {blocks} (one per double-stream block) or one number"
                )
            out.append([number(x, f"scale[{a}][{i}]") for i, x in enumerate(s)])
        else:
            out.append([number(s, f"scale[{a}]")] * blocks)
    return out
