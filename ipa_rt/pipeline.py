"""``ipa_rt.Pipeline``: diffusers' SD1.5 / SDXL txt2img, img2img and inpainting with IP-Adapter, shaped like
diffusers.

A call follows the diffusers pipelines step for step (prompt encoding, image embeddings, latents and the
generator's draws, CFG batch order, decode), so the same files, latents and seed give diffusers' output.
What differs is where work happens: text embeddings, image encoding, projection and every layer's image
keys/values once per call (and not at all for a reference seen before); the scheduler as a tensor program
in a static, graph-captured loop (:mod:`ipa_rt.runtime`); the adapter scale as a device tensor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor
from tqdm.auto import tqdm

from . import modes
from .adapter import IPAdapterStack
from .checkpoint import AdapterSource, read_adapter
from .conditions import ImageConditioner
from .control import ControlStack, load_controlnets
from .errors import ConfigError, ImageInputError, IncompatibleAdapterError, ScaleError
from .graphs import Graphed, GraphPool
from .image import default_feature_extractor
from .kernels.select import LayerShape, choose_layers
from .lora import fuse_loras
from .models import FAMILIES, BaseModel, detect_family, load_base_model, load_image_encoder, vae_upcast
from .modes import DEFAULT_STRENGTH
from .runtime import DenoiseLoop, StepInputs
from .sampling import EagerPlan, Plan, make_plan
from .scale import expand_scale, expand_step_ranges, scale_tables
from .schedulers import make_scheduler
from .t2i import T2IStack, load_t2i_adapters
from .text import PromptEmbeds, encode_prompt_sd15, encode_prompt_sdxl
from .variants import FACE_ID, HIDDEN

BACKENDS = ("torch", "onnxruntime", "tensorrt")
ATTENTION = ("auto", "triton", "sdpa")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# family -> (prompt encoder, default guidance per task) as the diffusers pipelines set them
_FAMILY_RUNTIME: dict[str, tuple[Callable[..., PromptEmbeds], dict[str, float]]] = {
    "sd15": (encode_prompt_sd15, {"txt2img": 7.5, "img2img": 7.5, "inpaint": 7.5, "controlnet_inpaint": 7.5}),
    "sdxl": (encode_prompt_sdxl, {"txt2img": 5.0, "img2img": 5.0, "inpaint": 7.5, "controlnet_inpaint": 5.0}),
}


@dataclass
class PipelineOutput:
    """``images``: PIL list, numpy ``[B, H, W, 3]``, torch ``[B, 3, H, W]``, or latents for ``"latent"``."""

    images: Any


def _adapter_sources(ip_adapter: Any, subfolder: Any, weight_name: Any) -> list[AdapterSource]:
    if ip_adapter is None:
        return []
    items = list(ip_adapter) if isinstance(ip_adapter, (list, tuple)) else [ip_adapter]
    names = weight_name if isinstance(weight_name, (list, tuple)) else [weight_name] * len(items)
    subs = subfolder if isinstance(subfolder, (list, tuple)) else [subfolder] * len(items)
    if len(items) == 1 and len(names) > 1:  # one repo, several files (diffusers' broadcast)
        items = items * len(names)
        subs = subs * len(names) if len(subs) == 1 else subs
    if not len(items) == len(names) == len(subs):
        raise ConfigError(
            f"ip_adapter has {len(items)} entries but weight_name has {len(names)} and subfolder {len(subs)}; "
            "expected one each per adapter (or a single value to share)"
        )
    out = []
    for item, name, sub in zip(items, names, subs, strict=True):
        if isinstance(item, AdapterSource):
            out.append(item)
        elif isinstance(item, (str, os.PathLike, dict)):
            out.append(AdapterSource(item, weight_name=name, subfolder=sub))
        else:
            raise ConfigError(
                f"ip_adapter entry is a {type(item).__name__}; expected a path, hub id, dict or AdapterSource"
            )
    return out


class Pipeline:
    """IP-Adapter text-to-image for SD1.5- and SDXL-family diffusers models."""

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
    ) -> None:
        if attention not in ATTENTION:
            raise ConfigError(f"attention {attention!r} is unknown; expected one of {ATTENTION}")
        self.attention, self.backend = attention, backend
        self.engine_manifest: dict | None = None  # set by from_engine
        self.kernel_fallbacks: dict[int, str] = {}  # head dim -> why its layers run SDPA instead of the kernel
        self.base = base
        self.family = base.family
        self.unet, self.vae, self.scheduler = base.unet, base.vae, base.scheduler
        self.text_encoders, self.tokenizers = base.text_encoders, base.tokenizers
        self.adapters = adapters
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor
        self.device, self.dtype = torch.device(device), dtype
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        native = self.unet.config.sample_size * self.vae_scale_factor
        self.default_size = (native, native)  # an engine pipeline sets the size its engines were built for
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.progress_bar_config: dict[str, Any] = {}
        self.mask_processor = modes.mask_processor(self.vae_scale_factor)
        self.control = ControlStack(controlnets, self.vae_scale_factor) if controlnets else None
        self.t2i = T2IStack(t2i_adapters) if t2i_adapters else None
        self.graph_pool = GraphPool()  # one CUDA graph memory pool for the loop, the VAE decoder and the encoder
        self.loop = self._new_loop()
        self._plans: dict = {}
        self._ranges: list[tuple[float, float]] = []
        self._image_scale: Tensor | None = None
        self.conditioner = ImageConditioner(self)
        self._decoder = Graphed(lambda z: self.vae.decode(z, return_dict=False)[0], lambda: [self.vae], "VAE decoder")
        for g in self._graphed():
            g.pool = self.graph_pool
            g.enabled = False if backend == "onnxruntime" else None  # ORT runs on its own streams: no capture
        if backend == "torch":  # engines were checked when they were built
            self._check_encoder()
            if vae_upcast(self.family, self.vae):  # diffusers' SDXL pipelines decode such a VAE in fp32
                self.vae.to(torch.float32)
        if adapters is not None:
            adapters.install(self.unet)
        self.to(self.device)

    # --- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        ip_adapter: Any = None,
        image_encoder: str | os.PathLike | torch.nn.Module | None = None,
        *,
        subfolder: str | Sequence[str] | None = None,
        weight_name: str | Sequence[str] | None = None,
        backend: str = "torch",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        scheduler: Any = None,
        attention: str = "auto",
        lora: Any = None,
        vae: torch.nn.Module | None = None,
        engine_options: dict[str, Any] | None = None,
        controlnet: Any = None,
        t2i_adapter: Any = None,
        **hub_kwargs: Any,
    ) -> Pipeline:
        """Load a diffusers base model and IP-Adapter checkpoint(s).

        ``ip_adapter``: a file path, a folder or hub id with ``weight_name`` (and ``subfolder``), a state dict,
        an :class:`AdapterSource`, or a list of these for several adapters. ``image_encoder``: a
        ``CLIPVisionModelWithProjection`` folder; by default ``image_encoder/`` beside the first adapter file,
        as diffusers does. ``scheduler``: a name from ``ipa_rt.schedulers.SCHEDULERS``, a diffusers class name
        or instance; by default the base model's own. ``lora``: LoRA file(s) (diffusers or kohya format, or
        ``(path, weight)`` pairs) fused into the weights at load. ``vae``: another autoencoder with the same
        latent space, e.g. diffusers' ``AutoencoderTiny`` (TAESD) for realtime decoding. ``attention``:
        ``"auto"`` (the fused Triton kernel on CUDA, SDPA elsewhere), ``"triton"`` (also on the CPU under
        ``TRITON_INTERPRET=1``) or ``"sdpa"``. ``backend``: ``"torch"``, or ``"onnxruntime"`` / ``"tensorrt"`` to
        build engines into the cache (``$IPA_RT_CACHE``, default ``~/.cache/ipa_rt/engines``) or reuse them;
        ``engine_options``: ``height``, ``width``, ``batch`` of the engines (default: the UNet's sample size, 1)
        and ``rebuild``. ``controlnet``: diffusers ``ControlNetModel`` folder(s) or hub id(s); the call then
        takes the control image(s) as ``image=`` like diffusers' ControlNet pipelines. ``t2i_adapter``: diffusers
        ``T2IAdapter`` folder(s) or hub id(s); the call takes their condition image(s) as ``image=`` like diffusers'
        adapter pipelines (``adapter_image=`` when ControlNets are loaded too).
        """
        if backend not in BACKENDS:
            raise ConfigError(f"backend {backend!r} is unknown; expected one of {BACKENDS}")
        if backend != "torch":
            from .export.build import cached_engines

            sources = _adapter_sources(ip_adapter, subfolder, weight_name)
            options = dict(engine_options or {})
            structure = {"controlnet": controlnet, "t2i_adapter": t2i_adapter}
            req = _engine_request(base, sources, image_encoder, backend, dtype, lora, structure, options)
            folder = cached_engines(req, rebuild=bool(options.get("rebuild", False)))
            return cls.from_engine(folder, device=device, scheduler=scheduler)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ConfigError(
                f"dtype {dtype} is not supported; expected torch.float32, torch.float16 or torch.bfloat16"
            )
        model = load_base_model(base, dtype, **hub_kwargs)
        if scheduler is not None:
            model.scheduler = make_scheduler(scheduler, model.scheduler)
        if lora is not None:  # fused into the weights before the adapters wrap the UNet
            fuse_loras(model, lora)
        if vae is not None:
            model.vae = _check_vae(vae, model.vae, dtype)
        sources = _adapter_sources(ip_adapter, subfolder, weight_name)
        raws = [read_adapter(s, **hub_kwargs) for s in sources]
        stack = IPAdapterStack.from_checkpoints(model.unet, raws, sources) if raws else None
        if image_encoder is None and model.image_encoder is not None:
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

    @classmethod
    def from_engine(
        cls, folder: str | os.PathLike, device: torch.device | str = "cpu", scheduler: Any = None
    ) -> Pipeline:
        """A pipeline whose networks run from the engines ``ipa_rt build`` wrote into ``folder``: the same call
        API and live controls (``set_ip_adapter_scale`` writes an engine input: nothing is rebuilt)."""
        from .export.loader import load_engine_pipeline

        return load_engine_pipeline(folder, device, scheduler)

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
    def from_diffusers(cls, pipe: Any, attention: str = "auto") -> Pipeline:
        """Wrap a diffusers SD/SDXL pipeline on which ``load_ip_adapter`` was called (modules are shared).

        The UNet is shared too: ipa_rt's processors replace diffusers' IP processors until
        :meth:`unload_ip_adapter` puts them back.
        """
        unet = getattr(pipe, "unet", None)
        if unet is None:
            raise ConfigError(f"ipa_rt.from_diffusers: {type(pipe).__name__} has no UNet; expected an SD/SDXL pipeline")
        components = {k: v for k, v in pipe.components.items()}
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

    def _check_encoder(self) -> None:
        """Encoder output sizes must fit every adapter (checked at load, not at the first call)."""
        if self.adapters is None or self.image_encoder is None:
            return
        cfg = self.image_encoder.config
        for entry in self.adapters.entries:
            want = entry.spec.encoder_dim(entry.projection)
            if want is None:
                continue
            hidden = entry.spec.encoder_output == HIDDEN or entry.spec.needs_clip_states
            have, what = (cfg.hidden_size, "hidden_size") if hidden else (cfg.projection_dim, "projection_dim")
            if have != want:
                raise IncompatibleAdapterError(
                    f"image encoder ({cfg.name_or_path or 'given module'}) has {what} {have}, but IP-Adapter "
                    f"'{entry.origin}' ({entry.spec.description}) expects {want}; expected the encoder the adapter was "
                    "trained with (SD1.5 and *_vit-h adapters: ViT-H/14, ip-adapter_sdxl: ViT-bigG/14)"
                )

    def to(self, device: torch.device | str) -> Pipeline:
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
        for g in self._graphed():
            g.clear()
            g.pool = self.graph_pool
        if self.adapters is not None:
            self.adapters.drop_buffers()
        self.loop = self._new_loop()
        return self

    def _new_loop(self) -> DenoiseLoop:
        context = self.adapters.context if self.adapters is not None else None
        graphs = False if self.backend == "onnxruntime" else None  # ORT runs on its own streams: no capture
        return DenoiseLoop(self.unet, context, graphs, self.control, self.t2i, self.graph_pool)

    def _graphed(self) -> list[Graphed]:
        """The graph-captured fixed-shape calls: VAE decoder and CLIP encoder."""
        runner = self.conditioner.runner
        return [self._decoder, *(runner.graphed if runner is not None else [])]

    def memory_stats(self) -> dict[str, Any]:
        """What the runtime holds on the device: the loop's signatures, graphs, static buffer bytes and evictions,
        the graph pool's growth (loop, VAE decoder and encoder share it) and the graphs per fixed-shape call."""
        stats = self.loop.memory_stats()
        stats["graph_pool_reserved_bytes"] = self.graph_pool.reserved_bytes
        stats["graphed_calls"] = {g.name: len(g.graphs) for g in self._graphed()}
        return stats

    def _fused_layers(self) -> list[bool]:
        """Per cross-attention layer: fused Triton kernel or SDPA, decided here once (never per call); layers whose
        kernel fails its build-time self-test fall back to SDPA (reasons in ``kernel_fallbacks``)."""
        fused, self.kernel_fallbacks = choose_layers(self.attention, self.device, self.dtype, self.layer_shapes())
        return fused

    def layer_shapes(self) -> list[LayerShape]:
        """Every cross-attention layer as the fused kernel sees it at the default size."""
        stack = self.adapters
        if not stack.head_dims:  # engines: attention runs inside the engine
            return []
        h, w = self.default_size
        queries = _query_tokens(self.unet, stack.layer_names, h, w, self.vae_scale_factor)
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
        """Give the UNet back exactly as it was before this pipeline wrapped it."""
        if self.adapters is not None:
            self.adapters.restore(self.unet)
            self.adapters = None
            self.loop = self._new_loop()  # the old buffers belong to the adapters' signature

    # --- live controls --------------------------------------------------------------------------------------------
    def set_ip_adapter_scale(self, scale: Any) -> None:
        """A number, a list (one per adapter), InstantStyle per-block dicts or preset names (``"style"``,
        ``"composition"``, ``"style_and_composition"``); one in-place tensor write."""
        if self.adapters is None:
            raise ConfigError("set_ip_adapter_scale: no IP-Adapter is loaded in this pipeline")
        rows = expand_scale(scale, self.unet, self.adapters.layer_names, self.adapters.num_adapters, self.family.name)
        table, per_image = scale_tables(rows)
        self.adapters.scale.copy_(table, non_blocking=True)
        self.adapters.scale_eff.copy_(table, non_blocking=True)
        self._image_scale = per_image  # per masked image factors (None: per-adapter scales only)

    def set_ip_adapter_step_range(self, ranges: Any) -> None:
        """Active steps per adapter as ``(start, end)`` fractions of the schedule (one pair, or one per adapter):
        the adapter acts on step ``i`` of ``S`` when ``start <= i/S < end`` (``end = 1`` includes the last step).
        Applied through a per-step gate tensor: changing it never rebuilds or recaptures anything."""
        if self.adapters is None:
            raise ConfigError("set_ip_adapter_step_range: no IP-Adapter is loaded in this pipeline")
        self._ranges = expand_step_ranges(ranges, self.adapters.num_adapters)

    # --- per-call conditions --------------------------------------------------------------------------------------
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
    @torch.no_grad()
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
        if self.t2i is not None and adapter_image is None:
            if self.control is not None:
                raise ImageInputError(
                    "T2I-Adapters and ControlNets are loaded: pass the T2I-Adapter image(s) as adapter_image="
                )
            adapter_image, image = image, None  # diffusers' adapter pipelines: image= is the condition image
        elif self.t2i is None and adapter_image is not None:
            raise ConfigError("adapter_image was given but no T2I-Adapter is loaded (from_pretrained(t2i_adapter=...))")
        if self.control is not None:
            if mask_image is not None and control_image is None:
                raise ImageInputError(
                    "ControlNet inpainting takes the init image as image=, the mask as mask_image= and the control "
                    "image(s) as control_image="
                )
            if control_image is None:  # diffusers' ControlNet txt2img: image= is the control image
                control_image, image = image, None
            elif strength is None and mask_image is None:
                strength = 0.8  # diffusers' ControlNet img2img default (both families)
        elif control_image is not None:
            raise ConfigError("control_image was given but no ControlNet is loaded (from_pretrained(controlnet=...))")
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type {output_type!r} is unknown; expected one of {OUTPUT_TYPES}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps is {num_inference_steps!r}; expected a positive integer")
        if mask_image is not None and image is None:
            raise ImageInputError("mask_image was given without image; inpainting needs both")
        mode = "inpaint" if mask_image is not None else ("img2img" if image is not None else "txt2img")
        encode_prompt, default_guidance = _FAMILY_RUNTIME[self.family.name]
        task = f"controlnet_{mode}" if self.control is not None and mode == "inpaint" else mode
        guidance_scale = default_guidance[task] if guidance_scale is None else float(guidance_scale)
        if mode == "txt2img":
            strength = 1.0
        elif strength is None:
            strength = DEFAULT_STRENGTH[self.family.name][mode == "inpaint"]
        if not 0.0 < float(strength) <= 1.0:
            raise ConfigError(f"strength is {strength}; expected a number in (0, 1]")
        batch = len(prompt) if isinstance(prompt, list) else 1
        copies = batch * num_images_per_prompt
        cfg = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        if self.control is not None:  # the control images settle the size, as in diffusers
            self.control.guess_mode = bool(guess_mode) or self.control.global_pool
            self.control.set_scale(controlnet_conditioning_scale)
            height, width = self.control.prepare_images(
                control_image, height, width, copies, num_images_per_prompt, cfg, self.device
            )
        if self.t2i is not None:  # the condition image settles the size when none is given, as in diffusers
            self.t2i.set_scale(adapter_conditioning_scale)
            height, width = self.t2i.default_size(adapter_image, height, width)
        height = height or self.default_size[0]
        width = width or self.default_size[1]
        if height % 8 or width % 8:
            raise ConfigError(f"height and width must be divisible by 8; got {height}x{width}")
        if self.t2i is not None:
            self.t2i.prepare(adapter_image, height, width, copies, num_images_per_prompt, cfg, self.device)
        text = encode_prompt(
            self.text_encoders,
            self.tokenizers,
            prompt,
            negative_prompt,
            num_images_per_prompt,
            cfg,
            self.device,
            self.dtype,
            prompt_2=prompt_2,
            negative_prompt_2=negative_prompt_2,
            force_zeros_for_empty_prompt=self.base.force_zeros_for_empty_prompt,
        )
        conditions = self.conditioner(
            ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image, ip_adapter_combine, copies, cfg
        )
        masks = self._ip_masks(cross_attention_kwargs, conditions) if self.adapters is not None else None

        plan = self._plan(num_inference_steps, float(strength), eta)
        dtype = text.embeds.dtype
        if mode == "txt2img":
            shape = (
                copies,
                self.unet.config.in_channels,
                height // self.vae_scale_factor,
                width // self.vae_scale_factor,
            )
            setup = modes.ModeSetup(modes.txt2img(shape, plan, generator, self.device, dtype, latents), height, width)
        elif mode == "img2img":
            structure = self.control is not None or self.t2i is not None
            size = (height, width) if structure else None  # structure inputs fix the size: the init image follows
            setup = modes.img2img(self, image, plan, copies, generator, self.device, dtype, latents, size)
        else:
            setup = modes.inpaint(
                self,
                image,
                mask_image,
                plan,
                copies,
                generator,
                self.device,
                dtype,
                latents,
                height,
                width,
                float(strength),
                cfg,
            )
        if self.adapters is not None:  # image side once per request, at the resolution the mode settled on
            if masks is not None:  # masks are downsampled to every layer's query count
                names, vsf = self.adapters.layer_names, self.vae_scale_factor
                self.adapters.query_tokens = _query_tokens(self.unet, names, setup.height, setup.width, vsf)
            if conditions is None:
                self.adapters.prepare(None)
            elif masks is not None or conditions[2] != self.adapters.prepared_key:  # same reference: skip it all
                tokens = self.adapters.project(conditions[0], conditions[1])
                key = conditions[2] if masks is None else None
                self.adapters.prepare(tokens, masks=masks, image_scale=self._image_scale if masks else None, key=key)
        noise = None
        if plan.needs_noise:  # what the scheduler's steps would draw, drawn now in the same order
            noise = torch.zeros((plan.steps, *setup.latents.shape), device=self.device, dtype=dtype)
            for j in plan.noise_steps:
                noise[j] = randn_tensor(setup.latents.shape, generator=generator, device=self.device, dtype=dtype)
        inputs = StepInputs(
            plan=plan,
            latents=setup.latents,
            text=text.embeds,
            added=self._added_conditions(text, setup.height, setup.width, copies, cfg),
            timestep_cond=self._guidance_embedding(guidance_scale, copies, dtype),
            guidance=guidance_scale,
            cfg=cfg,
            noise=noise,
            gate=self._gate(plan.steps),
            inpaint_mask=setup.mask,
            inpaint_latents=setup.inpaint_latents,
            blend=self._blend(plan) if setup.noise is not None and plan.kind != "eager" else None,
            blend_noise=setup.noise,
            control_keep=(
                self.control.keep_gate(control_guidance_start, control_guidance_end, plan.steps, self.device)
                if self.control is not None
                else None
            ),
            t2i_keep=(
                self.t2i.keep_gate(adapter_conditioning_factor, plan.steps, self.device)
                if self.t2i is not None
                else None
            ),
        )
        with tqdm(total=plan.steps, **{"desc": "denoising", **self.progress_bar_config}) as bar:
            latents = self.loop.run(inputs, progress=bar, generator=generator)
        if output_type == "latent":
            return PipelineOutput(latents)
        return PipelineOutput(self._decode(latents, output_type))

    def _ip_masks(self, kwargs: dict[str, Any] | None, conditions) -> list[Tensor | None] | None:
        """``cross_attention_kwargs={"ip_adapter_masks": ...}`` validated as diffusers' processor does."""
        kwargs = dict(kwargs or {})
        masks = kwargs.pop("ip_adapter_masks", None)
        if kwargs:
            raise ConfigError(f"cross_attention_kwargs has {sorted(kwargs)}; only 'ip_adapter_masks' is supported")
        if masks is None:
            if self._image_scale is not None:
                raise ScaleError("per-image scales (lists per adapter) need regional masks: pass ip_adapter_masks")
            return None
        if conditions is None:
            raise ImageInputError("ip_adapter_masks were given without ip_adapter_image / ip_adapter_image_embeds")
        if not self.adapters.supports_masks:
            raise ConfigError(f"regional ip_adapter_masks are not part of {self.backend} engines; use backend='torch'")
        if isinstance(masks, Tensor):  # legacy [adapters, 1, H, W]
            masks = list(masks.unsqueeze(1))
        count = self.adapters.num_adapters
        if len(masks) != count:
            raise ImageInputError(f"ip_adapter_masks has {len(masks)} entries; expected {count} (one per adapter)")
        embeds = conditions[0]
        for a, m in enumerate(masks):
            if m is None:
                continue
            if not isinstance(m, Tensor) or m.ndim != 4:
                raise ImageInputError(
                    f"ip_adapter_masks[{a}] is {type(m).__name__}; expected a [1, images, H, W] tensor "
                    "(IPAdapterMaskProcessor.preprocess output)"
                )
            if m.shape[1] != embeds[a].shape[1]:
                raise ImageInputError(
                    f"ip_adapter_masks[{a}] has {m.shape[1]} masks; expected {embeds[a].shape[1]} (one per image)"
                )
            if self._image_scale is not None and self._image_scale.shape[1] not in (1, m.shape[1]):
                raise ScaleError(
                    f"per-image scales have {self._image_scale.shape[1]} entries; expected {m.shape[1]} (one per mask)"
                )
        return list(masks)

    def _plan(self, steps: int, strength: float, eta: float) -> Plan | EagerPlan:
        """The scheduler's tensor program for (steps, strength, eta), cached: the loop reads only tensors."""
        key = (id(self.scheduler), steps, strength, eta)
        plan = self._plans.get(key)
        if plan is None:
            plan = make_plan(self.scheduler, steps, strength, eta).to(self.device)
            self._plans = {key: plan}  # keep the latest: a request signature rarely alternates
        return plan

    def _blend(self, plan: Plan) -> Tensor:
        """4-channel inpainting blend coefficients, once per (cached) plan rather than once per call."""
        if plan.blend is None:
            plan.blend = modes.blend_coefficients(plan).to(self.device)
        return plan.blend

    def _gate(self, steps: int) -> Tensor:
        """``[adapters, steps]``: 1 where an adapter's step range covers the step, else 0."""
        count = self.adapters.num_adapters if self.adapters is not None else 0
        pos = torch.arange(steps, dtype=torch.float64) / steps
        rows = [((pos >= lo) & ((pos < hi) | (hi >= 1.0))).float() for lo, hi in self._ranges[:count]]
        rows += [torch.ones(steps)] * (count - len(rows))
        return (torch.stack(rows) if rows else torch.zeros(0, steps)).to(self.device)

    def _added_conditions(self, text: PromptEmbeds, height: int, width: int, copies: int, cfg: bool) -> dict:
        if not self.family.pooled_text:
            return {}
        time_ids = [height, width, 0, 0, height, width]  # original size, crop top-left, target size
        embedding = getattr(self.unet, "add_embedding", None)  # an engine's UNet was checked when it was built
        expected = embedding.linear_1.in_features if embedding is not None else None
        passed = self.unet.config.addition_time_embed_dim * len(time_ids) + self.text_encoders[-1].config.projection_dim
        if expected is not None and expected != passed:
            raise ConfigError(f"SDXL UNet expects an added embedding of {expected}, the text encoders give {passed}")
        ids = torch.tensor([time_ids], dtype=text.embeds.dtype)
        ids = (torch.cat([ids, ids]) if cfg else ids).to(self.device).repeat(copies, 1)
        return {"text_embeds": text.pooled, "time_ids": ids}

    def _guidance_embedding(self, guidance_scale: float, copies: int, dtype: torch.dtype) -> Tensor | None:
        """LCM-distilled UNets (``time_cond_proj_dim``) take guidance as an embedding, as diffusers builds it."""
        dim = self.unet.config.time_cond_proj_dim
        if dim is None:
            return None
        w = torch.tensor(guidance_scale - 1).repeat(copies) * 1000.0
        half = dim // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
        emb = w.to(torch.float32)[:, None] * freqs[None, :]
        emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
        if dim % 2 == 1:
            emb = torch.nn.functional.pad(emb, (0, 1))
        return emb.to(device=self.device, dtype=dtype)

    def _decode(self, latents: Tensor, output_type: str) -> Any:
        vae = self.vae
        latents = latents.to(next(vae.parameters()).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = self._decoder(latents)
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * len(image))


def from_diffusers(pipe: Any, attention: str = "auto") -> Pipeline:
    """``ipa_rt.from_diffusers(pipe)``: see :meth:`Pipeline.from_diffusers`."""
    return Pipeline.from_diffusers(pipe, attention=attention)


__all__ = ["FAMILIES", "Pipeline", "PipelineOutput", "from_diffusers"]


def _query_tokens(unet, layer_names: list[str], height: int, width: int, vae_scale_factor: int) -> list[int]:
    """Query tokens of each cross-attention layer at this resolution (stride-2 convs round up)."""
    h, w = height // vae_scale_factor, width // vae_scale_factor
    out = []
    for name in layer_names:
        part, _, rest = name.partition(".")
        if part == "mid_block":
            level = len(unet.down_blocks) - 1
        elif part == "up_blocks":
            level = len(unet.up_blocks) - 1 - int(rest.split(".")[0])
        else:
            level = int(rest.split(".")[0])
        hh, ww = h, w
        for _ in range(level):
            hh, ww = -(-hh // 2), -(-ww // 2)
        out.append(hh * ww)
    return out


def _engine_request(base, sources, image_encoder, backend, dtype, lora, structure, options):
    """The :class:`~ipa_rt.export.BuildRequest` behind ``from_pretrained(..., backend=...)``."""
    from .export.build import DTYPE_NAMES, BuildRequest

    unknown = set(options) - {"height", "width", "batch", "rebuild"}
    if unknown:
        raise ConfigError(f"engine_options has {sorted(unknown)}; expected height, width, batch, rebuild")
    if any(isinstance(s.source, dict) for s in sources) or not sources:
        raise ConfigError(f"backend {backend!r} builds engines from IP-Adapter files; got no file paths")
    if isinstance(image_encoder, torch.nn.Module):
        raise ConfigError(f"backend {backend!r} needs image_encoder as a folder, not a loaded module")
    size = _sample_pixels(base)
    loras = lora if isinstance(lora, (list, tuple)) else ([lora] if lora is not None else [])
    paths = {}  # controlnet / t2i_adapter: folders (or hub ids) as a list
    for key, value in structure.items():
        items = value if isinstance(value, (list, tuple)) else ([value] if value is not None else [])
        if any(isinstance(x, torch.nn.Module) for x in items):
            raise ConfigError(f"backend {backend!r} needs {key} as folders, not loaded modules")
        paths[key] = [os.fspath(x) for x in items]
    return BuildRequest(
        base=os.fspath(base),
        ip_adapter=[os.fspath(s.source) for s in sources],
        image_encoder=os.fspath(image_encoder) if image_encoder is not None else None,
        backend=backend,
        height=int(options.get("height", size)),
        width=int(options.get("width", size)),
        batch=int(options.get("batch", 1)),
        dtype=DTYPE_NAMES.get(dtype, str(dtype)),
        lora=[os.fspath(x) for x in loras],
        **paths,
        weight_name=[s.weight_name for s in sources],
        subfolder=[s.subfolder for s in sources],
    )


def _sample_pixels(base: str | os.PathLike) -> int:
    """The base model's native resolution (UNet sample size x VAE scale factor), from its configs."""
    import json
    from pathlib import Path

    folder = Path(base)
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"cannot read the sample size of '{base}' ({exc}); pass engine_options={{'height': H, 'width': W}}"
        ) from exc
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _check_vae(vae: Any, base_vae: Any, dtype: torch.dtype) -> Any:
    """A replacement autoencoder must speak the base model's latent space (channels; TAESD included)."""
    if not hasattr(vae, "decode") or not hasattr(vae, "config"):
        raise ConfigError(f"vae is a {type(vae).__name__}; expected a diffusers autoencoder (AutoencoderKL/Tiny)")
    have, want = vae.config.latent_channels, base_vae.config.latent_channels
    if have != want:
        raise ConfigError(f"vae has {have} latent channels; the base model's latents have {want}")
    return vae.to(dtype=dtype).eval()
