"""The pipeline itself, whatever runs its networks: diffusers' SD1.5 / SDXL txt2img, img2img and inpainting with
IP-Adapter, shaped like diffusers (:class:`PipelineCore`; :class:`ipa_rt.Pipeline` adds the engine constructors).

A call follows the diffusers pipelines step for step (prompt encoding, image embeddings, latents and the generator's
draws, CFG batch order, decode), so the same files, latents and seed give diffusers' output. What differs is where
work happens: the image side once per call, the reference and text caches (:mod:`ipa_rt.runtime.lru`), the static
loop (:mod:`ipa_rt.runtime.loop`), the scale as a device tensor (docs/design.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.image_processor import VaeImageProcessor
from torch import Tensor
from tqdm.auto import tqdm

from .adapters.checkpoint import AdapterSource, adapter_sources, read_adapter
from .adapters.conditions import ImageConditioner
from .adapters.image import default_feature_extractor
from .adapters.scale import expand_scale, expand_step_ranges, scale_tables
from .adapters.stack import IPAdapterStack
from .adapters.variants import FACE_ID, HIDDEN
from .controls.controlnet import ControlStack, load_controlnets
from .controls.t2i import T2IStack, load_t2i_adapters
from .errors import ConfigError, ImageInputError, IncompatibleAdapterError
from .kernels.select import LayerShape, choose_layers
from .lora import fuse_loras
from .models import FAMILIES, BaseModel, detect_family, load_base_model, load_image_encoder, load_vae, vae_upcast
from .runtime import modes, request
from .runtime.batch import run_batch
from .runtime.graphs import Graphed, GraphPool
from .runtime.loop import DenoiseLoop, static_call
from .runtime.lru import TEXT_CACHE_ENTRIES, LRUCache
from .runtime.request import query_tokens
from .runtime.sampling import EagerPlan, Plan, make_plan
from .runtime.schedulers import make_scheduler
from .single_file import is_single_file, load_single_file

ATTENTION = ("auto", "triton", "sdpa")


@dataclass
class PipelineOutput:
    """``images``: PIL list, numpy ``[B, H, W, 3]``, torch ``[B, 3, H, W]``, or latents for ``"latent"``."""

    images: Any


class PipelineCore:
    """IP-Adapter generation for SD1.5- and SDXL-family diffusers models, from the networks it is given (torch
    modules, or engine stand-ins that answer the same calls). Nothing here imports the engine code."""

    def __init__(
        self,
        base: BaseModel,
        adapters: IPAdapterStack | None,
        image_encoder: torch.nn.Module | None,
        feature_extractor: Any | None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        attention: str = "auto",
        backend: str = "torch",
        controlnets: Sequence[torch.nn.Module] | None = None,
        t2i_adapters: Sequence[torch.nn.Module] | None = None,
        engine_manifest: dict | None = None,
    ) -> None:
        if attention not in ATTENTION:
            raise ConfigError(f"attention {attention!r} is unknown; expected one of {ATTENTION}")
        self.attention, self.backend = attention, backend
        self.engine_manifest = engine_manifest  # what an engine pipeline's engines were built for
        self.kernel_fallbacks: dict[int, str] = {}  # head dim -> why its layers run SDPA instead of the kernel
        self.base = base
        self.family = base.family
        self.unet, self.vae, self.scheduler = base.unet, base.vae, base.scheduler
        self.text_encoders, self.tokenizers = base.text_encoders, base.tokenizers
        self.adapters = adapters
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor
        self.device, self.dtype = torch.device(device), dtype
        if self.vae is None and base.vae_config is None:
            raise ConfigError(f"base model '{base.origin}' has no VAE and no VAE config; expected one of them")
        self.vae_scale_factor = 2 ** (len(self.vae_config.block_out_channels) - 1)
        native = self.unet.config.sample_size * self.vae_scale_factor
        self.default_size = (native, native)
        if engine_manifest is not None:  # the size the engines were built for
            self.default_size = (engine_manifest["shapes"]["height"], engine_manifest["shapes"]["width"])
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.progress_bar_config: dict[str, Any] = {}
        self.mask_processor = modes.mask_processor(self.vae_scale_factor)
        self.control = ControlStack(controlnets, self.vae_scale_factor) if controlnets else None
        self.t2i = T2IStack(t2i_adapters) if t2i_adapters else None
        self.graph_pool = GraphPool()  # one CUDA graph memory pool for the loop, the VAE decoder and the encoder
        self.loop = self._new_loop()
        self._plans: dict = {}
        self._ranges: list[tuple[float, float]] = []
        self.image_scale: Tensor | None = None  # [A, I, L] per masked image factors (set_ip_adapter_scale's lists)
        self.conditioner = ImageConditioner(self)  # holds the reference cache (pipe.reference_cache)
        self.text_cache = LRUCache("text", max_entries=TEXT_CACHE_ENTRIES)
        self.decoder = Graphed(lambda z: self.vae.decode(z, return_dict=False)[0], lambda: [self.vae], "VAE decoder")
        self._share_pool(self.graphed_calls())
        if backend == "torch":  # engines were checked when they were built
            _check_encoder(adapters, image_encoder)
            if self.vae is not None and vae_upcast(self.family, self.vae):  # diffusers' SDXL decodes it in fp32
                self.vae.to(torch.float32)
        if adapters is not None:
            adapters.install(self.unet)
        self.to(self.device)

    # --- construction ------------------------------------------------------------------------------------------
    @classmethod
    @static_call
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        ip_adapter: Any = None,
        image_encoder: str | os.PathLike | torch.nn.Module | None = None,
        *,
        subfolder: str | Sequence[str] | None = None,
        weight_name: str | Sequence[str] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        scheduler: Any = None,
        attention: str = "auto",
        lora: Any = None,
        vae: torch.nn.Module | str | os.PathLike | None = None,
        controlnet: Any = None,
        t2i_adapter: Any = None,
        model_hook: Callable[[BaseModel], None] | None = None,
        config: str | os.PathLike | None = None,
        tokenizer: Any = None,
        **hub_kwargs: Any,
    ) -> PipelineCore:
        """Load a diffusers base model (or a single-file SD1.5/SDXL checkpoint) and IP-Adapter checkpoint(s).

        ``ip_adapter``: a file path, a folder or hub id with ``weight_name`` (and ``subfolder``), a state dict,
        an :class:`AdapterSource`, or a list of these for several adapters. ``image_encoder``: a
        ``CLIPVisionModelWithProjection`` folder; by default ``image_encoder/`` beside the first adapter file,
        as diffusers does. ``scheduler``: a name from ``ipa_rt.runtime.schedulers.SCHEDULERS``, a diffusers class name
        or instance; by default the base model's own. ``lora``: LoRA file(s) (diffusers or kohya format, or
        ``(path, weight)`` pairs) fused into the weights at load. ``vae``: another autoencoder with the same
        latent space (a module, a folder or hub id), or ``"taesd"``: the family's tiny autoencoder (TAESD/TAESDXL),
        the fast decoder for realtime use. ``attention``:
        ``"auto"`` (the fused Triton kernel on CUDA, SDPA elsewhere), ``"triton"`` (also on the CPU under
        ``TRITON_INTERPRET=1``) or ``"sdpa"``. ``controlnet``: diffusers ``ControlNetModel`` folder(s) or hub id(s);
        the call then takes the control image(s) as ``image=`` like diffusers' ControlNet pipelines.
        ``t2i_adapter``: diffusers ``T2IAdapter`` folder(s) or hub id(s); the call takes their condition image(s) as
        ``image=`` like diffusers' adapter pipelines (``adapter_image=`` when ControlNets are loaded too).
        ``base`` may be one ``.safetensors``/``.ckpt`` file in the original LDM layout (:mod:`ipa_rt.single_file`);
        ``config`` (a diffusers folder with that model's configs) and ``tokenizer`` (a CLIP tokenizer folder) apply
        to such a file only.
        """
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ConfigError(
                f"dtype {dtype} is not supported; expected torch.float32, torch.float16 or torch.bfloat16"
            )
        if is_single_file(base):
            parts = load_single_file(base, dtype, config=config, tokenizer=tokenizer, vae=vae, **hub_kwargs)
            model = BaseModel(**(parts | {"family": FAMILIES[parts["family"]]}))
        elif config is not None or tokenizer is not None:
            raise ConfigError(f"config= and tokenizer= apply to a single-file checkpoint; base '{base}' is not a file")
        else:
            model = load_base_model(base, dtype, **hub_kwargs)
        if model_hook is not None:  # before LoRAs fuse and adapters wrap the UNet (AnimateDiff's motion UNet)
            model_hook(model)
        if scheduler is not None:
            model.scheduler = make_scheduler(scheduler, model.scheduler)
        if lora is not None:  # fused into the weights before the adapters wrap the UNet
            fuse_loras(model, lora)
        if vae is not None:
            if not isinstance(vae, torch.nn.Module):
                vae = load_vae(vae, model.family, dtype, **hub_kwargs)
            model.vae = _check_vae(vae, model.vae, dtype, model.unet)
        stack = _read_stack(model.unet, adapter_sources(ip_adapter, subfolder, weight_name), hub_kwargs)
        if image_encoder is None:
            image_encoder = model.image_encoder  # as diffusers: the pipeline's own encoder wins
        encoder = cls._resolve_encoder(image_encoder, stack, dtype, hub_kwargs)
        fe = model.feature_extractor or (default_feature_extractor(encoder) if encoder is not None else None)
        if stack is not None:
            stack.to_runtime("cpu", dtype)
        nets = load_controlnets(controlnet, model.unet, dtype, **hub_kwargs) if controlnet is not None else None
        t2i = None
        if t2i_adapter is not None:
            vsf = 2 ** (len(model.vae.config.block_out_channels) - 1)
            t2i = load_t2i_adapters(t2i_adapter, model.unet, vsf, dtype, **hub_kwargs)
        return cls(
            model,
            stack,
            encoder,
            fe,
            device=device,
            dtype=dtype,
            attention=attention,
            controlnets=nets,
            t2i_adapters=t2i,
        )

    @staticmethod
    def _resolve_encoder(image_encoder: Any, stack: IPAdapterStack | None, dtype, hub_kwargs) -> Any:
        if isinstance(image_encoder, torch.nn.Module):
            return image_encoder.to(dtype=dtype).eval()
        if image_encoder is not None:
            return load_image_encoder(image_encoder, dtype, **hub_kwargs)
        if stack is None:
            return None
        needing = [e for e in stack.entries if e.spec.encoder_output != FACE_ID or e.spec.needs_clip_states]
        for entry in needing:  # diffusers' default: image_encoder/ beside the adapter
            if entry.encoder_dir is not None and os.path.isdir(entry.encoder_dir):
                return load_image_encoder(entry.encoder_dir, dtype)
            if entry.encoder_subfolder is not None:
                repo, sub = entry.encoder_subfolder.split("::", 1)
                return load_image_encoder(repo, dtype, subfolder=sub, **hub_kwargs)
        return None  # images then raise a clear error; embeddings still work

    @classmethod
    @static_call
    def from_diffusers(cls, pipe: Any, attention: str = "auto") -> PipelineCore:
        """Wrap a diffusers SD/SDXL pipeline on which ``load_ip_adapter`` was called. Its modules are shared, the
        UNet too: ipa_rt's processors replace diffusers' IP processors until :meth:`unload_ip_adapter` puts them back.
        """
        unet = getattr(pipe, "unet", None)
        if unet is None:
            raise ConfigError(f"ipa_rt.from_diffusers: {type(pipe).__name__} has no UNet; expected an SD/SDXL pipeline")
        components = dict(pipe.components)
        index = {k: ([None, None] if v is None else ["", type(v).__name__]) for k, v in components.items()}
        family = detect_family(index, dict(unet.config), type(pipe).__name__)
        stack, scales = IPAdapterStack.from_diffusers_unet(unet)
        model = BaseModel(
            family=family,
            unet=unet,
            vae=pipe.vae,
            text_encoders=[components[n] for n in family.text_encoders],
            tokenizers=[components[n] for n in family.tokenizers],
            scheduler=pipe.scheduler,
            feature_extractor=components.get("feature_extractor"),
            force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
            origin=type(pipe).__name__,
        )
        stack.scale.copy_(scales)
        encoder = components.get("image_encoder")
        return cls(model, stack, encoder, model.feature_extractor, unet.device, unet.dtype, attention=attention)

    @static_call
    def to(self, device: torch.device | str) -> PipelineCore:
        self.device = torch.device(device)
        for module in (self.unet, self.vae, *self.text_encoders, self.image_encoder):
            if module is not None:
                module.to(self.device)
        if self.adapters is not None:
            self.adapters.to(self.device)
            self.adapters.set_attention(self._fused_layers())
        for extra in (self.control, self.t2i):
            if extra is not None:
                extra.to(self.device)
        # every captured graph and static buffer belongs to the old weights and device: drop them all
        self.graph_pool = GraphPool()
        for g in self.graphed_calls():
            g.clear()
            g.graphs.pool = self.graph_pool
        if self.adapters is not None:
            self.adapters.drop_buffers()
        self.loop = self._new_loop()
        self.clear_caches()  # cached tensors live on the old device
        return self

    def _new_loop(self) -> DenoiseLoop:
        context = self.adapters.context if self.adapters is not None else None
        graphs = False if self.backend == "onnxruntime" else None  # ORT runs on its own streams: no capture
        return DenoiseLoop(self.unet, context, graphs, self.control, self.t2i, self.graph_pool)

    def _share_pool(self, graphed: Sequence[Graphed]) -> None:
        """Fixed-shape calls capture into the pipeline's graph pool (ORT runs on its own streams: no capture)."""
        for g in graphed:
            g.graphs.pool = self.graph_pool
            g.enabled = False if self.backend == "onnxruntime" else None

    def graphed_calls(self) -> list[Graphed]:
        """The graph-captured fixed-shape calls: VAE decoder and CLIP encoder."""
        runner = self.conditioner.runner
        return [self.decoder, *(runner.graphed if runner is not None else [])]

    def runtime_summary(self) -> str:
        """What runs: backend, precision, decoder and device (printed by the CLI and the demo)."""
        m = self.engine_manifest
        if m is None:
            precision, decoder = str(self.dtype).removeprefix("torch."), type(self.vae).__name__
        else:
            precision = m["precision"] if m["backend"] == "openvino" else m["dtype"]
            decoder = m.get("vae_class", "AutoencoderKL")
        if self.vae is None:
            decoder = "none (a UNet alone)"
        tiny = " (TAESD: fast, approximate)" if decoder == "AutoencoderTiny" else ""
        return f"backend {self.backend}, precision {precision}, decoder {decoder}{tiny}, device {self.device}"

    def memory_stats(self) -> dict[str, Any]:
        """What the runtime holds on the device: the loop's signatures, graphs, static buffer bytes and evictions,
        the graph pool's growth (loop, VAE decoder and encoder share it) and the graphs per fixed-shape call."""
        stats = self.loop.memory_stats()
        stats["graph_pool_reserved_bytes"] = self.graph_pool.reserved_bytes
        stats["graphed_calls"] = {g.name: g.graphs.stats()[0] for g in self.graphed_calls()}
        stats["reference_cache_bytes"] = self.reference_cache.bytes
        stats["text_cache_bytes"] = self.text_cache.bytes
        return stats

    @property
    def reference_cache(self) -> LRUCache:
        """Per reference: encoder outputs, image tokens and (torch backend) every layer's image keys/values, least
        recently used dropped first past ``$IPA_RT_REFERENCE_CACHE_MB`` (default 512)."""
        return self.conditioner.cache

    def cache_stats(self) -> dict[str, Any]:
        """The reference and text caches: entries, bytes, bounds, evictions, hits and misses (in total and per
        kind: ``encoder`` outputs, ``image_side`` tokens and keys/values, ``text`` embeddings)."""
        return {"reference": self.reference_cache.stats(), "text": self.text_cache.stats()}

    def clear_caches(self) -> None:
        """Forget every cached reference and prompt: the next call encodes, projects and computes image keys/values
        and text embeddings again, as diffusers does on every call."""
        self.reference_cache.clear()
        self.text_cache.clear()
        if self.adapters is not None:
            self.adapters.context.forget()

    def _fused_layers(self) -> list[bool]:
        """Per cross-attention layer: fused kernel or SDPA (:mod:`ipa_rt.kernels.select`; see ``kernel_fallbacks``)."""
        fused, self.kernel_fallbacks = choose_layers(self.attention, self.device, self.dtype, self.layer_shapes())
        return fused

    def layer_shapes(self) -> list[LayerShape]:
        """Every cross-attention layer as the fused kernel sees it at the default size."""
        stack = self.adapters
        if not stack.head_dims:  # engines: attention runs inside the engine
            return []
        h, w = self.default_size
        queries = query_tokens(self.unet, stack.layer_names, h, w, self.vae_scale_factor)
        encoder_tokens = self.image_encoder_tokens() if self.image_encoder is not None else 4
        segments = tuple(e.tokens_per_image or encoder_tokens for e in stack.entries)
        return [
            LayerShape(d, heads, n, 77, segments)
            for d, heads, n in zip(stack.head_dims, stack.heads, queries, strict=True)
        ]

    def image_encoder_tokens(self) -> int:
        """Tokens of the CLIP encoder's hidden states (the Full-face adapter's token count)."""
        if self.image_encoder is None:
            raise ConfigError("no image encoder is loaded, so its token count is unknown")
        cfg = self.image_encoder.config
        return (cfg.image_size // cfg.patch_size) ** 2 + 1

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self.progress_bar_config = kwargs

    def unload_ip_adapter(self) -> None:
        """Give the UNet back exactly as it was before this pipeline wrapped it (the caches are dropped too)."""
        if self.adapters is not None:
            self.adapters.restore(self.unet)
            self.adapters = None
            self.loop = self._new_loop()  # the old buffers belong to the adapters' signature
        self.clear_caches()

    @static_call
    def load_ip_adapter(
        self,
        pretrained_model_name_or_path_or_dict: Any,
        subfolder: str | Sequence[str] | None = None,
        weight_name: str | Sequence[str] | None = None,
        image_encoder_folder: str | None = "image_encoder",
        **hub_kwargs: Any,
    ) -> None:
        """Replace the loaded IP-Adapter(s) with others, as diffusers' ``load_ip_adapter`` (same arguments; a list
        for several adapters). The UNet is restored, the new adapters installed with scale 1 and no step ranges,
        and the reference and text caches dropped. The image encoder is kept when it fits the new adapters;
        otherwise (or with none loaded) the one in ``image_encoder_folder`` is loaded: inside ``subfolder`` for a
        bare folder name, relative to the repository or folder for a path (``None``: load none). Torch backend only:
        engines are built for their adapters."""
        if self.backend != "torch":
            raise ConfigError(
                f"load_ip_adapter: this pipeline runs {self.backend} engines, which are built for their IP-Adapters; "
                "build engines for the new adapter (ipa_rt build --ip-adapter ..., or from_pretrained(..., "
                f"backend={self.backend!r}) with it) instead"
            )
        sources = adapter_sources(pretrained_model_name_or_path_or_dict, subfolder, weight_name)
        if not sources:
            raise ConfigError(
                "load_ip_adapter: pretrained_model_name_or_path_or_dict is None; expected an adapter file, folder, "
                "hub id or state dict (unload_ip_adapter() removes the adapters)"
            )
        old = self.adapters
        if old is not None:  # the new adapters are built against the bare UNet (FaceID LoRA wrappers off)
            old.restore(self.unet)
        try:
            stack = _read_stack(self.unet, sources, hub_kwargs)
            encoder = self._encoder_for(stack, sources[0], image_encoder_folder, hub_kwargs)
            _check_encoder(stack, encoder)
        except BaseException:
            if old is not None:  # a failed load leaves the pipeline as it was
                old.install(self.unet)
            raise
        self._use_adapters(stack, encoder)

    def _encoder_for(
        self, stack: IPAdapterStack, source: AdapterSource, folder: str | None, hub_kwargs: dict
    ) -> torch.nn.Module | None:
        """The image encoder for new adapters: the loaded one if it fits, else the one diffusers would load."""
        current = self.image_encoder
        if folder is None or (current is not None and encoder_mismatch(stack, current) is None):
            return current
        # "image_encoder" is diffusers' default: image_encoder/ beside the adapter, as from_pretrained finds it
        location = None if folder == "image_encoder" else encoder_location(source, folder)
        found = self._resolve_encoder(location, stack, self.dtype, hub_kwargs)
        return found if found is not None else current

    def _use_adapters(self, stack: IPAdapterStack, encoder: torch.nn.Module | None) -> None:
        """Install ``stack`` (and ``encoder``) on the UNet: processors, per-layer kernel choice, a new loop for the
        new image context; scales, step ranges and every cache start afresh."""
        if encoder is not self.image_encoder:
            self.image_encoder = encoder.to(self.device)
            if self.feature_extractor is None:
                self.feature_extractor = default_feature_extractor(encoder)
            self.conditioner = ImageConditioner(self, cache=self.reference_cache)
            self._share_pool(self.conditioner.runner.graphed)
        stack.to_runtime(self.device, self.dtype)
        stack.install(self.unet)
        self.adapters = stack
        stack.set_attention(self._fused_layers())
        self._ranges, self.image_scale = [], None
        self.loop = self._new_loop()
        self.clear_caches()

    # --- live controls --------------------------------------------------------------------------------------------
    def set_ip_adapter_scale(self, scale: Any) -> None:
        """A number, a list (one per adapter), InstantStyle per-block dicts or preset names (``"style"``,
        ``"composition"``, ``"style_and_composition"``); one in-place tensor write."""
        if self.adapters is None:
            raise ConfigError("set_ip_adapter_scale: no IP-Adapter is loaded in this pipeline")
        table, per_image = self.scale_tables(scale)
        self.adapters.context.set_scale(table)
        self.image_scale = per_image  # per masked image factors (None: per-adapter scales only)

    def scale_tables(self, scale: Any) -> tuple[Tensor, Tensor | None]:
        """A ``set_ip_adapter_scale`` value as the ``[adapters, layers]`` table and the per masked image factors
        (checked against the loaded adapters; nothing is written)."""
        stack = self.adapters
        return scale_tables(expand_scale(scale, self.unet, stack.layer_names, stack.num_adapters, self.family.name))

    def set_ip_adapter_step_range(self, ranges: Any) -> None:
        """Active steps per adapter as ``(start, end)`` fractions of the schedule (one pair, or one per adapter):
        the adapter acts on step ``i`` of ``S`` when ``start <= i/S < end`` (``end = 1`` includes the last step).
        Applied through a per-step gate tensor: changing it never rebuilds or recaptures anything."""
        if self.adapters is None:
            raise ConfigError("set_ip_adapter_step_range: no IP-Adapter is loaded in this pipeline")
        self._ranges = expand_step_ranges(ranges, self.adapters.num_adapters)

    def step_gate(self, steps: int) -> Tensor:
        """``[adapters, steps]``: 1 where an adapter's step range covers the step, else 0."""
        count = self.adapters.num_adapters if self.adapters is not None else 0
        pos = torch.arange(steps, dtype=torch.float64) / steps
        rows = [((pos >= lo) & ((pos < hi) | (hi >= 1.0))).float() for lo, hi in self._ranges[:count]]
        rows += [torch.ones(steps)] * (count - len(rows))
        return (torch.stack(rows) if rows else torch.zeros(0, steps)).to(self.device)

    def plan(self, steps: int, strength: float, eta: float) -> Plan | EagerPlan:
        """The scheduler's tensor program for (steps, strength, eta), cached: the loop reads only tensors."""
        key = (id(self.scheduler), steps, strength, eta)
        if key not in self._plans:  # keep the latest only: a request signature rarely alternates
            self._plans = {key: make_plan(self.scheduler, steps, strength, eta).to(self.device)}
        return self._plans[key]

    # --- per-call conditions --------------------------------------------------------------------------------------
    @static_call
    def prepare_ip_adapter_image_embeds(
        self,
        ip_adapter_image: Any,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_ip_adapter_image: Any = None,
        ip_adapter_combine: str = "concat",
    ) -> list[Tensor]:
        """diffusers-format ``ip_adapter_image_embeds`` (negative first with guidance), e.g. to save and reuse."""
        out = self.conditioner(
            ip_adapter_image,
            None,
            negative_ip_adapter_image,
            ip_adapter_combine,
            num_images_per_prompt,
            do_classifier_free_guidance,
        )
        if out is None:
            raise ImageInputError("prepare_ip_adapter_image_embeds: ip_adapter_image is None; expected images")
        return out[0]

    # --- the call -------------------------------------------------------------------------------------------------
    @static_call
    def __call__(
        self,
        prompt: str | list[str] = "",
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[Tensor] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        image: Any = None,
        strength: float | None = None,
        mask_image: Any = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        negative_ip_adapter_image: Any = None,
        ip_adapter_combine: str = "concat",
        control_image: Any = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        guess_mode: bool = False,
        adapter_image: Any = None,
        adapter_conditioning_scale: float | list[float] = 1.0,
        adapter_conditioning_factor: float = 1.0,
    ) -> PipelineOutput:
        """Generate. ``image`` alone: img2img; ``image`` + ``mask_image``: inpainting; neither: txt2img.

        With ControlNets loaded, ``image`` is the control image(s) (diffusers' ControlNet pipelines), or the init
        image with ``control_image`` (ControlNet img2img), and ``controlnet_conditioning_scale``,
        ``control_guidance_start`` / ``end`` and ``guess_mode`` apply. With T2I-Adapters loaded, ``image`` is their
        condition image(s) (diffusers' adapter pipelines), or ``adapter_image`` (always, when ControlNets are
        loaded too; ``image`` is then free for img2img), with ``adapter_conditioning_scale`` and
        ``adapter_conditioning_factor``."""
        self.require_full_model("a pipeline call")
        req = request.resolve(self, request.Request(
            prompt=prompt, ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
            negative_prompt=negative_prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            height=height, width=width, latents=latents, generator=generator, output_type=output_type, eta=eta,
            num_images_per_prompt=num_images_per_prompt, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
            image=image, strength=strength, mask_image=mask_image, cross_attention_kwargs=cross_attention_kwargs,
            negative_ip_adapter_image=negative_ip_adapter_image, ip_adapter_combine=ip_adapter_combine,
            control_image=control_image, controlnet_conditioning_scale=controlnet_conditioning_scale,
            control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
            guess_mode=guess_mode, adapter_image=adapter_image, adapter_conditioning_scale=adapter_conditioning_scale,
            adapter_conditioning_factor=adapter_conditioning_factor,
        ))  # fmt: skip
        if self.engine_manifest is not None:
            # the UNet's engine loads before the encoders': the largest network is loaded (the IR or blob read and
            # its weights repacked) while the least else is resident, the lowest peak memory (docs/performance.md)
            self.unet.prepare(req.copies * (2 if req.cfg else 1))
        inputs = request.step_inputs(self, request.request_parts(self, req))
        with tqdm(total=inputs.plan.steps, **{"desc": "denoising", **self.progress_bar_config}) as bar:
            latents = self.loop.run(inputs, progress=bar, generator=req.generator)
        return PipelineOutput(latents if req.output_type == "latent" else self.decode(latents, req.output_type))

    def batch(self, requests: Sequence[dict[str, Any]]) -> list[PipelineOutput]:
        """Several requests in one UNet batch, one :class:`PipelineOutput` per request. Each request is a dict of
        this call's arguments (``prompt``, ``ip_adapter_image``, ``generator``, ``guidance_scale``, ...) plus
        ``ip_adapter_scale`` (anything :meth:`set_ip_adapter_scale` takes, for that request alone); requests share
        size, steps, strength and mode. Request ``i`` gives what ``pipe(**requests[i])`` gives (see
        :mod:`ipa_rt.runtime.batch`)."""
        self.require_full_model("batch")
        return [PipelineOutput(images) for images in run_batch(self, requests)]

    @property
    def vae_config(self) -> Any:
        """The VAE's config; for a UNet-only base (no VAE, no text encoders) the config of the VAE its latents belong
        to (the latent space its UNet was trained in)."""
        return self.vae.config if self.vae is not None else FrozenDict(self.base.vae_config)

    def require_full_model(self, what: str) -> None:
        """A :class:`ConfigError` for ``what`` on a UNet-only base (no text encoder or no VAE: ComfyUI's MODEL as an
        ipa_rt engine, whose prompts and images are ComfyUI's CLIP's and VAE's)."""
        absent = (("text encoder", not self.text_encoders), ("VAE", self.vae is None))
        missing = [name for name, gone in absent if gone]
        if missing:
            raise ConfigError(
                f"{what}: the base model '{self.base.origin}' is a UNet alone (no {' and no '.join(missing)}), which "
                "cannot generate from a prompt; expected a full SD1.5/SDXL checkpoint or diffusers folder (a UNet-only "
                "pipeline runs inside ComfyUI, with ComfyUI's CLIP and VAE, through the ipa_rt MODEL)"
            )

    def decode(self, latents: Tensor, output_type: str) -> Any:
        """Latents (scaled by the VAE factor, as the loop leaves them) to images of ``output_type``."""
        if self.vae is None:
            self.require_full_model("decode")
        vae = self.vae
        latents = latents.to(next(vae.parameters()).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = self.decoder(latents)
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * len(image))


def _read_stack(unet: torch.nn.Module, sources: Sequence[AdapterSource], hub_kwargs: dict) -> IPAdapterStack | None:
    """The adapters of ``sources`` built against ``unet`` (None without sources); nothing is installed yet."""
    raws = [read_adapter(s, **hub_kwargs) for s in sources]
    return IPAdapterStack.from_checkpoints(unet, raws, sources) if raws else None


def encoder_location(source: AdapterSource, folder: str) -> str | os.PathLike | None:
    """diffusers' ``image_encoder_folder``: a bare name lies inside the adapter's ``subfolder``, a path is relative
    to the repository or folder (None for a state dict, which has no folder)."""
    if isinstance(source.source, Mapping):
        return None
    sub = Path(source.subfolder or "", folder).as_posix() if "/" not in folder else folder
    root = Path(os.fspath(source.source))
    if root.is_file():  # a file given directly: its folder
        return root.parent / sub
    return root / sub if root.is_dir() else f"{source.source}/{sub}"  # a hub id: owner/repo/subfolder


def encoder_mismatch(stack: Any, encoder: Any) -> str | None:
    """Why ``encoder``'s output sizes do not fit an adapter of ``stack``; None when they fit or either is absent."""
    if stack is None or encoder is None:
        return None
    cfg = encoder.config
    for entry in stack.entries:
        want = entry.spec.encoder_dim(entry.projection)
        if want is None:
            continue
        hidden = entry.spec.encoder_output == HIDDEN or entry.spec.needs_clip_states
        have, what = (cfg.hidden_size, "hidden_size") if hidden else (cfg.projection_dim, "projection_dim")
        if have != want:
            return (
                f"image encoder ({cfg.name_or_path or 'given module'}) has {what} {have}, but IP-Adapter "
                f"'{entry.origin}' ({entry.spec.description}) expects {want}; expected the encoder the adapter was "
                "trained with (SD1.5 and *_vit-h adapters: ViT-H/14, ip-adapter_sdxl: ViT-bigG/14)"
            )
    return None


def _check_encoder(stack: Any, encoder: Any) -> None:
    """Encoder output sizes must fit every adapter (checked at load, not at the first call)."""
    mismatch = encoder_mismatch(stack, encoder)
    if mismatch is not None:
        raise IncompatibleAdapterError(mismatch)


def _check_vae(vae: Any, base_vae: Any, dtype: torch.dtype, base_unet: Any = None) -> Any:
    """A replacement autoencoder must speak the base model's latent space (channels; TAESD included)."""
    if not hasattr(vae, "decode") or not hasattr(vae, "config"):
        raise ConfigError(f"vae is a {type(vae).__name__}; expected a diffusers autoencoder (AutoencoderKL/Tiny)")
    have = vae.config.latent_channels
    # a single file without a baked-in VAE: the UNet's output is the latent space
    want = base_vae.config.latent_channels if base_vae is not None else base_unet.config.out_channels
    if have != want:
        raise ConfigError(f"vae has {have} latent channels; the base model's latents have {want}")
    # cast only when needed: diffusers warns on every dtype .to() of a model declaring fp32 modules (even none)
    return (vae if next(vae.parameters()).dtype == dtype else vae.to(dtype=dtype)).eval()
