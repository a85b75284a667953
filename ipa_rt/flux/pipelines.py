"""diffusers' Flux-family pipelines with ipa_rt's IP-Adapter runtime: switch by one import.

``ipa_rt.flux.FluxPipeline`` *is* diffusers' ``FluxPipeline`` (same ``from_pretrained``, same ``__call__``, same
loop and schedulers) with :class:`FluxAdapterMixin` in front: ``load_ip_adapter`` reads XLabs-AI checkpoints
with ipa_rt's checks and installs :class:`~ipa_rt.flux.adapter.FluxImageSide` and
:class:`~ipa_rt.flux.adapter.FluxDecoupledProcessor` (image keys/values once per call instead of every step, the
scale a tensor), ``encode_image`` keeps a content-keyed cache of encoder outputs (the default black negative
image is encoded once), and ``unload_ip_adapter`` restores the transformer exactly. The same mixin serves every
pipeline diffusers gives ``FluxIPAdapterMixin`` (table :data:`PIPELINES`), so no class is written per variant.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..checkpoint import HUB_KWARGS, adapter_sources, read_adapter
from ..conditions import ReferenceCacheMixin
from ..console import hushed
from ..errors import ConfigError, IncompatibleAdapterError
from ..graphs import GraphedNetworkMixin, StaticImage
from ..models import drop_image_encoder, pipeline_class_maker
from .adapter import (
    FluxDecoupledProcessor,
    FluxDims,
    FluxImageSide,
    build_image_side,
    double_block_processors,
    expand_flux_scale,
)
from .kernel import MODES, choose

_ABSENT = object()


class FluxAdapterMixin(GraphedNetworkMixin, ReferenceCacheMixin):
    """ipa_rt's IP-Adapter runtime for a diffusers Flux-family pipeline, with ``FluxIPAdapterMixin``'s API."""

    _ipa_saved: dict | None = None
    _ip_attention = "auto"  # the image branch: the fused kernel on CUDA where it can run, else SDPA

    def set_ip_attention(self, mode: str) -> None:
        """``"auto"`` (the fused Triton kernel on CUDA where it can run, SDPA elsewhere), ``"triton"`` (the kernel
        wherever it can run: the CPU under ``TRITON_INTERPRET=1``; else a ``ConfigError`` saying why) or ``"sdpa"``;
        decided here, once, never per call."""
        side = getattr(self.transformer, "encoder_hid_proj", None)
        if isinstance(side, FluxImageSide) and not hasattr(self.transformer, "install_image_side"):
            param = next(self.transformer.parameters())
            side.use_kernel = choose(mode, param.device, param.dtype, self.transformer.config.attention_head_dim)
            side._memo.clear()
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
        hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        kwargs.pop("low_cpu_mem_usage", None)  # ipa_rt builds small modules directly: nothing to save
        if kwargs:
            raise ConfigError(f"load_ip_adapter: unknown argument(s) {sorted(kwargs)}")
        sources = adapter_sources(pretrained_model_name_or_path_or_dict, subfolder or None, weight_name)
        raws = [read_adapter(s, **hub) for s in sources]
        side = build_image_side(FluxDims.of(self.transformer), raws)
        encoder = getattr(self, "image_encoder", None)
        if encoder is None and image_encoder_pretrained_model_name_or_path is not None:
            encoder = self._load_encoder(
                image_encoder_pretrained_model_name_or_path, image_encoder_subfolder, image_encoder_dtype, raws, hub
            )
        _check_encoder(side, encoder)  # before anything is registered: a refused load leaves the pipeline as it was
        if encoder is not None and getattr(self, "image_encoder", None) is None:
            self.register_modules(image_encoder=encoder.to(self.transformer.device))
        if getattr(self, "feature_extractor", None) is None and encoder is not None:
            from ..image import default_feature_extractor

            self.register_modules(feature_extractor=default_feature_extractor(encoder))
        self._install(side)

    def _load_encoder(self, location: Any, subfolder: str | None, dtype: torch.dtype, raws, hub) -> Any:
        from ..models import load_image_encoder

        folder = os.fspath(location)
        beside = raws[0].encoder_dir
        if not os.path.isdir(os.path.join(folder, subfolder or "")) and beside and os.path.isdir(beside):
            folder, subfolder = beside, None  # ipa_rt's rule for a missing folder: image_encoder/ beside the adapter
        with hushed(bars=True):
            return load_image_encoder(folder, dtype, subfolder=subfolder or None, **hub)

    def _install(self, side: FluxImageSide) -> None:
        """Swap in ipa_rt's processors and image side; remember what was there (once, across reloads)."""
        transformer = self.transformer
        self.reference_cache.clear()
        if hasattr(transformer, "install_image_side"):  # an engine: the branch is in the graph, the side feeds it
            transformer.install_image_side(side)
            return
        if self._ipa_saved is None:
            self._ipa_saved = {
                "processors": dict(transformer.attn_processors),
                "encoder_hid_proj": getattr(transformer, "encoder_hid_proj", _ABSENT),
            }
        processors = dict(self._ipa_saved["processors"])
        for layer, name in enumerate(double_block_processors(transformer)):
            processors[name] = FluxDecoupledProcessor(layer)
        param = next(transformer.parameters())
        transformer.encoder_hid_proj = side.to(device=param.device, dtype=param.dtype)
        head_dim = transformer.config.attention_head_dim
        side.use_kernel = choose(self._ip_attention, param.device, param.dtype, head_dim)
        transformer.set_attn_processor(processors)
        self.reference_cache.clear()

    def unload_ip_adapter(self) -> None:
        """Restore the transformer's processors and projection exactly; drop the image encoder (diffusers' rule)."""
        if hasattr(self.transformer, "install_image_side"):
            self.transformer.install_image_side(None)  # the engine then adds exactly nothing
        if self._ipa_saved is not None:
            self.transformer.set_attn_processor(self._ipa_saved["processors"])
            saved = self._ipa_saved["encoder_hid_proj"]
            if saved is _ABSENT:  # a transformer that never had one (diffusers' own unload leaves None)
                del self.transformer.encoder_hid_proj
            else:
                self.transformer.encoder_hid_proj = saved
            self._ipa_saved = None
        drop_image_encoder(self)
        self.reference_cache.clear()

    @property
    def image_side(self) -> FluxImageSide:
        side = getattr(self.transformer, "encoder_hid_proj", None)
        if not isinstance(side, FluxImageSide):
            raise ConfigError("no ipa_rt IP-Adapter is loaded; call load_ip_adapter first")
        return side

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

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """diffusers' call; on an engine, the sizes it was built for are the defaults (``height``, ``width``,
        ``max_sequence_length``) instead of diffusers' own."""
        for key, value in getattr(self.transformer, "call_defaults", {}).items():
            if kwargs.get(key) is None:
                kwargs[key] = value
        with self.network_graphs():  # CUDA graphs of the transformer on CUDA (set_cuda_graphs)
            return super().__call__(*args, **kwargs)  # type: ignore[misc]

    def _image_to_stage(self, kwargs: dict) -> tuple[StaticImage, Any] | None:
        side = getattr(self.transformer, "encoder_hid_proj", None)
        embeds = (kwargs.get("joint_attention_kwargs") or {}).get("ip_adapter_image_embeds")
        return (side.static, side(embeds)) if isinstance(side, FluxImageSide) and embeds is not None else None

    def runtime_summary(self) -> str:
        """One line: what runs the transformer, and the adapters."""
        t = self.transformer
        engine = getattr(t, "engine", None)
        where = f"{type(engine.engine).__name__} engine" if engine is not None else f"PyTorch ({t.dtype}, {t.device})"
        side = getattr(t, "encoder_hid_proj", None)
        count = side.num_ip_adapters if isinstance(side, FluxImageSide) else 0
        return f"{type(self).__name__}: transformer on {where}, {count} IP-Adapter(s)"


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


