"""One call of a pipeline, from its arguments to the denoising loop's inputs, following diffusers step for step.

A call's arguments become one :class:`Request`; :func:`resolve` settles what they mean (which image argument is
the init, control or condition image, the mode, diffusers' defaults for guidance and strength, the CFG batch);
:func:`request_parts` then does what diffusers does before its loop (structure inputs, prompt encoding, image
conditions, initial latents, the generator's draws) and :func:`step_inputs`, the one builder of the loop's inputs
for stills, clips (:mod:`ipa_rt.video.pipeline`) and batches (:mod:`ipa_rt.runtime.batch`), hands the loop one
:class:`~ipa_rt.runtime.loop.StepInputs`. Works on any pipeline object with the attributes of
:class:`~ipa_rt.core.PipelineCore` (torch modules or engine stand-ins alike).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from ..errors import ConfigError, ImageInputError, ScaleError
from . import modes
from .graphs import hashable
from .loop import StepInputs
from .modes import DEFAULT_STRENGTH
from .sampling import EagerPlan, Plan
from .text import PromptEmbeds, encode_prompt_sd15, encode_prompt_sdxl

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# family -> (prompt encoder, default guidance per task) as the diffusers pipelines set them
FAMILY_RUNTIME: dict[str, tuple[Callable[..., PromptEmbeds], dict[str, float]]] = {
    "sd15": (encode_prompt_sd15, {"txt2img": 7.5, "img2img": 7.5, "inpaint": 7.5, "controlnet_inpaint": 7.5}),
    "sdxl": (encode_prompt_sdxl, {"txt2img": 5.0, "img2img": 5.0, "inpaint": 7.5, "controlnet_inpaint": 5.0}),
}


@dataclass
class Request:
    """One call: ``Pipeline.__call__``'s arguments by name, then what :func:`resolve` and :func:`prepare_structure`
    settle from them (``height`` / ``width`` become the size the call runs at, ``strength`` a number)."""

    prompt: str | list[str] = ""
    ip_adapter_image: Any = None
    ip_adapter_image_embeds: list[Tensor] | None = None
    negative_prompt: str | list[str] | None = None
    num_inference_steps: int = 50
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    latents: Tensor | None = None
    generator: torch.Generator | list[torch.Generator] | None = None
    output_type: str = "pil"
    num_images_per_prompt: int = 1
    eta: float = 0.0
    prompt_2: str | list[str] | None = None
    negative_prompt_2: str | list[str] | None = None
    image: Any = None
    strength: float | None = None
    mask_image: Any = None
    cross_attention_kwargs: dict[str, Any] | None = None
    negative_ip_adapter_image: Any = None
    ip_adapter_combine: str = "concat"
    control_image: Any = None
    controlnet_conditioning_scale: float | list[float] = 1.0
    control_guidance_start: float | list[float] = 0.0
    control_guidance_end: float | list[float] = 1.0
    guess_mode: bool = False
    adapter_image: Any = None
    adapter_conditioning_scale: float | list[float] = 1.0
    adapter_conditioning_factor: float = 1.0
    # settled by resolve
    mode: str = "txt2img"  # txt2img, img2img or inpaint
    guidance: float | Tensor = 7.5  # a batch of requests: one per latent row
    copies: int = 1  # prompts x images per prompt
    cfg: bool = True
    frames: int = 1  # video: frames per clip (every frame of a row reads that row's prompt and image tokens)


def resolve(pipe, req: Request) -> Request:
    """Route the image arguments by what is loaded (diffusers' ControlNet and adapter pipelines each read
    ``image=`` their own way), validate, and apply diffusers' defaults (in place; returns ``req``)."""
    if pipe.t2i is not None and req.adapter_image is None:
        if pipe.control is not None:
            raise ImageInputError(
                "T2I-Adapters and ControlNets are loaded: pass the T2I-Adapter image(s) as adapter_image="
            )
        req.adapter_image, req.image = req.image, None  # diffusers' adapter pipelines: image= is the condition
    elif pipe.t2i is None and req.adapter_image is not None:
        raise ConfigError("adapter_image was given but no T2I-Adapter is loaded (from_pretrained(t2i_adapter=...))")
    if pipe.control is not None:
        if req.mask_image is not None and req.control_image is None:
            raise ImageInputError(
                "ControlNet inpainting takes the init image as image=, the mask as mask_image= and the control "
                "image(s) as control_image="
            )
        if req.control_image is None:  # diffusers' ControlNet txt2img: image= is the control image
            req.control_image, req.image = req.image, None
        elif req.strength is None and req.mask_image is None:
            req.strength = 0.8  # diffusers' ControlNet img2img default (both families)
    elif req.control_image is not None:
        raise ConfigError("control_image was given but no ControlNet is loaded (from_pretrained(controlnet=...))")
    check_call(req.output_type, OUTPUT_TYPES, req.num_inference_steps)
    if req.mask_image is not None and req.image is None:
        raise ImageInputError("mask_image was given without image; inpainting needs both")
    mode = "inpaint" if req.mask_image is not None else ("img2img" if req.image is not None else "txt2img")
    default_guidance = FAMILY_RUNTIME[pipe.family.name][1]
    task = f"controlnet_{mode}" if pipe.control is not None and mode == "inpaint" else mode
    guidance = default_guidance[task] if req.guidance_scale is None else float(req.guidance_scale)
    strength = req.strength
    if mode == "txt2img":
        strength = 1.0
    elif strength is None:
        strength = DEFAULT_STRENGTH[pipe.family.name][mode == "inpaint"]
    return settle(pipe, req, mode, guidance, strength)


