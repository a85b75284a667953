"""The one table of IP-Adapter variants (:data:`VARIANTS`).

Every h94-layout checkpoint is recognised here from the keys of its ``image_proj`` part, in the order diffusers
checks them (``loaders/unet.py::_convert_ip_adapter_image_proj_to_diffusers``); the base model a file fits is decided
by shapes, not by the table. A spec builds diffusers' own projection module and renames the original keys into it,
so the projection math is diffusers' by construction (docs/reference/variants.md: each variant's identifying key,
image input and h94 files).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.models.embeddings import (
    ImageProjection,
    IPAdapterFaceIDImageProjection,
    IPAdapterFaceIDPlusImageProjection,
    IPAdapterFullImageProjection,
    IPAdapterPlusImageProjection,
)
from torch import nn

from ..errors import CheckpointError

StateDict = dict[str, torch.Tensor]

# What the image encoder must produce for a variant.
EMBEDS = "image_embeds"  # projected pooled CLS token; unconditional = zeros in embedding space
HIDDEN = "hidden_states"  # penultimate hidden states; unconditional = encoder run on zero pixels
FACE_ID = "face_id"  # user-supplied face embeddings, no encoder


def key_renamer(rules: list[tuple[str, str]]) -> Callable[[str], str]:
    """A key's new name by the first of ``rules`` (regex, replacement) that matches it; unmatched keys pass as is."""
    compiled = [(re.compile(p), r) for p, r in rules]

    def rename(key: str) -> str:
        for pattern, repl in compiled:
            key, n = pattern.subn(repl, key)
            if n:
                break
        return key

    return rename


# Resampler (PerceiverAttention + FeedForward per layer) in the original layout -> diffusers blocks.
_RESAMPLER_RULES = [
    (r"^layers\.(\d+)\.0\.norm1\.", r"layers.\1.ln0."),
    (r"^layers\.(\d+)\.0\.norm2\.", r"layers.\1.ln1."),
    (r"^layers\.(\d+)\.0\.to_q\.", r"layers.\1.attn.to_q."),
    (r"^layers\.(\d+)\.0\.to_out\.", r"layers.\1.attn.to_out.0."),
    (r"^layers\.(\d+)\.1\.0\.", r"layers.\1.ff.0."),
    (r"^layers\.(\d+)\.1\.1\.", r"layers.\1.ff.1.net.0.proj."),
    (r"^layers\.(\d+)\.1\.3\.", r"layers.\1.ff.1.net.2."),
]


def _convert(sd: StateDict, rules: list[tuple[str, str]], strip: str = "") -> StateDict:
    rename = key_renamer(rules)
    out: StateDict = {}
    for key, value in sd.items():
        k = key[len(strip) :] if strip and key.startswith(strip) else key
        if k.endswith(".0.to_kv.weight"):  # fused K/V rows: first half K, second half V
            q_name = rename(k.replace("to_kv", "to_q"))
            k_half, v_half = value.chunk(2, dim=0)
            out[q_name.replace("to_q.", "to_k.")] = k_half
            out[q_name.replace("to_q.", "to_v.")] = v_half
        else:
            out[rename(k)] = value
    return out


def _shape(sd: StateDict, key: str, origin: str) -> torch.Size:
    if key not in sd:
        raise CheckpointError(f"{origin}: image_proj is missing '{key}', which its layout requires")
    return sd[key].shape


def _heads(sd: StateDict, key: str, origin: str) -> int:
    """diffusers assumes dim_head 64 for Resamplers, so the head count is to_q rows // 64."""
    rows = _shape(sd, key, origin)[0]
    if rows < 64 or rows % 64:
        raise CheckpointError(f"{origin}: image_proj '{key}' has {rows} rows; expected a multiple of 64 (dim_head 64)")
    return rows // 64


