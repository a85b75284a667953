"""diffusers' SD3 pipelines with ipa_rt's IP-Adapter runtime: switch by one import.

``ipa_rt.sd3.StableDiffusion3Pipeline`` *is* diffusers' ``StableDiffusion3Pipeline`` with :class:`SD3AdapterMixin` in
front, whose ``load_ip_adapter`` installs :class:`SD3ImageSide` as the transformer's ``image_proj`` and
:class:`SD3JointProcessor` on every block; the one mixin serves every pipeline diffusers gives ``SD3IPAdapterMixin``
(table :data:`PIPELINES`; docs/guides/sd3.md, "What is computed once, and what cannot be").
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ...adapters.checkpoint import RawAdapter, adapter_sources, hub_options, read_adapter
from ...adapters.variants import adapter_family
from ...console import hushed
from ...errors import CheckpointError, ConfigError, IncompatibleAdapterError
from ...models import drop_image_encoder
from ..base import SideMixin, block_processors
from .adapter import SD3BlockAdapter, SD3ImageSide, SD3JointProcessor, diffusers_resampler_name, sd3_scale

REAL_ENCODER = "google/siglip-so400m-patch14-384"  # what InstantX/SD3.5-Large-IP-Adapter was trained with


class SD3AdapterMixin(SideMixin):
    """ipa_rt's IP-Adapter runtime for a diffusers SD3 pipeline, with ``SD3IPAdapterMixin``'s API."""

    _side_attr, _side_type, _block_processor = "image_proj", SD3ImageSide, SD3JointProcessor

    def load_ip_adapter(
        self,
        pretrained_model_name_or_path_or_dict: Any,
        weight_name: str = "ip-adapter.safetensors",
        subfolder: str | None = None,
        image_encoder_folder: str | None = "image_encoder",
        **kwargs: Any,
    ) -> None:
        """Load one SD3.5 IP-Adapter as diffusers does (a ``.safetensors`` or ``.bin`` in InstantX's or diffusers'
        names, a folder or hub id with ``weight_name``, a file path, a state dict), with shape checks that name the
        file. The image encoder is the pipeline's own (pass ``image_encoder=SiglipVisionModel...`` to
        ``from_pretrained``, as diffusers documents); without one it is loaded from ``image_encoder_folder``: a folder
        or hub id when it has a ``/`` (diffusers' rule), else that folder beside the adapter file (diffusers looks for
        it relative to the working directory instead)."""
        hub = hub_options(kwargs)
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
            weight_name = None  # a file path: the file itself (diffusers would read it by weight_name's suffix)
        sources = adapter_sources(source, subfolder or None, weight_name)
        if len(sources) != 1:
            raise ConfigError(f"SD3 pipelines take one IP-Adapter (diffusers' SD3IPAdapterMixin); got {len(sources)}")
        raw = read_adapter(sources[0], **hub)
        side = build_image_side(self.transformer, raw)
        encoder = getattr(self, "image_encoder", None)
        processor = None
        if encoder is None and image_encoder_folder is not None:
            encoder, processor = _load_siglip(raw, subfolder, image_encoder_folder, self.transformer.dtype, hub)
        _check_encoder(side, encoder)  # before anything is registered: a refused load leaves the pipeline as it was
        if processor is not None:
            self.register_modules(image_encoder=encoder.to(self.transformer.device), feature_extractor=processor)
        if encoder is not None and getattr(self, "feature_extractor", None) is None:
            from transformers import SiglipImageProcessor

            size = encoder.config.image_size  # SigLIP's processor: resize to the encoder's size, mean/std 0.5
            with hushed():
                self.register_modules(feature_extractor=SiglipImageProcessor(size={"height": size, "width": size}))
        self._install_side(side)

    def unload_ip_adapter(self) -> None:
        """Restore the transformer's processors and ``image_proj`` exactly; drop the image encoder and feature
        extractor (diffusers' rule)."""
        self._restore_side()
        drop_image_encoder(self)

    @staticmethod
    def _prepare_side(side: SD3ImageSide, embeds: Any) -> Any:
        return side.prepare(embeds)

    @property
    def is_ip_adapter_active(self) -> bool:
        """diffusers' rule (an adapter is loaded and its scale is > 0), read from the host copy of the last scale
        written: once per call, no device read."""
        side = self._installed_side()
        return side is not None and side.host_scale > 0

    def set_ip_adapter_scale(self, scale: float) -> None:
        """diffusers' form (one number for every block), written in place into the 0-d float32 scale tensor."""
        self.image_side.set_scale(sd3_scale(scale))

    def encode_image(self, image: Any, device: Any) -> torch.Tensor:
        """diffusers' ``encode_image`` (SigLIP's penultimate hidden states); an image already encoded by this encoder
        on this device and dtype is not encoded again."""
        encode = lambda images: super(SD3AdapterMixin, self).encode_image(images, device)  # noqa: E731
        return self.cached_encode(image, (str(device), self.dtype), encode)


def build_image_side(transformer: nn.Module, raw: RawAdapter) -> SD3ImageSide:
    """The adapter of ``raw`` checked against an ``SD3Transformer2DModel`` (family, resampler output width, block count,
    every block tensor's shape; errors name the file and the key), built on the meta device and loaded strictly with
    the checkpoint's tensors (no random init: nothing is drawn from the global generator)."""
    origin, family = raw.origin, adapter_family(raw.ip_adapter)
    if family.name != "sd3":
        raise IncompatibleAdapterError(
            f"IP-Adapter '{origin}' is a {family.description} adapter; this pipeline is an SD3 transformer; expected "
            "an SD3.5 IP-Adapter (InstantX/SD3.5-Large-IP-Adapter)"
        )
    proj = {diffusers_resampler_name(k): v for k, v in raw.image_proj.items()}
    needed = ("latents", "proj_in.weight", "proj_out.weight", "layers.0.attn.to_q.weight")
    missing = [k for k in (*needed, "time_embedding.linear_1.weight") if k not in proj]
    if missing:
        raise IncompatibleAdapterError(
            f"IP-Adapter '{origin}' has no image_proj.{missing[0]}; expected InstantX's TimeResampler"
        )
    hidden, embed_dim = proj["proj_in.weight"].shape
    heads, out_dim = proj["layers.0.attn.to_q.weight"].shape[0] // 64, proj["proj_out.weight"].shape[0]
    cfg = transformer.config
    inner, head_dim = cfg.num_attention_heads * cfg.attention_head_dim, cfg.attention_head_dim
    if out_dim != inner:
        raise IncompatibleAdapterError(
            f"IP-Adapter '{origin}' makes adapter tokens of width {out_dim}, but the transformer's attention width is "
            f"{inner}; expected an adapter trained for this base model (SD3.5-Large: 2432)"
        )
    want = {
        "norm_ip.linear.weight": (2 * inner, hidden),
        "norm_ip.linear.bias": (2 * inner,),
        "to_k_ip.weight": (inner, inner),
        "to_v_ip.weight": (inner, inner),
        **{f"{n}.weight": (head_dim,) for n in ("norm_q", "norm_k", "norm_ip_k")},
    }
    count = len(block_processors(transformer))
    for i in range(count):
        for name, shape in want.items():
            w = raw.ip_adapter.get(f"{i}.{name}")
            if w is None or tuple(w.shape) != shape:
                found = "is missing" if w is None else f"is {list(w.shape)}"
                raise IncompatibleAdapterError(
                    f"IP-Adapter '{origin}': {i}.{name} {found}; expected {list(shape)} for this {count}-block "
                    f"transformer (attention width {inner}, head dim {head_dim}, resampler width {hidden})"
                )
    expected = {f"{i}.{name}" for i in range(count) for name in want}
    extra = sorted(set(raw.ip_adapter) - expected)
    if extra:
        raise IncompatibleAdapterError(
            f"IP-Adapter '{origin}' has {extra[0]}, which a {count}-block SD3 transformer has no place for; expected "
            "an adapter trained for this base model"
        )
    timestep_in = proj["time_embedding.linear_1.weight"].shape[1]
    resampler = dict(embed_dim=embed_dim, output_dim=out_dim, hidden_dim=hidden, heads=heads)
    resampler |= dict(num_queries=proj["latents"].shape[1], timestep_in_dim=timestep_in)
    with torch.device("meta"):  # shapes only: the checkpoint's tensors are assigned below
        side = SD3ImageSide(resampler, [SD3BlockAdapter(inner, head_dim, hidden) for _ in range(count)], origin)
    state = proj | {f"ip_blocks.{k}": v for k, v in raw.ip_adapter.items()}
    try:
        side.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise IncompatibleAdapterError(f"IP-Adapter '{origin}' does not fit InstantX's TimeResampler: {exc}") from exc
    return side.eval()


def _load_siglip(raw: RawAdapter, subfolder: str | None, folder: str, dtype: torch.dtype, hub: dict) -> tuple:
    from transformers import SiglipImageProcessor, SiglipVisionModel

    if raw.origin == "<state dict>" and "/" not in folder:
        raise ConfigError(
            "the pipeline has no image_encoder and the IP-Adapter is a state dict, so image_encoder_folder has nothing "
            f"to be relative to; pass image_encoder= to from_pretrained (e.g. {REAL_ENCODER}), or image_encoder_folder="
            "a folder or hub id, or None to use ip_adapter_image_embeds only"
        )
    location, sub = folder, None
    if "/" not in folder:  # a name inside the adapter's folder or repo
        if raw.encoder_dir is not None:  # a local file: the folder beside it
            location = os.path.join(os.path.dirname(raw.encoder_dir), folder)
        elif raw.encoder_subfolder is not None:  # a hub file: "<repo>::<subfolder/>image_encoder"
            location = raw.encoder_subfolder.split("::")[0]
            sub = f"{subfolder}/{folder}" if subfolder else folder
    try:
        with hushed(bars=True):
            encoder = SiglipVisionModel.from_pretrained(location, subfolder=sub or "", dtype=dtype, **hub)
            processor = SiglipImageProcessor.from_pretrained(location, subfolder=sub or "", **hub)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"no SigLIP image encoder at '{location}'{f' (subfolder {sub})' if sub else ''}: {exc}; InstantX's "
            f"adapter ships none: pass image_encoder=SiglipVisionModel.from_pretrained('{REAL_ENCODER}') and its "
            "SiglipImageProcessor as feature_extractor= to from_pretrained"
        ) from exc
    return encoder.eval(), processor


def _check_encoder(side: SD3ImageSide, encoder: Any) -> None:
    if encoder is None:
        return
    have, want = encoder.config.hidden_size, side.proj_in.in_features
    if have != want:
        raise IncompatibleAdapterError(
            f"image encoder ({encoder.config.name_or_path or type(encoder).__name__}) has hidden_size {have}, but "
            f"IP-Adapter '{side.origin}' expects {want}; expected the encoder it was trained with ({REAL_ENCODER})"
        )
