"""Loaded IP-Adapters: projections, per-layer image K/V weights, the scale tensor, and the UNet wrap.

The UNet is wrapped, never edited for good (refiners' inject/eject): :meth:`IPAdapterStack.install` swaps
diffusers' ``attn2`` processors for :class:`~ipa_rt.adapters.attention.DecoupledCrossAttnProcessor` and wraps the
FaceID LoRA targets; :meth:`IPAdapterStack.restore` puts back exactly what was there. The per-request image state
the processors read (keys/values, masks, scales, static buffers) is the stack's
:class:`~ipa_rt.runtime.image_state.ImageContext`, written through its methods (:meth:`IPAdapterStack.prepare` computes
what goes in).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError, IncompatibleAdapterError, ScaleError
from ..runtime.image_state import ImageContext
from .attention import DecoupledCrossAttnProcessor
from .checkpoint import AdapterSource, RawAdapter
from .variants import VariantSpec, adapter_family, build_projection, detect_variant, variant_of_projection


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Names of the UNet's cross-attention processors, in diffusers' ``attn_processors`` order."""
    skip = ("motion_modules", "encoder_hid_proj")  # AnimateDiff temporal layers, diffusers' own Resamplers
    return [n for n in unet.attn_processors if not n.endswith("attn1.processor") and not any(s in n for s in skip)]


def _module_of(unet: nn.Module, processor_name: str) -> nn.Module:
    return unet.get_submodule(processor_name.removesuffix(".processor"))


def _check_layers(raw: RawAdapter, layers: list[str], cross_dim: int, inner: list[int]) -> None:
    found = sum(1 for k in raw.ip_adapter if k.endswith(".to_k_ip.weight"))
    if found != len(layers):
        raise IncompatibleAdapterError(
            f"IP-Adapter '{raw.origin}' has image K/V weights for {found} cross-attention layers, but the base "
            f"UNet has {len(layers)}; expected an adapter for this base model (SD1.5 has 16 such layers, SDXL 70)"
        )
    for i, name in enumerate(layers):
        for part in ("to_k_ip", "to_v_ip"):
            key = f"{2 * i + 1}.{part}.weight"
            if key not in raw.ip_adapter:
                raise IncompatibleAdapterError(
                    f"IP-Adapter '{raw.origin}' lacks ip_adapter '{key}' for layer {name}; expected keys "
                    "1, 3, 5, ... for the cross-attention layers (h94 layout)"
                )
            shape = tuple(raw.ip_adapter[key].shape)
            if shape != (inner[i], cross_dim):
                raise IncompatibleAdapterError(
                    f"IP-Adapter '{raw.origin}': ip_adapter '{key}' has shape {list(shape)}, but layer {name} "
                    f"needs [{inner[i]}, {cross_dim}] (inner dim, cross_attention_dim)"
                )


def _collect_lora(unet: nn.Module, raw: RawAdapter) -> dict[str, Tensor]:
    """FaceID LoRA keyed by ``{module path}.{to_q|to_k|to_v|to_out.0}.{down|up}`` (diffusers' key ids)."""
    out: dict[str, Tensor] = {}
    for key_id, name in enumerate(unet.attn_processors):
        if f"{key_id}.to_k_lora.down.weight" not in raw.ip_adapter:
            continue
        path = name.removesuffix(".processor")
        for proj, target in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
            for part in ("down", "up"):
                key = f"{key_id}.{proj}_lora.{part}.weight"
                if key not in raw.ip_adapter:
                    raise IncompatibleAdapterError(f"IP-Adapter '{raw.origin}' has a partial LoRA: '{key}' missing")
                out[f"{path}.{target}.{part}"] = raw.ip_adapter[key]
    return out  # may be empty: diffusers also runs a FaceID checkpoint that ships no LoRA