def check_call(output_type: str, output_types: tuple[str, ...], steps: Any) -> None:
    """What every call checks first: a known output type, a positive step count."""
    if output_type not in output_types:
        raise ConfigError(f"output_type {output_type!r} is unknown; expected one of {output_types}")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"num_inference_steps is {steps!r}; expected a positive integer")


def settle(pipe, req: Request, mode: str, guidance: float, strength: Any) -> Request:
    """``req`` with its mode, guidance and strength (checked), its copies and whether it runs the CFG batch."""
    if not 0.0 < float(strength) <= 1.0:
        raise ConfigError(f"strength is {strength}; expected a number in (0, 1]")
    req.mode, req.guidance, req.strength = mode, guidance, float(strength)
    req.copies = (len(req.prompt) if isinstance(req.prompt, list) else 1) * req.num_images_per_prompt
    req.cfg = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
    return req


def prepare_structure(pipe, req: Request) -> None:
    """ControlNet images and T2I-Adapter features for this request; they settle the size, as in diffusers."""
    height, width = req.height, req.width
    if pipe.control is not None:
        pipe.control.set_scale(req.controlnet_conditioning_scale)
        height, width = pipe.control.prepare_images(
            req.control_image,
            height,
            width,
            req.copies,
            req.num_images_per_prompt,
            req.cfg,
            pipe.device,
            req.guess_mode,
        )
    if pipe.t2i is not None:  # the condition image settles the size when none is given
        pipe.t2i.set_scale(req.adapter_conditioning_scale)
        height, width = pipe.t2i.default_size(req.adapter_image, height, width)
    settle_size(pipe, req, height, width)
    if pipe.t2i is not None:
        pipe.t2i.prepare(
            req.adapter_image, req.height, req.width, req.copies, req.num_images_per_prompt, req.cfg, pipe.device
        )


def settle_size(pipe, req: Request, height: int | None, width: int | None) -> None:
    """The size the call runs at (the pipeline's default where none is given), checked against the engines."""
    req.height, req.width = height or pipe.default_size[0], width or pipe.default_size[1]
    if req.height % 8 or req.width % 8:
        raise ConfigError(f"height and width must be divisible by 8; got {req.height}x{req.width}")
    if pipe.engine_manifest is not None:
        check_engine_shapes(pipe.engine_manifest, req.height, req.width, req.copies)