def _depth(sd: StateDict, prefix: str = "") -> int:
    return len({int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", k))})


def _build_base(sd: StateDict, origin: str) -> tuple[nn.Module, StateDict]:
    rows, embed_dim = _shape(sd, "proj.weight", origin)
    module = ImageProjection(image_embed_dim=embed_dim, cross_attention_dim=rows // 4, num_image_text_embeds=4)
    return module, _convert(sd, [(r"^proj\.", "image_embeds.")])


def _build_full(sd: StateDict, origin: str) -> tuple[nn.Module, StateDict]:
    module = IPAdapterFullImageProjection(
        image_embed_dim=_shape(sd, "proj.0.weight", origin)[0],
        cross_attention_dim=_shape(sd, "proj.3.weight", origin)[0],
    )
    rules = [
        (r"^proj\.0\.", "ff.net.0.proj."),
        (r"^proj\.2\.", "ff.net.2."),
        (r"^proj\.3\.", "norm."),
    ]
    return module, _convert(sd, rules)


def _build_faceid(sd: StateDict, origin: str) -> tuple[nn.Module, StateDict]:
    inner, id_dim = _shape(sd, "proj.0.weight", origin)
    cross = _shape(sd, "norm.weight", origin)[0]
    module = IPAdapterFaceIDImageProjection(
        image_embed_dim=id_dim,
        cross_attention_dim=cross,
        mult=inner // id_dim,
        num_tokens=_shape(sd, "proj.2.weight", origin)[0] // cross,
    )
    return module, _convert(sd, [(r"^proj\.0\.", "ff.net.0.proj."), (r"^proj\.2\.", "ff.net.2.")])


def _build_faceid_plus(sd: StateDict, origin: str) -> tuple[nn.Module, StateDict]:
    p = "perceiver_resampler."
    embed_dims, hidden_dims = _shape(sd, p + "proj_in.weight", origin)
    module = IPAdapterFaceIDPlusImageProjection(
        embed_dims=embed_dims,
        output_dims=_shape(sd, p + "proj_out.weight", origin)[0],
        hidden_dims=hidden_dims,
        id_embeddings_dim=_shape(sd, "proj.0.weight", origin)[1],
        depth=_depth(sd, p),
        heads=_heads(sd, p + "layers.0.0.to_q.weight", origin),
    )
    rules = [*_RESAMPLER_RULES, (r"^proj\.0\.", "proj.net.0.proj."), (r"^proj\.2\.", "proj.net.2.")]
    return module, _convert(sd, rules, strip=p)


def _build_plus(sd: StateDict, origin: str) -> tuple[nn.Module, StateDict]:
    latents = _shape(sd, "latents", origin)
    module = IPAdapterPlusImageProjection(
        embed_dims=_shape(sd, "proj_in.weight", origin)[1],
        output_dims=_shape(sd, "proj_out.weight", origin)[0],
        hidden_dims=latents[2],
        depth=_depth(sd),
        heads=_heads(sd, "layers.0.0.to_q.weight", origin),
        num_queries=latents[1],
    )
    return module, _convert(sd, _RESAMPLER_RULES)


@dataclass(frozen=True)
class VariantSpec:
    """How one IP-Adapter architecture is recognised, built and fed."""

    name: str
    detect_key: str | None  # present in image_proj => this variant (None: the fallback)
    encoder_output: str  # EMBEDS, HIDDEN or FACE_ID
    build: Callable[[StateDict, str], tuple[nn.Module, StateDict]]
    description: str
    projection_class: type[nn.Module]  # diffusers' module, also how a loaded diffusers pipeline is recognised
    # Accessors on the built projection, so no caller branches on the variant name:
    tokens: Callable[[nn.Module, int | None], int | None]  # tokens per image (arg: encoder tokens)
    encoder_dim: Callable[[nn.Module], int | None]  # CLIP feature size it reads (None: no CLIP input)
    out_dim: Callable[[nn.Module], int]  # token width; must equal the UNet cross-attention dim
    face_id_dim: Callable[[nn.Module], int | None] = lambda m: None  # face-embedding size it reads (None: not FaceID)
    needs_clip_states: bool = False  # FaceID-Plus: face id embeds *and* CLIP hidden states
    has_lora: bool = False  # FaceID family: a LoRA on every attention layer ships in ip_adapter


VARIANTS: tuple[VariantSpec, ...] = (
    VariantSpec(
        "base",
        "proj.weight",
        EMBEDS,
        _build_base,
        "IP-Adapter (4 tokens)",
        ImageProjection,
        tokens=lambda m, _: m.image_embeds.out_features // m.norm.normalized_shape[0],
        encoder_dim=lambda m: m.image_embeds.in_features,
        out_dim=lambda m: m.norm.normalized_shape[0],
    ),
    VariantSpec(
        "full",
        "proj.3.weight",
        HIDDEN,
        _build_full,
        "IP-Adapter Full-face (MLP per token)",
        IPAdapterFullImageProjection,
        tokens=lambda m, encoder_tokens: encoder_tokens,
        encoder_dim=lambda m: m.ff.net[0].proj.in_features,
        out_dim=lambda m: m.norm.normalized_shape[0],
    ),
    VariantSpec(
        "faceid_plus",
        "perceiver_resampler.proj_in.weight",
        FACE_ID,
        _build_faceid_plus,
        "IP-Adapter FaceID-Plus / PlusV2",
        IPAdapterFaceIDPlusImageProjection,
        tokens=lambda m, _: m.num_tokens,
        encoder_dim=lambda m: m.proj_in.in_features,
        out_dim=lambda m: m.proj_out.out_features,
        face_id_dim=lambda m: m.proj.net[0].proj.in_features,
        needs_clip_states=True,
        has_lora=True,
    ),
    VariantSpec(
        "faceid",
        "norm.weight",
        FACE_ID,
        _build_faceid,
        "IP-Adapter FaceID",
        IPAdapterFaceIDImageProjection,
        tokens=lambda m, _: m.num_tokens,
        encoder_dim=lambda m: None,
        out_dim=lambda m: m.norm.normalized_shape[0],
        face_id_dim=lambda m: m.ff.net[0].proj.in_features,
        has_lora=True,
    ),
    VariantSpec(
        "plus",
        None,
        HIDDEN,
        _build_plus,
        "IP-Adapter Plus / Plus-face (Resampler)",
        IPAdapterPlusImageProjection,
        tokens=lambda m, _: m.latents.shape[1],
        encoder_dim=lambda m: m.proj_in.in_features,
        out_dim=lambda m: m.proj_out.out_features,
    ),
)


def detect_variant(image_proj: StateDict, origin: str) -> VariantSpec:
    """The variant of a checkpoint, from its ``image_proj`` keys (diffusers' order)."""
    for spec in VARIANTS:
        if spec.detect_key is None:
            if "latents" in image_proj and "proj_in.weight" in image_proj:
                return spec
        elif spec.detect_key in image_proj:
            return spec
    found = sorted(image_proj)[:6]
    raise CheckpointError(
        f"{origin}: image_proj matches no known IP-Adapter layout; found keys {found}..., expected one of "
        "'proj.weight' (base), 'proj.3.weight' (full-face), 'perceiver_resampler.proj_in.weight' (FaceID-Plus), "
        "'norm.weight' (FaceID) or 'latents' + 'proj_in.weight' (Plus)"
    )


def build_projection(spec: VariantSpec, image_proj: StateDict, origin: str) -> nn.Module:
    """diffusers' projection module for ``spec`` with the checkpoint's weights loaded strictly."""
    module, converted = spec.build(image_proj, origin)
    try:
        module.load_state_dict(converted, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{origin}: image_proj does not fit the {spec.description} layout: {exc}") from exc
    return module.eval()


def variant_of_projection(module: nn.Module) -> VariantSpec:
    """The variant of an already built diffusers projection module (for ``ipa_rt.from_diffusers``)."""
    for spec in VARIANTS:
        if type(module) is spec.projection_class:
            return spec
    raise CheckpointError(f"image projection {type(module).__name__} is not an IP-Adapter variant ipa_rt supports")


@dataclass(frozen=True)
class AdapterFamily:
    """Which base-model family an IP-Adapter checkpoint was trained for, read from its ``ip_adapter`` keys."""

    name: str
    description: str
    matches: Callable[[StateDict], bool]


# The one table of adapter families, most specific first. Flux's per-block image K/V projections carry a bias
# (XLabs-AI), SD3.5's carry an AdaLayerNorm (InstantX); h94's UNet adapters (SD1.5, SDXL, Kolors) have neither.
ADAPTER_FAMILIES: tuple[AdapterFamily, ...] = (
    AdapterFamily("sd3", "SD3.5 (InstantX, SigLIP)", lambda sd: any(".norm_ip." in k for k in sd)),
    AdapterFamily(
        "flux", "Flux.1 / Chroma (XLabs-AI, CLIP ViT-L/14)", lambda sd: any(k.endswith("to_k_ip.bias") for k in sd)
    ),
    AdapterFamily("unet", "SD1.5 / SDXL / Kolors (h94 layout)", lambda sd: True),
)


def adapter_family(ip_adapter: StateDict) -> AdapterFamily:
    """The family of a checkpoint from its ``ip_adapter`` part (the table above; the UNet family is the fallback)."""
    return next(f for f in ADAPTER_FAMILIES if f.matches(ip_adapter))