def copied_linear(weight: Tensor, bias: Tensor | None = None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` (and ``bias``)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class LoRALinear(nn.Module):
    """``base(x) + up(down(x))``: the FaceID LoRA, applied like PEFT with scaling 1 (alpha = rank)."""

    def __init__(self, base: nn.Module, down: Tensor, up: Tensor) -> None:
        super().__init__()
        self.base, self.down, self.up = base, copied_linear(down), copied_linear(up)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.up(self.down(x.to(self.down.weight.dtype)))


@dataclass
class AdapterEntry:
    """One loaded adapter: its variant, projection, per-layer image K/V weights and FaceID LoRA."""

    spec: VariantSpec
    projection: nn.Module
    to_k_ip: list[nn.Linear]  # one per cross-attention layer
    to_v_ip: list[nn.Linear]
    lora: dict[str, Tensor]  # "{module path}.{to_q|to_k|to_v|to_out.0}.{down|up}" -> weight
    origin: str
    encoder_dir: str | None = None  # default image_encoder/ beside the file (diffusers' rule)
    encoder_subfolder: str | None = None  # hub form of the same

    @property
    def tokens_per_image(self) -> int | None:
        return self.spec.tokens(self.projection, None)


class IPAdapterStack(nn.Module):
    """All loaded adapters of one pipeline.

    Holds each adapter's projection (diffusers' own module), ``to_k_ip`` / ``to_v_ip`` for every
    cross-attention layer, FaceID LoRA weights, and the ``[adapters, layers]`` scale buffer that every
    processor reads. Adapter order is the order given at load time, as in diffusers.
    """

    supports_masks = True  # regional masks (engines leave them out)

    def __init__(self, unet: nn.Module, entries: Sequence[AdapterEntry]) -> None:
        super().__init__()
        self.layer_names = cross_attention_layers(unet)
        self.heads = [_module_of(unet, n).heads for n in self.layer_names]
        self.entries = list(entries)
        self.projections = nn.ModuleList(e.projection for e in entries)
        self.to_k_ip = nn.ModuleList(nn.ModuleList(e.to_k_ip[i] for e in entries) for i in range(len(self.heads)))
        self.to_v_ip = nn.ModuleList(nn.ModuleList(e.to_v_ip[i] for e in entries) for i in range(len(self.heads)))
        self.register_buffer("scale", torch.ones(len(entries), len(self.layer_names)), persistent=False)
        self.register_buffer("scale_eff", torch.ones(len(entries), len(self.layer_names)), persistent=False)
        self.context = ImageContext(scale=self.scale, scale_eff=self.scale_eff)  # the per-request image state
        self.head_dims = [
            _module_of(unet, n).to_k.out_features // h for n, h in zip(self.layer_names, self.heads, strict=False)
        ]
        self._saved: dict | None = None
        self._fused = [False] * len(self.layer_names)
        self.processors: list[DecoupledCrossAttnProcessor] = []  # the installed ones, by layer

    @classmethod
    def from_checkpoints(
        cls, unet: nn.Module, raws: Sequence[RawAdapter], sources: Sequence[AdapterSource]
    ) -> IPAdapterStack:
        """Build from h94-layout checkpoints, checking every shape against the UNet."""
        layers = cross_attention_layers(unet)
        cross_dim = unet.config.cross_attention_dim
        inner = [_module_of(unet, n).to_k.out_features for n in layers]
        entries = []
        for raw, src in zip(raws, sources, strict=True):
            family = adapter_family(raw.ip_adapter)
            if family.name != "unet":
                raise IncompatibleAdapterError(
                    f"IP-Adapter '{raw.origin}' is a {family.description} adapter; this pipeline's base model is a "
                    f"UNet (SD1.5/SDXL); expected an h94-layout adapter for it"
                    + (" (load Flux adapters with ipa_rt.flux)" if family.name == "flux" else "")
                )
            spec = detect_variant(raw.image_proj, raw.origin)
            proj = build_projection(spec, raw.image_proj, raw.origin)
            if spec.needs_clip_states:
                proj.shortcut, proj.shortcut_scale = src.shortcut, src.shortcut_scale
            out_dim = spec.out_dim(proj)
            if out_dim != cross_dim:
                raise IncompatibleAdapterError(
                    f"IP-Adapter '{raw.origin}' ({spec.description}) makes image tokens of width {out_dim}, but the "
                    f"base UNet's cross_attention_dim is {cross_dim}; expected an adapter trained for this base "
                    "(SD1.5: 768, SDXL: 2048)"
                )
            _check_layers(raw, layers, cross_dim, inner)
            entries.append(
                AdapterEntry(
                    spec,
                    proj,
                    [copied_linear(raw.ip_adapter[f"{2 * i + 1}.to_k_ip.weight"]) for i in range(len(layers))],
                    [copied_linear(raw.ip_adapter[f"{2 * i + 1}.to_v_ip.weight"]) for i in range(len(layers))],
                    _collect_lora(unet, raw) if spec.has_lora else {},
                    raw.origin,
                    raw.encoder_dir,
                    raw.encoder_subfolder,
                )
            )
        return cls(unet, entries)

    @classmethod
    def from_diffusers_unet(cls, unet: nn.Module) -> tuple[IPAdapterStack, Tensor]:
        """Take over the adapters a diffusers ``load_ip_adapter`` put into ``unet``; also returns their scales."""
        from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

        hid = unet.encoder_hid_proj
        if hid is None or not hasattr(hid, "image_projection_layers"):
            raise ConfigError(
                "ipa_rt.from_diffusers: the pipeline's UNet has no IP-Adapter; call load_ip_adapter first"
            )
        layers = cross_attention_layers(unet)
        procs = [unet.attn_processors[n] for n in layers]
        for name, proc in zip(layers, procs, strict=True):
            if not isinstance(proc, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)):
                raise ConfigError(f"ipa_rt.from_diffusers: {name} has {type(proc).__name__}; expected an IP processor")
        scales = []
        for p in procs:
            if any(isinstance(s, (list, tuple)) for s in p.scale):
                raise ScaleError("ipa_rt.from_diffusers: per-image (masked) scales are not supported; expected floats")
            scales.append([float(s) for s in p.scale])
        entries = [
            AdapterEntry(
                variant_of_projection(proj),
                proj,
                [p.to_k_ip[a] for p in procs],
                [p.to_v_ip[a] for p in procs],
                {},  # a FaceID LoRA is already inside the UNet as PEFT layers
                f"<diffusers adapter {a}>",
            )
            for a, proj in enumerate(hid.image_projection_layers)
        ]
        return cls(unet, entries), torch.tensor(scales, dtype=torch.float32).T.contiguous()

    # --- scale ---------------------------------------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):  # keep the shared context on the moved buffer
        result = super()._apply(fn, *args, **kwargs)
        self.context.bind(self.scale, self.scale_eff)
        return result

    @property
    def num_adapters(self) -> int:
        return len(self.entries)

    def to_runtime(self, device: torch.device | str, dtype: torch.dtype) -> IPAdapterStack:
        """Weights to ``dtype`` on ``device``; the scale tensor stays float32."""
        self.to(device=device)
        for part in (self.projections, self.to_k_ip, self.to_v_ip):
            part.to(dtype=dtype)
        return self

    # --- wrap / restore --------------------------------------------------------------------------------------
    def install(self, unet: nn.Module) -> None:
        """Swap in decoupled processors (and FaceID LoRA wrappers); remember what was there."""
        if self._saved is not None:
            return
        processors = dict(unet.attn_processors)
        saved = {"processors": processors, "encoder_hid_proj": unet.encoder_hid_proj, "wrapped": []}
        layers = range(len(self.layer_names))
        self.processors = [DecoupledCrossAttnProcessor(i, self.context, fused=self._fused[i]) for i in layers]
        unet.set_attn_processor(processors | dict(zip(self.layer_names, self.processors, strict=True)))
        # A diffusers UNet that had load_ip_adapter called projects embeds itself; ipa_rt does it once per call.
        unet.encoder_hid_proj = None
        for lora in (e.lora for e in self.entries):
            for key in {k.rsplit(".", 1)[0] for k in lora}:
                parent_path, _, attr = key.rpartition(".")
                parent = unet.get_submodule(parent_path)
                original = getattr(parent, attr)  # also a ModuleList entry: attr "0" of to_out
                weight = next(original.parameters())
                wrapper = LoRALinear(original, lora[key + ".down"], lora[key + ".up"])
                setattr(parent, attr, wrapper.to(device=weight.device, dtype=weight.dtype))
                saved["wrapped"].append((parent, attr, original))
        self._saved = saved

    def restore(self, unet: nn.Module) -> None:
        """Undo :meth:`install`: the UNet is again exactly the module it was before."""
        if self._saved is None:
            return
        for parent, attr, original in reversed(self._saved["wrapped"]):
            setattr(parent, attr, original)
        unet.encoder_hid_proj = self._saved["encoder_hid_proj"]  # first: its Resamplers own processors too
        unet.set_attn_processor(self._saved["processors"])
        self._saved = None

    # --- per-request image state --------------------------------------------------------------------------
    @torch.no_grad()
    def project(self, embeds: Sequence[Tensor], clip_states: Sequence[Tensor | None]) -> list[Tensor]:
        """Image tokens ``[B, n_img, T, C]`` per adapter from encoder outputs ``[B, n_img, ...]``."""
        tokens = []
        for entry, emb, clip in zip(self.entries, embeds, clip_states, strict=True):
            proj, b, n = entry.projection, *emb.shape[:2]
            if entry.spec.needs_clip_states:
                proj.clip_embeds = clip
            try:
                t = proj(emb.reshape((b * n, *emb.shape[2:])))
            finally:
                if entry.spec.needs_clip_states:
                    proj.clip_embeds = None
            tokens.append(t.reshape((b, n, *t.shape[1:])))
        return tokens

    @torch.no_grad()
    def prepare(
        self,
        tokens: Sequence[Tensor] | None,
        masks: Sequence[Tensor | None] | None = None,
        image_scale: Tensor | None = None,
        key: tuple | None = None,
        kv: Sequence[tuple[Tensor, Tensor]] | None = None,
        queries: Sequence[int] | None = None,
    ) -> list[tuple[Tensor, Tensor]] | None:
        """Compute every layer's image keys/values once for this request (they do not depend on the step), or take
        them from ``kv`` (what an earlier ``prepare`` of the same tokens returned: the reference cache keeps it),
        and hold them in the context (:meth:`~ipa_rt.runtime.image_state.ImageContext.hold`). Returns the per-layer
        ``(K, V)`` it wrote from (None without tokens); ``key``: the reference, for the reference cache.

        Per layer, all keys (and values) go end to end into one ``[B, H, T, d]`` buffer: one segment per adapter,
        or per image with a regional mask ``[1, n_img, H, W]``, downsampled to every layer's query count
        (``queries``, at the call's size); the segments' semantics: docs/design.md (decoupled attention).
        """
        if tokens is None:
            self.context.clear(key)
            return None
        queries = list(queries or ())
        masks = list(masks) if masks is not None else [None] * len(tokens)
        flat = [t.reshape(t.shape[0], -1, t.shape[-1]) for t in tokens]  # images of one adapter concatenated
        bounds, owners, images = [0], [], []
        for a, (t, m) in enumerate(zip(tokens, masks, strict=True)):
            per_image = t.shape[2]
            for i in range(t.shape[1] if m is not None else 1):
                bounds.append(bounds[-1] + (per_image if m is not None else t.shape[1] * per_image))
                owners.append(a)
                images.append(i if m is not None else -1)
        device, batch, dtype = flat[0].device, flat[0].shape[0], flat[0].dtype
        masked = any(m is not None for m in masks)
        kv = list(kv) if kv is not None else self.image_kv(flat)  # masks and scales do not enter K/V
        down = self._downsample_masks(masks, tokens, queries, batch, device, dtype)
        mult = None
        if masked or image_scale is not None:  # per-image scale factors per layer: [S, L]
            mult = torch.ones(len(bounds) - 1, len(self.heads), device=device)
            if image_scale is not None:
                for s, (a, i) in enumerate(zip(owners, images, strict=True)):
                    if i >= 0:
                        mult[s] = image_scale[a, i].to(device)
        store = (tuple(bounds), batch, device, dtype, tuple(queries) if masked else ())
        self.context.hold(store, key, kv, bounds, owners, down, mult)
        return kv

    def drop_buffers(self) -> None:
        """Forget every image-side static buffer (after a device move the next request allocates anew)."""
        self.context.drop_buffers()

    def image_kv(self, tokens: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Per layer ``(K, V)`` ``[B, H, T, d]`` of all adapters' tokens ``[B, T_a, C]`` laid end to end: a pure
        function (the static buffers copy from it; the ONNX export traces it)."""
        out = []
        for layer, heads in enumerate(self.heads):
            k = torch.cat([self.to_k_ip[layer][a](x) for a, x in enumerate(tokens)], dim=1)
            v = torch.cat([self.to_v_ip[layer][a](x) for a, x in enumerate(tokens)], dim=1)
            b, t, inner = k.shape
            shape = (b, t, heads, inner // heads)
            out.append((k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)))
        return out

    def _downsample_masks(self, masks, tokens, queries: list[int], batch: int, device, dtype) -> dict[int, Tensor]:
        """``{query tokens: [S, B, N]}`` for every layer resolution: diffusers' bicubic mask downsampling, ones
        for segments without a mask (multiplying by one is exact)."""
        if all(m is None for m in masks):
            return {}
        from diffusers.image_processor import IPAdapterMaskProcessor

        out: dict[int, Tensor] = {}
        for n in sorted(set(queries)):
            rows = []
            for t, m in zip(tokens, masks, strict=True):
                if m is None:
                    rows.append(torch.ones(batch, n, device=device, dtype=dtype))
                    continue
                for i in range(t.shape[1]):
                    down = IPAdapterMaskProcessor.downsample(m[:, i], batch, n, 1)
                    rows.append(down[..., 0].to(device=device, dtype=dtype))
            out[n] = torch.stack(rows)
        return out

    def set_attention(self, fused: Sequence[bool]) -> None:
        """Choose per layer between the fused kernel and the SDPA reference (host decision, once)."""
        if any(fused):
            from ..kernels import ops  # noqa: F401  (registers torch.ops.ipa_rt.decoupled_attention)
        self._fused = list(fused)
        for proc in self.processors:
            proc.fused = self._fused[proc.layer]