def check_engine_shapes(manifest: dict, height: int, width: int, copies: int) -> None:
    """An engine pipeline runs the size and batch its engines were built for: say so before any work."""
    built = manifest["shapes"]
    rebuild = "build engines for it (ipa_rt build ... --height H --width W --batch B, or from_pretrained(..., " \
        "engine_options={'height': H, 'width': W, 'batch': B}))"  # fmt: skip
    if (height, width) != (built["height"], built["width"]):
        raise ConfigError(
            f"the engines were built for {built['width']}x{built['height']} images; this call asks for "
            f"{width}x{height}: call with height={built['height']}, width={built['width']}, or {rebuild}"
        )
    if copies > built["batch"]:
        raise ConfigError(
            f"the engines were built for up to {built['batch']} image(s) per call; this call makes {copies} "
            f"(prompts x num_images_per_prompt): {rebuild}"
        )


@dataclass
class Parts:
    """One request's own tensors before the loop (what a batched call concatenates row-wise)."""

    req: Request
    text: PromptEmbeds
    conditions: Any  # the conditioner's (embeds, CLIP states, key), None without an image prompt
    masks: list[Tensor | None] | None
    plan: Plan | EagerPlan
    setup: modes.ModeSetup
    noise: Tensor | None  # [S, *latents] what the scheduler's steps draw
    timestep_cond: Tensor | None  # LCM-distilled UNets' guidance embedding


MakeSetup = Callable[[Any, Request, Any, torch.dtype], modes.ModeSetup]


def request_parts(
    pipe, req: Request, structure: Callable[[Any, Request], None] | None = None, setup: MakeSetup | None = None
) -> Parts:
    """Everything diffusers does before its loop that draws from the request's generator or encodes its inputs:
    structure inputs, image conditions, prompt, initial latents, the scheduler's noise (the draws in diffusers'
    order). ``structure`` and ``setup``: a pipeline's own structure inputs and initial latents (video's clip)."""
    (structure or prepare_structure)(pipe, req)
    # the image side before the prompt (neither draws from the generator): an engine pipeline's first call then
    # loads the image encoder's engine before the smaller text encoder's, the lower peak memory (docs/performance.md)
    conditions = pipe.conditioner(
        req.ip_adapter_image, req.ip_adapter_image_embeds, req.negative_ip_adapter_image, req.ip_adapter_combine,
        req.copies, req.cfg,
    )  # fmt: skip
    text = encode_text(pipe, req)
    masks = None
    if pipe.adapters is not None:
        masks = ip_masks(pipe, req.cross_attention_kwargs, conditions, pipe.image_scale)
    plan = pipe.plan(req.num_inference_steps, req.strength, req.eta)
    dtype = text.embeds.dtype
    mode = (setup or _mode_setup)(pipe, req, plan, dtype)
    noise = None
    if plan.needs_noise:  # what the scheduler's steps would draw, drawn now in the same order
        shape = mode.latents.shape
        noise = torch.zeros((plan.steps, *shape), device=pipe.device, dtype=dtype)
        for j in plan.noise_steps:
            noise[j] = randn_tensor(shape, generator=req.generator, device=pipe.device, dtype=dtype)
    cond = guidance_embedding(pipe, req.guidance, req.copies, dtype)
    return Parts(req, text, conditions, masks, plan, mode, noise, cond)


def step_inputs(pipe, parts: Parts) -> StepInputs:
    """The static loop's inputs from one request's parts (or a batch's, merged row-wise): the image side once, at
    the resolution the mode settled on, then the text conditions, gates and tables the loop reads."""
    req, plan, setup, text = parts.req, parts.plan, parts.setup, parts.text
    if pipe.adapters is not None:
        prepare_image_side(pipe, parts.conditions, parts.masks, setup, req.frames)
    control, t2i, steps = pipe.control, pipe.t2i, plan.steps
    keep = (req.control_guidance_start, req.control_guidance_end, steps, pipe.device)
    return StepInputs(
        plan=plan,
        latents=setup.latents,
        text=text.embeds.repeat_interleave(req.frames, dim=0) if req.frames > 1 else text.embeds,
        added=added_conditions(pipe, text, setup.height, setup.width, req.copies, req.cfg),
        timestep_cond=parts.timestep_cond,
        guidance=req.guidance,
        cfg=req.cfg,
        noise=parts.noise,
        gate=pipe.step_gate(plan.steps),
        inpaint_mask=setup.mask,
        inpaint_latents=setup.inpaint_latents,
        blend=_blend(pipe, plan) if setup.noise is not None and plan.kind != "eager" else None,
        blend_noise=setup.noise,
        control_keep=control.keep_gate(*keep) if control is not None else None,
        t2i_keep=t2i.keep_gate(req.adapter_conditioning_factor, steps, pipe.device) if t2i is not None else None,
    )