# Every diffusers pipeline that has FluxIPAdapterMixin (diffusers 0.42), by name: ipa_rt's class of the same name.
PIPELINES = (
    "FluxPipeline",
    "FluxImg2ImgPipeline",
    "FluxInpaintPipeline",
    "FluxControlNetPipeline",
    "FluxKontextPipeline",
    "FluxKontextInpaintPipeline",
    "ChromaPipeline",
    "ChromaImg2ImgPipeline",
    "ChromaInpaintPipeline",
)


# runtime_class(name): class <name>(FluxAdapterMixin, diffusers.<name>), made once (ipa_rt.flux.<name> is it)
runtime_class = pipeline_class_maker(FluxAdapterMixin, PIPELINES, "ipa_rt.flux")


def pipeline_class_of(base: str | os.PathLike, **hub_kwargs: Any) -> str | None:
    """The Flux-family pipeline class a diffusers folder or hub id declares (``model_index.json``), else None."""
    from ..models import declared_pipeline

    name = declared_pipeline(base, **hub_kwargs)
    return name if name in PIPELINES else None


def load_pretrained(
    base: str | os.PathLike,
    ip_adapter: Any = None,
    image_encoder: Any = None,
    *,
    subfolder: Any = None,
    weight_name: Any = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    **hub_kwargs: Any,
) -> Any:
    """The folder's own pipeline class (ipa_rt's of the same name) on PyTorch with the adapter(s) loaded; the image
    encoder defaults to ``image_encoder/`` beside the first adapter file (XLabs' adapters: pass
    ``"openai/clip-vit-large-patch14"``)."""
    from ..models import load_pipeline

    cls = runtime_class(pipeline_class_of(base, **hub_kwargs) or "FluxPipeline")
    pipe = load_pipeline(cls, base, dtype, device, hub_kwargs)
    if isinstance(image_encoder, torch.nn.Module):
        pipe.register_modules(image_encoder=image_encoder.to(device=device, dtype=dtype).eval())
        image_encoder = None
    if ip_adapter is not None:
        pipe.load_ip_adapter(
            ip_adapter,
            weight_name=weight_name,
            subfolder=subfolder,
            image_encoder_pretrained_model_name_or_path=os.fspath(image_encoder or "image_encoder"),
            image_encoder_dtype=dtype,
            **{k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS},
        )
    return pipe
