"""What the nodes do, without ComfyUI: load (and cache) pipelines, encode reference images, sample.

ComfyUI nodes hold no instance state, so loaded pipelines live here, at module level, keyed by everything that
makes them and bounded (least recently used first out). Nothing here imports ComfyUI: the tests drive it directly
as the Python-API side of the node parity checks.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, ImageInputError

LOG = logging.getLogger("ipa_rt.comfyui")
MAX_PIPELINES = int(os.environ.get("IPA_RT_COMFYUI_PIPELINES", "2"))
_PIPELINES: OrderedDict[tuple, Any] = OrderedDict()
LOADS = {"count": 0}  # pipelines (and engine sets) actually loaded, for the logs and the tests
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LoadSpec:
    """Everything a pipeline is made from (its cache key)."""

    base: str = ""
    ip_adapters: tuple[str, ...] = ()
    image_encoder: str = ""
    backend: str = "torch"
    precision: str = "fp32"
    lora: str = ""
    lora_strength: float = 1.0
    engine_folder: str = ""
    height: int = 0
    width: int = 0
    device: str = "cpu"
    config: str = ""  # a single-file base's configs and tokenizer: a diffusers folder (from_pretrained's config=)


def _existing(value: str, name: str) -> str:
    """A local path must exist; anything else with a slash and no such file is taken as a hub id."""
    looks_local = value.startswith(("/", ".", "~")) or os.path.splitext(value)[1] in (".safetensors", ".bin", ".ckpt")
    path = os.path.expanduser(value)
    if looks_local and not os.path.exists(path):
        raise ConfigError(f"{name}: '{value}' does not exist; expected a local file/folder or a hub id")
    return path if os.path.exists(path) else value


def _adapter_source(line: str, name: str) -> Any:
    """``path`` or ``repo_id:subfolder/weight_name`` (hub), as from_pretrained takes them."""
    if ":" in line and not os.path.exists(os.path.expanduser(line)):
        from ..adapters.checkpoint import AdapterSource

        repo, _, file = line.partition(":")
        sub, _, weight = file.rpartition("/")
        return AdapterSource(repo, subfolder=sub or None, weight_name=weight)
    return _existing(line, name)


def load_pipeline(spec: LoadSpec) -> Any:
    """The cached pipeline for ``spec``, loaded (or built into engines and loaded) on first use."""
    if spec in _PIPELINES:
        _PIPELINES.move_to_end(spec)
        return _PIPELINES[spec]
    from ..pipeline import Pipeline

    if spec.engine_folder:
        folder = _existing(spec.engine_folder, "engine_folder")
        if not os.path.isfile(os.path.join(folder, "manifest.json")):
            raise ConfigError(
                f"engine_folder: '{folder}' holds no manifest.json; expected a folder `ipa_rt build` wrote"
            )
        pipe = Pipeline.from_engine(folder, device=spec.device)
    else:
        if not spec.base:
            raise ConfigError("base: empty; expected a diffusers folder or hub id (or set engine_folder)")
        if spec.precision not in DTYPES and spec.backend != "openvino":
            raise ConfigError(f"precision: {spec.precision!r}; expected one of {sorted(DTYPES)}")
        kwargs: dict[str, Any] = {"device": spec.device}
        options: dict[str, Any] = {}
        if spec.backend == "openvino":
            options["precision"] = spec.precision
        else:
            kwargs["dtype"] = DTYPES[spec.precision]
        if spec.backend != "torch":
            options.update({k: v for k, v in (("height", spec.height), ("width", spec.width)) if v})
            kwargs["engine_options"] = options
        if spec.lora:
            kwargs["lora"] = [(_existing(spec.lora, "lora"), spec.lora_strength)]
        if spec.config:
            kwargs["config"] = _existing(spec.config, "config")
        adapters = [_adapter_source(a, f"ip_adapter[{i}]") for i, a in enumerate(spec.ip_adapters)] or None
        encoder = _existing(spec.image_encoder, "image_encoder") if spec.image_encoder else None
        pipe = Pipeline.from_pretrained(_existing(spec.base, "base"), adapters, encoder, backend=spec.backend, **kwargs)
    pipe.set_progress_bar_config(disable=True)  # ComfyUI shows its own progress
    LOADS["count"] += 1
    LOG.info("ipa_rt: loaded %s (%s)", spec.engine_folder or spec.base, pipe.backend)
    _PIPELINES[spec] = pipe
    while len(_PIPELINES) > MAX_PIPELINES:
        _PIPELINES.popitem(last=False)
    return pipe


def comfy_to_pil(image: Tensor, name: str) -> list:
    """ComfyUI ``IMAGE`` ``[B, H, W, C]`` floats in 0..1 → PIL images (LoadImage's k/255 come back exactly)."""
    from PIL import Image

    if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        shape = list(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ImageInputError(f"{name}: {shape}; expected a ComfyUI IMAGE [batch, height, width, channels]")
    arrays = (image[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a if a.shape[-1] == 3 else np.repeat(a, 3, -1)) for a in arrays]


@dataclass
class Embeds:
    """One adapter's reference: CLIP outputs for the positive rows and the negative rows (``[1, images, ...]``)."""

    index: int
    pos: Tensor
    neg: Tensor
    key: tuple
    images: int


@dataclass
class AdapterSettings:
    """One adapter as a node configured it."""

    embeds: Embeds
    weight: float = 1.0
    weight_type: str = "linear"
    start_at: float = 0.0
    end_at: float = 1.0
    mask: Tensor | None = None  # ComfyUI MASK [B, H, W] (first mask used) or None
    extra: dict = field(default_factory=dict)


def encode(pipe: Any, index: int, images: list, negative: list | None, combine: str) -> Embeds:
    """``images`` (PIL) for adapter ``index`` through the pipeline's CLIP encoder (its reference cache),
    combined as diffusers' ``ip_adapter_combine``; ``negative`` replaces the zero-image unconditional rows."""
    from ..adapters.conditions import COMBINE_MODES
    from ..adapters.conditions import combine as combine_images
    from ..adapters.variants import FACE_ID

    stack = pipe.adapters
    if stack is None:
        raise ConfigError("pipeline: no IP-Adapter is loaded; add ip_adapter files to the loader")
    if not 0 <= index < stack.num_adapters:
        raise ConfigError(f"adapter_index: {index}; the pipeline has {stack.num_adapters} IP-Adapter(s)")
    if combine not in COMBINE_MODES:
        raise ConfigError(f"combine_embeds: {combine!r}; expected one of {list(COMBINE_MODES)}")
    spec = stack.entries[index].spec
    if spec.needs_clip_states or spec.encoder_output == FACE_ID:
        raise ConfigError(
            f"ip_adapter[{index}] is {spec.description}: FaceID adapters need InsightFace embeddings, which these "
            "nodes do not compute; use the Python API (ip_adapter_image_embeds)"
        )
    pos, neg, key = pipe.conditioner.encode(spec.encoder_output, images, negative, index)
    pos = combine_images(pos, combine)
    neg = neg if combine == "concat" else neg[:, :1]
    return Embeds(index, pos, neg, (key, combine), pos.shape[1])


def mask_tensors(masks: list[Tensor | None], images: list[int], height: int, width: int) -> list | None:
    """ComfyUI MASKs (``[B, H, W]``, the first used; None: no mask) → diffusers' ``ip_adapter_masks`` at the
    output size (``IPAdapterMaskProcessor``: binarised, ``[1, images, height, width]`` per adapter); None when no
    adapter has one. The Sampler and the MODEL path both take their masks from here."""
    if all(m is None for m in masks):
        return None
    from diffusers.image_processor import IPAdapterMaskProcessor
    from PIL import Image

    out = []
    for mask, count in zip(masks, images, strict=True):
        if mask is None:
            out.append(None)
            continue
        m = mask if mask.ndim == 2 else mask[0]
        pil = Image.fromarray((m.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy(), mode="L")
        processed = IPAdapterMaskProcessor().preprocess([pil], height=height, width=width)  # [1, 1, H, W]
        out.append(processed.reshape(1, 1, height, width).expand(1, count, height, width).contiguous())
    return out


def ordered(pipe: Any, settings: list[AdapterSettings] | None) -> list[AdapterSettings]:
    """One setting per adapter of the pipeline, in adapter order (each adapter given exactly once)."""
    settings = settings or []
    count = pipe.adapters.num_adapters if pipe.adapters is not None else 0
    found = sorted(s.embeds.index for s in settings)
    if settings and found != list(range(count)):
        raise ConfigError(
            f"adapters: the chain gives adapter indices {found}; the pipeline has {count} IP-Adapter(s): give each "
            "one exactly once (weight 0 leaves one out)"
        )
    return sorted(settings, key=lambda s: s.embeds.index)


def scale_configs(pipe: Any, settings: list[AdapterSettings]) -> list:
    from ..adapters.scale import attention_blocks
    from .weights import scale_config

    blocks = attention_blocks(pipe.unet)
    return [scale_config(s.weight_type, s.weight, blocks, pipe.family.name) for s in settings]


_SCHEDULERS: dict[tuple[int, str], Any] = {}


def scheduler_for(pipe: Any, name: str) -> Any:
    """One scheduler object per (pipeline, name): the loop caches its tensor program by scheduler identity."""
    from ..runtime.schedulers import make_scheduler

    key = (id(pipe), name)
    if key not in _SCHEDULERS:
        _SCHEDULERS[key] = make_scheduler(name, pipe.base.scheduler) if name != "default" else pipe.base.scheduler
    return _SCHEDULERS[key]


@torch.no_grad()
def sample(
    pipe: Any,
    settings: list[AdapterSettings] | None,
    positive: str,
    negative: str,
    seed: int,
    steps: int,
    cfg: float,
    scheduler: str,
    width: int,
    height: int,
) -> tuple[Tensor, Tensor]:
    """``(IMAGE [B, H, W, 3], latents unscaled by the VAE factor)``: one ipa_rt call, diffusers' math."""
    settings = ordered(pipe, settings)
    guidance = cfg > 1.0  # diffusers: classifier-free guidance when guidance_scale > 1
    pipe.scheduler = scheduler_for(pipe, scheduler)
    kwargs: dict[str, Any] = {}
    if settings:
        pipe.set_ip_adapter_scale(scale_configs(pipe, settings))
        pipe.set_ip_adapter_step_range([(s.start_at, s.end_at) for s in settings])
        kwargs["ip_adapter_image_embeds"] = [
            torch.cat([s.embeds.neg, s.embeds.pos]) if guidance else s.embeds.pos for s in settings
        ]
        masks = mask_tensors([s.mask for s in settings], [s.embeds.images for s in settings], height, width)
        if masks is not None:
            kwargs["cross_attention_kwargs"] = {"ip_adapter_masks": masks}
    elif pipe.adapters is not None:
        pipe.set_ip_adapter_step_range((0.0, 1.0))
    generator = torch.Generator(pipe.device).manual_seed(int(seed))
    out = pipe(
        prompt=positive,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=cfg,
        height=height,
        width=width,
        generator=generator,
        output_type="latent",
        **kwargs,
    )
    latents = out.images
    image = pipe.decode(latents, "pt").permute(0, 2, 3, 1).float().cpu()
    return image, latents_to_comfy(pipe, latents)


def latents_to_comfy(pipe: Any, latents: Tensor) -> Tensor:
    """diffusers' latents (scaled by the VAE factor) → ComfyUI's LATENT samples (unscaled)."""
    return (latents.float() / pipe.vae_config.scaling_factor).cpu()
