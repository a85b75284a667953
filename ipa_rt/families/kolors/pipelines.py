"""diffusers' Kolors pipelines with ipa_rt's IP-Adapter runtime: switch by one import.

``ipa_rt.kolors.KolorsPipeline`` *is* diffusers' ``KolorsPipeline`` with :class:`UNetAdapterMixin` in front: it
installs ipa_rt's :class:`~ipa_rt.adapters.stack.IPAdapterStack` on the UNet and :class:`UNetImageSide` as its image
projection, which computes every layer's image keys/values once per call (docs/guides/kolors.md, "What changes").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.models.embeddings import MultiIPAdapterImageProjection

from ...adapters.checkpoint import adapter_sources, hub_options, read_adapter
from ...adapters.image import default_feature_extractor
from ...adapters.scale import expand_scale, scale_tables
from ...adapters.stack import IPAdapterStack
from ...adapters.variants import FACE_ID
from ...console import hushed
from ...errors import ConfigError, ImageInputError, IncompatibleAdapterError, ScaleError
from ...kernels.ops import MODES, choose
from ...models import drop_image_encoder, load_image_encoder
from ...runtime.graphs import StaticImage
from ...runtime.lru import IdentityMemo
from ..base import ABSENT, FamilyMixin


class UNetImageSide(MultiIPAdapterImageProjection):
    """The UNet's ``encoder_hid_proj`` while ipa_rt's adapters are installed: diffusers' projection of each adapter,
    run the first time a set of image embeddings arrives (diffusers' loop passes the very same tensors at every
    step), which also writes every layer's image keys/values into the stack's context; later steps return the
    same tokens. The processors read the context and ignore the tokens the UNet hands them."""

    def __init__(self, stack: IPAdapterStack) -> None:
        super().__init__(list(stack.projections))
        self.stack = [stack]  # a list, not a submodule: the projections above are the only weights it owns
        self._seen = IdentityMemo(1)  # one: the stack's context holds the keys/values of the latest embeddings only
        self.masks: list[torch.Tensor | None] | None = None  # this call's regional masks (set by the pipeline)
        self.image_scale: torch.Tensor | None = None  # per masked image factors [A, I, L] (set_ip_adapter_scale)
        self.queries: list[int] | None = None  # per layer: the call's query counts (the masks' downsampling targets)
        # a captured UNet reads the keys/values from the stack's static buffers (one set per shape: staging the
        # tokens keys the graph on that shape); the tokens themselves are not read by the processors
        self.static = StaticImage()

    def forward(self, image_embeds: list[torch.Tensor]) -> list[torch.Tensor]:  # type: ignore[override]
        if self.static.is_frozen:
            return self.static.current[0]
        items = list(image_embeds) if isinstance(image_embeds, (list, tuple)) else [image_embeds]
        masks = self.masks
        identity = items + [m for m in masks or () if m is not None]  # masks change the prepared state too
        tokens = self._seen.get(identity)
        if tokens is None:
            stack = self.stack[0]
            with torch.no_grad():
                tokens = stack.project(items, [None] * len(items))
                scale = self.image_scale if masks else None
                stack.prepare(tokens, masks=masks, image_scale=scale, queries=self.queries if masks else None)
            self._seen.put(identity, tokens)
        return tokens


class UNetAdapterMixin(FamilyMixin):
    """ipa_rt's IP-Adapter runtime for a diffusers UNet pipeline with ``IPAdapterMixin``'s API."""

    _ipa_stack: IPAdapterStack | None = None
    _ip_attention = "auto"  # cross-attention with the image branch: the fused kernel on CUDA where it can run
    _graph_network = "unet"
    _call_masks: Any = None  # the running call's ip_adapter_masks
    _image_scale: torch.Tensor | None = None  # per masked image factors from set_ip_adapter_scale (diffusers' lists)

    def set_ip_attention(self, mode: str) -> None:
        """``"auto"`` (the fused Triton kernel on CUDA where it can run, SDPA elsewhere), ``"triton"`` (the kernel
        wherever it can run: the CPU under ``TRITON_INTERPRET=1``) or ``"sdpa"``; decided here, once per layer."""
        if self._ipa_stack is not None and not self.on_engine:
            self._choose_attention(self._ipa_stack, mode)
        elif mode not in MODES:
            raise ConfigError(f"attention {mode!r} is unknown; expected one of {MODES}")
        self._ip_attention = mode

    def _choose_attention(self, stack: IPAdapterStack, mode: str) -> None:
        device, dtype = self.unet.device, self.unet.dtype
        stack.set_attention([choose(mode, device, dtype, d) for d in stack.head_dims])

    def load_ip_adapter(
        self,
        pretrained_model_name_or_path_or_dict: Any,
        subfolder: str | list[str] | None = None,
        weight_name: str | list[str] | None = None,
        image_encoder_folder: str | None = "image_encoder",
        **kwargs: Any,
    ) -> None:
        """Load h94-layout IP-Adapter(s) as diffusers does (files, hub ids with ``weight_name``, state dicts; a list
        loads several, replacing what was loaded), checked against the UNet with errors naming the file. The image
        encoder is found by diffusers' rule (``image_encoder_folder`` inside the adapter's folder or repository)."""
        from ...core import encoder_location, encoder_mismatch

        hub = hub_options(kwargs)
        sources = adapter_sources(pretrained_model_name_or_path_or_dict, subfolder or None, weight_name)
        raws = [read_adapter(s, **hub) for s in sources]
        stack = IPAdapterStack.from_checkpoints(self._unet_structure, raws, sources)
        for entry in stack.entries:
            if entry.spec.encoder_output == FACE_ID or entry.spec.needs_clip_states:
                raise IncompatibleAdapterError(
                    f"IP-Adapter '{entry.origin}' ({entry.spec.description}) takes face embeddings; ipa_rt's Kolors "
                    "pipelines run image-prompt adapters (Kolors-IP-Adapter-Plus)"
                )
        encoder = getattr(self, "image_encoder", None)
        if encoder is None and image_encoder_folder is not None:
            location = encoder_location(sources[0], image_encoder_folder)
            if location is not None:
                with hushed(bars=True):
                    encoder = load_image_encoder(location, self.unet.dtype, **hub)
        mismatch = encoder_mismatch(stack, encoder)
        if mismatch is not None:  # checked before anything changes: a refused load leaves the pipeline as it was
            raise IncompatibleAdapterError(mismatch)
        self._ipa_remove()
        if encoder is not None and getattr(self, "image_encoder", None) is None:
            self.register_modules(image_encoder=encoder.to(self.unet.device))
        if getattr(self, "feature_extractor", None) is None and encoder is not None:
            self.register_modules(feature_extractor=default_feature_extractor(encoder))
        stack.to_runtime(self.unet.device, self.unet.dtype)
        unet = self.unet
        if self.on_engine:  # an engine: the branch is in its graph; the projections feed it
            unet.install_adapters(stack, MultiIPAdapterImageProjection(list(stack.projections)))
            self._ipa_stack = stack
            return
        saved = {
            "encoder_hid_proj": unet.encoder_hid_proj,
            "type": unet.config.encoder_hid_dim_type,
            "text": getattr(unet, "text_encoder_hid_proj", ABSENT),
        }
        stack.install(unet)
        self._choose_attention(stack, self._ip_attention)
        # diffusers' loaded layout, which its pipelines read: Kolors' text projection moves to text_encoder_hid_proj
        # (the UNet applies it to the text states), encoder_hid_proj projects image embeddings (here: once per call)
        if saved["type"] == "text_proj":
            unet.text_encoder_hid_proj = saved["encoder_hid_proj"]
        unet.encoder_hid_proj = UNetImageSide(stack)
        unet.config.encoder_hid_dim_type = "ip_image_proj"
        self._ipa_stack, self._ipa_saved = stack, saved

    @contextlib.contextmanager
    def _call_scope(self, kwargs: dict) -> Iterator[None]:
        """Regional masks (``cross_attention_kwargs={"ip_adapter_masks": ...}``, diffusers' form) are taken out of the
        processors' arguments and applied by ipa_rt's image side; engines refuse them. ChatGLM calls deprecated
        transformers APIs: hushed."""
        self._call_masks = self._take_masks(kwargs)
        try:
            with hushed("transformers"):
                yield
        finally:
            self._call_masks = None
            if isinstance(getattr(self.unet, "encoder_hid_proj", None), UNetImageSide):
                self.unet.encoder_hid_proj.masks = self.unet.encoder_hid_proj.queries = None

    def _take_masks(self, kwargs: dict) -> Any:
        """``ip_adapter_masks`` out of ``cross_attention_kwargs`` (the rest stays), with the checks that need no
        embeddings; every layer's query count for the call's size (the masks' downsampling targets)."""
        from ...runtime.request import query_tokens

        extra = dict(kwargs.get("cross_attention_kwargs") or {})
        masks = extra.pop("ip_adapter_masks", None)
        stack = self._ipa_stack
        if masks is None:
            if stack is not None and self._image_scale is not None:
                raise ScaleError("per-image scales (lists per adapter) need regional masks: pass ip_adapter_masks")
            return None
        if stack is None or self.on_engine:
            why = "no IP-Adapter is loaded" if stack is None else "engines do not take them (use the PyTorch pipeline)"
            raise ConfigError(f"cross_attention_kwargs['ip_adapter_masks']: {why}")
        if kwargs.get("ip_adapter_image") is None and kwargs.get("ip_adapter_image_embeds") is None:
            raise ImageInputError("ip_adapter_masks were given without ip_adapter_image / ip_adapter_image_embeds")
        kwargs["cross_attention_kwargs"] = extra or None
        size = self.default_sample_size * self.vae_scale_factor
        height, width = kwargs.get("height") or size, kwargs.get("width") or size
        side = self.unet.encoder_hid_proj
        side.queries = query_tokens(self._unet_structure, stack.layer_names, height, width, self.vae_scale_factor)
        return masks

    def prepare_ip_adapter_image_embeds(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        """diffusers' embeddings; this call's masks are checked against them (one per image of each adapter) and
        handed to the image side."""
        from ...runtime.request import ip_masks

        embeds = super().prepare_ip_adapter_image_embeds(*args, **kwargs)  # type: ignore[misc]
        side = getattr(self.unet, "encoder_hid_proj", None)
        if self._call_masks is not None and isinstance(side, UNetImageSide):
            side.masks = ip_masks(self, {"ip_adapter_masks": self._call_masks}, (embeds,), self._image_scale)
            side.image_scale = self._image_scale
        return embeds

    def _image_to_stage(self, kwargs: dict) -> tuple[StaticImage, Any] | None:
        side, embeds = self.unet.encoder_hid_proj, (kwargs.get("added_cond_kwargs") or {}).get("image_embeds")
        if not isinstance(side, UNetImageSide) or embeds is None:
            return None
        tokens = side(embeds)  # eager: the stack's static buffers for this shape now hold the call's keys/values
        return side.static, (tokens, side.stack[0].context.store_key)  # the buffer set (masked or not) keys the graph

    @property
    def _unet_structure(self) -> Any:
        """The UNet's module tree (an engine's stand-in keeps one on the meta device)."""
        structure = getattr(self.unet, "structure", None)
        return structure[0] if structure else self.unet

    def _ipa_remove(self) -> None:
        if self._ipa_stack is None:
            return
        unet, saved = self.unet, self._ipa_saved
        self._image_scale = None
        if self.on_engine:
            unet.install_adapters(None, None)  # the engine then gets zero tokens and a zero scale
            self._ipa_stack = None
            return
        self._ipa_stack.restore(unet)
        unet.encoder_hid_proj = saved["encoder_hid_proj"]
        unet.config.encoder_hid_dim_type = saved["type"]
        if saved["text"] is ABSENT:
            if hasattr(unet, "text_encoder_hid_proj"):
                del unet.text_encoder_hid_proj
        else:
            unet.text_encoder_hid_proj = saved["text"]
        self._ipa_stack = self._ipa_saved = None

    def unload_ip_adapter(self) -> None:
        """Restore the UNet exactly (processors, text projection) and drop the image encoder (diffusers' rule)."""
        self._ipa_remove()
        drop_image_encoder(self)

    @property
    def adapters(self) -> IPAdapterStack | None:
        return self._ipa_stack

    def set_ip_adapter_scale(self, scale: Any) -> None:
        """A number, one entry per adapter, InstantStyle per-block dicts or preset names (SDXL's); one in-place write
        into the ``[adapters, layers]`` scale tensor."""
        stack = self._ipa_stack
        if stack is None:
            raise ConfigError("set_ip_adapter_scale: no IP-Adapter is loaded; call load_ip_adapter first")
        rows = expand_scale(scale, self._unet_structure, stack.layer_names, stack.num_adapters, "sdxl")
        table, per_image = scale_tables(rows)
        self._image_scale = per_image  # per masked image: applied with the call's masks (checked there)
        stack.context.set_scale(table)

    @property
    def adapter_count(self) -> int:
        return self._ipa_stack.num_adapters if self._ipa_stack is not None else 0
