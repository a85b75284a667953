"""diffusers' Flux-family pipelines with ipa_rt's IP-Adapter runtime: switch by one import.

``ipa_rt.flux.FluxPipeline`` *is* diffusers' ``FluxPipeline`` with :class:`FluxAdapterMixin` in front, whose
``load_ip_adapter`` installs :class:`FluxImageSide` and :class:`FluxDecoupledProcessor`; the one mixin serves every
pipeline diffusers gives ``FluxIPAdapterMixin`` (table :data:`PIPELINES`), so no class is written per variant
(docs/guides/flux.md, "What changes, and what does not").
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ...adapters.checkpoint import adapter_sources, hub_options, read_adapter
from ...adapters.image import default_feature_extractor
from ...console import hushed
from ...errors import ConfigError, IncompatibleAdapterError
from ...models import drop_image_encoder, load_image_encoder
from ..base import SideMixin
from .adapter import FluxDecoupledProcessor, FluxImageSide, build_image_side, expand_flux_scale
from .kernel import MODES, choose


class FluxAdapterMixin(SideMixin):
    """ipa_rt's IP-Adapter runtime for a diffusers Flux-family pipeline, with ``FluxIPAdapterMixin``'s API."""

    _side_attr, _side_type, _block_processor = "encoder_hid_proj", FluxImageSide, FluxDecoupledProcessor
    _ip_attention = "auto"  # the image branch: the fused kernel on CUDA where it can run, else SDPA

    def set_ip_attention(self, mode: str) -> None:
        """``"auto"`` (the fused Triton kernel on CUDA where it can run, SDPA elsewhere), ``"triton"`` (the kernel
        wherever it can run: the CPU under ``TRITON_INTERPRET=1``; else a ``ConfigError`` saying why) or ``"sdpa"``;
        decided here, once, never per call."""
        side = self._installed_side()
        if side is not None and not self.on_engine:
            param = next(self.transformer.parameters())
            side.use_attention(choose(mode, param.device, param.dtype, self.transformer.config.attention_head_dim))
        elif mode not in MODES:
            raise ConfigError(f"attention {mode!r} is unknown; expected one of {MODES}")
        self._ip_attention = mode

    # --- adapters ---------------------------------------------------------------------------------------------
    def load_ip_adapter(
        self,
        pretrained_model_name_or_path_or_dict: Any,
        weight_name: str | list[str] | None = None,
        subfolder: str | list[str] | None = "",
        image_encoder_pretrained_model_name_or_path: str | os.PathLike | None = "image_encoder",
        image_encoder_subfolder: str | None = "",
        image_encoder_dtype: torch.dtype = torch.float16,
        **kwargs: Any,
    ) -> None:
        """Load XLabs-AI Flux IP-Adapter(s) as diffusers does (``.safetensors`` in XLabs' or diffusers' names,
        ``.bin``, a hub id with ``weight_name``, a state dict; a list loads several), with shape checks that name the
        file. The image encoder is loaded from ``image_encoder_pretrained_model_name_or_path`` when the pipeline
        has none (e.g. ``"openai/clip-vit-large-patch14"`` for XLabs' adapters), else from ``image_encoder/``
        beside the adapter file."""
        hub = hub_options(kwargs)
        sources = adapter_sources(pretrained_model_name_or_path_or_dict, subfolder or None, weight_name)
        raws = [read_adapter(s, **hub) for s in sources]
        side = build_image_side(self.transformer, raws)
        encoder = getattr(self, "image_encoder", None)
        if encoder is None and image_encoder_pretrained_model_name_or_path is not None:
            encoder = self._load_encoder(
                image_encoder_pretrained_model_name_or_path, image_encoder_subfolder, image_encoder_dtype, raws, hub
            )
        _check_encoder(side, encoder)  # before anything is registered: a refused load leaves the pipeline as it was
        if encoder is not None and getattr(self, "image_encoder", None) is None:
            self.register_modules(image_encoder=encoder.to(self.transformer.device))
        if getattr(self, "feature_extractor", None) is None and encoder is not None:
            self.register_modules(feature_extractor=default_feature_extractor(encoder))
        self._install_side(side)
        self.set_ip_attention(self._ip_attention)  # the kernel choice for the new side

    def _load_encoder(self, location: Any, subfolder: str | None, dtype: torch.dtype, raws, hub) -> Any:
        folder = os.fspath(location)
        beside = raws[0].encoder_dir
        if not os.path.isdir(os.path.join(folder, subfolder or "")) and beside and os.path.isdir(beside):
            folder, subfolder = beside, None  # ipa_rt's rule for a missing folder: image_encoder/ beside the adapter
        with hushed(bars=True):
            return load_image_encoder(folder, dtype, subfolder=subfolder or None, **hub)

    def unload_ip_adapter(self) -> None:
        """Restore the transformer's processors and projection exactly; drop the image encoder (diffusers' rule)."""
        self._restore_side()
        drop_image_encoder(self)

    def set_ip_adapter_scale(self, scale: Any) -> None:
        """diffusers' forms (a number, a list of per-block numbers for one adapter, one entry per adapter), written
        in place into the ``[adapters, blocks]`` scale tensor."""
        side = self.image_side
        side.set_scale(expand_flux_scale(scale, side.num_ip_adapters, side.num_blocks))

    def encode_image(self, image: Any, device: Any, num_images_per_prompt: int) -> torch.Tensor:
        """diffusers' ``encode_image``; an image already encoded by this encoder is not encoded again."""
        param = next(self.image_encoder.parameters())
        encode = lambda images: super(FluxAdapterMixin, self).encode_image(images, device, 1)  # noqa: E731
        embeds = self.cached_encode(image, (str(param.device), param.dtype), encode)
        return embeds.repeat_interleave(num_images_per_prompt, dim=0)

    @staticmethod
    def _prepare_side(side: FluxImageSide, embeds: Any) -> Any:
        return side(embeds)


def _check_encoder(side: FluxImageSide, encoder: Any) -> None:
    if encoder is None:
        return
    have = encoder.config.projection_dim
    for proj, origin in zip(side.image_projection_layers, side.origins, strict=True):
        want = proj.image_embeds.in_features
        if have != want:
            raise IncompatibleAdapterError(
                f"image encoder ({encoder.config.name_or_path or 'given module'}) has projection_dim {have}, but "
                f"IP-Adapter '{origin}' expects {want}; expected the encoder it was trained with (XLabs-AI "
                "flux-ip-adapter and -v2: openai/clip-vit-large-patch14, projection_dim 768)"
            )