def _mode_setup(pipe, req: Request, plan, dtype: torch.dtype) -> modes.ModeSetup:
    """Initial latents (and inpainting inputs) for the request's mode, with the generator's draws in order."""
    device, generator, latents = pipe.device, req.generator, req.latents
    if req.mode == "txt2img":
        vsf = pipe.vae_scale_factor
        shape = (req.copies, pipe.unet.config.in_channels, req.height // vsf, req.width // vsf)
        return modes.ModeSetup(modes.txt2img(shape, plan, generator, device, dtype, latents), req.height, req.width)
    if req.mode == "img2img":
        structure = pipe.control is not None or pipe.t2i is not None
        size = (req.height, req.width) if structure else None  # structure inputs fix the size: the init follows
        return modes.img2img(pipe, req.image, plan, req.copies, generator, device, dtype, latents, size)
    return modes.inpaint(
        pipe, req.image, req.mask_image, plan, req.copies, generator, device, dtype, latents, req.height, req.width,
        req.strength, req.cfg,
    )  # fmt: skip


def prepare_image_side(pipe, conditions, masks, setup: modes.ModeSetup, frames: int = 1) -> None:
    """Projection and every layer's image keys/values: skipped when the same reference is already in place, copied
    into the static buffers from the reference cache when it was prepared a few calls ago (the cache key is the
    conditioner's: images, negative images, combine mode, copies, guidance; plus ``frames``). ``frames`` > 1
    (video): every frame of a row sees that row's tokens, as AnimateDiff's UNet repeats them."""
    stack = pipe.adapters
    if conditions is None:
        stack.prepare(None)
        return
    key = (conditions[2], frames)
    if masks is None and key == stack.context.prepared_key:  # same reference: the buffers hold it already
        return
    cache = pipe.conditioner.cache
    pipe.conditioner.bind_cache()
    cached = cache.get(("image_side", *key))  # keys/values do not depend on masks or scales: masked calls share it
    tokens, kv = cached if cached is not None else (_image_tokens(stack, conditions, frames), None)
    image_scale, queries = None, None
    if masks:  # masks are downsampled to every layer's query count
        image_scale = pipe.image_scale
        queries = query_tokens(pipe.unet, stack.layer_names, setup.height, setup.width, pipe.vae_scale_factor)
    kv = stack.prepare(tokens, masks, image_scale, None if masks else key, kv, queries)
    if cached is None:
        cache.put(("image_side", *key), (tokens, kv))


def _image_tokens(stack, conditions, frames: int) -> list[Tensor]:
    tokens = stack.project(conditions[0], conditions[1])
    return [t.repeat_interleave(frames, dim=0) for t in tokens] if frames > 1 else tokens


def encode_text(pipe, req: Request) -> PromptEmbeds:
    """The request's prompt embeddings, from the pipeline's text cache when the same prompts were encoded before
    (the loop copies them into its static buffers and never writes into them)."""
    encode_prompt = FAMILY_RUNTIME[pipe.family.name][0]
    force_zeros = pipe.base.force_zeros_for_empty_prompt
    key = _text_key(pipe, req, force_zeros)
    if key is not None:
        pipe.text_cache.bind(*pipe.text_encoders, *pipe.tokenizers)
        text = pipe.text_cache.get(key)
        if text is not None:
            return text
    text = encode_prompt(
        pipe.text_encoders,
        pipe.tokenizers,
        req.prompt,
        req.negative_prompt,
        req.num_images_per_prompt,
        req.cfg,
        pipe.device,
        pipe.dtype,
        prompt_2=req.prompt_2,
        negative_prompt_2=req.negative_prompt_2,
        force_zeros_for_empty_prompt=force_zeros,
    )
    if key is not None:
        pipe.text_cache.put(key, text)
    return text


def _text_key(pipe, req: Request, force_zeros: bool) -> tuple | None:
    """Everything the prompt embeddings depend on besides the text encoders (None: an argument that cannot be a
    key, left for the encoder to refuse)."""
    prompts = (req.prompt, req.negative_prompt, req.prompt_2, req.negative_prompt_2)
    frozen = tuple(tuple(p) if isinstance(p, list) else p for p in prompts)
    key = ("text", pipe.family.name, frozen, req.num_images_per_prompt, req.cfg, pipe.dtype, pipe.device, force_zeros)
    return key if hashable(key) else None


def ip_masks(
    pipe, kwargs: dict[str, Any] | None, conditions, image_scale: Tensor | None = None
) -> list[Tensor | None] | None:
    """``cross_attention_kwargs={"ip_adapter_masks": ...}`` validated as diffusers' processor does (``image_scale``:
    the per masked image factors ``set_ip_adapter_scale`` left, ``[adapters, images, layers]``)."""
    kwargs = dict(kwargs or {})
    masks = kwargs.pop("ip_adapter_masks", None)
    if kwargs:
        raise ConfigError(f"cross_attention_kwargs has {sorted(kwargs)}; only 'ip_adapter_masks' is supported")
    if masks is None:
        if image_scale is not None:
            raise ScaleError("per-image scales (lists per adapter) need regional masks: pass ip_adapter_masks")
        return None
    if conditions is None:
        raise ImageInputError("ip_adapter_masks were given without ip_adapter_image / ip_adapter_image_embeds")
    if not pipe.adapters.supports_masks:
        raise ConfigError(f"regional ip_adapter_masks are not part of {pipe.backend} engines; use backend='torch'")
    if isinstance(masks, Tensor):  # legacy [adapters, 1, H, W]
        masks = list(masks.unsqueeze(1))
    count = pipe.adapters.num_adapters
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
        if image_scale is not None and image_scale.shape[1] not in (1, m.shape[1]):
            raise ScaleError(
                f"per-image scales have {image_scale.shape[1]} entries; expected {m.shape[1]} (one per mask)"
            )
    return list(masks)


def _blend(pipe, plan: Plan) -> Tensor:
    """4-channel inpainting blend coefficients, once per (cached) plan rather than once per call."""
    if plan.blend is None:
        plan.blend = modes.blend_coefficients(plan).to(pipe.device)
    return plan.blend


def added_conditions(pipe, text: PromptEmbeds, height: int, width: int, copies: int, cfg: bool) -> dict:
    """SDXL's pooled text embeddings and time ids, as diffusers' SDXL pipelines add them."""
    if not pipe.family.pooled_text:
        return {}
    time_ids = [height, width, 0, 0, height, width]  # original size, crop top-left, target size
    embedding = getattr(pipe.unet, "add_embedding", None)  # an engine's UNet was checked when it was built
    expected = embedding.linear_1.in_features if embedding is not None else None
    passed = pipe.unet.config.addition_time_embed_dim * len(time_ids) + pipe.text_encoders[-1].config.projection_dim
    if expected is not None and expected != passed:
        raise ConfigError(f"SDXL UNet expects an added embedding of {expected}, the text encoders give {passed}")
    ids = torch.tensor([time_ids], dtype=text.embeds.dtype)
    ids = (torch.cat([ids, ids]) if cfg else ids).to(pipe.device).repeat(copies, 1)
    return {"text_embeds": text.pooled, "time_ids": ids}


def guidance_embedding(pipe, guidance_scale: float, copies: int, dtype: torch.dtype) -> Tensor | None:
    """LCM-distilled UNets (``time_cond_proj_dim``) take guidance as an embedding, as diffusers builds it."""
    dim = pipe.unet.config.time_cond_proj_dim
    if dim is None:
        return None
    w = torch.tensor(guidance_scale - 1).repeat(copies) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(device=pipe.device, dtype=dtype)


def query_tokens(unet, layer_names: list[str], height: int, width: int, vae_scale_factor: int) -> list[int]:
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
