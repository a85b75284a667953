"""An ipa_rt pipeline as ComfyUI's ``MODEL``, ``CLIP`` and ``VAE`` (the ComfyUI_TensorRT pattern, with IP-Adapter).

ComfyUI's ``BaseModel`` with ipa_rt's UNet (engine or torch) in place of its own, driven by KSampler. IP-Adapter comes
in through ``transformer_options["ipa_rt"]`` (set by the Apply node on a clone) and is applied per call by tensor
operations only: no rebuild, no host branch on a value. What the engine cannot honour raises an error naming it
instead of being dropped. Imports ComfyUI: loaded only inside ComfyUI, when a node first runs (docs/guides/comfyui.md,
the engine as MODEL: uncond rows, the σ gate, regional masks, SDXL's ``y``, what is refused).
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
import torch
from torch import Tensor

from ..errors import ConfigError
from ..models import pooled_text_width

KEY = "ipa_rt"
BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear"}  # diffusers name -> ComfyUI name
ALLOWED_OBJECT_PATCHES = ("model_sampling",)  # computed outside the diffusion model: honoured


class IpaRtDiffusionModel(torch.nn.Module):
    """``forward(x, timesteps, context, ...)`` → the UNet's prediction, from ipa_rt's UNet."""

    def __init__(self, pipe: Any) -> None:
        super().__init__()
        self.__dict__["pipe"] = pipe  # not a submodule: ComfyUI must neither count nor move the pipeline's weights
        self.dtype = pipe.dtype

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | None = None,
        y: Tensor | None = None,
        control: Any = None,
        transformer_options: dict | None = None,
        **kwargs: Any,
    ) -> Tensor:
        options = transformer_options or {}
        pipe = self.pipe
        refuse_unhonoured(options, control, kwargs)
        # ComfyUI samples under inference mode; the image-side buffers prepared here are rewritten in place by
        # later calls, the ipa_rt Sampler's included, which run outside it (ipa_rt.runtime.loop.static_call)
        with torch.inference_mode(False), torch.no_grad():
            added = added_conditions(pipe, y, x.shape[0])
            prepare_image_side(pipe, options.get(KEY), options, x.shape)
            sample = x.to(pipe.dtype)
            ctx = context.to(pipe.device, pipe.dtype)
            extra = {"added_cond_kwargs": added} if added is not None else {}
            return pipe.unet(sample, timesteps.float(), encoder_hidden_states=ctx, return_dict=False, **extra)[0]


SDXL_ADM_WIDTH = 256  # comfy.model_base.SDXL: each size condition is a 256-wide sinusoidal embedding
SDXL_SIZES = 6  # height, width, crop top, crop left, target height, target width (diffusers' time_ids order)


def added_conditions(pipe: Any, y: Tensor | None, rows: int) -> dict[str, Tensor] | None:
    """SDXL's added conditions as diffusers' UNet takes them (``text_embeds``, ``time_ids``) from ComfyUI's ``y``
    (``comfy.model_base.SDXL.encode_adm``: the pooled text, then six ``timestep_embedding(size, 256)``): the pooled
    text is its first columns; each size is an integer read back from its embedding's angles (the lowest frequency
    first, then every higher one, so fp16 rounding cannot alias) and checked by embedding it again, exactly."""
    if not pipe.family.pooled_text:
        if y is not None:
            raise ConfigError(
                f"model: a `y` conditioning {tuple(y.shape)} was given to an ipa_rt {pipe.family.name} model, which "
                "takes none"
            )
        return None
    pooled_dim = pooled_text_width(pipe.unet.config)  # a UNet-only pipeline has no text encoder to ask
    expected = pooled_dim + SDXL_SIZES * SDXL_ADM_WIDTH
    if y is None or y.ndim != 2 or y.shape != (rows, expected):
        got = None if y is None else tuple(y.shape)
        raise ConfigError(
            f"model: SDXL's `y` conditioning is {got}; expected [{rows}, {expected}] (the pooled text {pooled_dim} + "
            f"{SDXL_SIZES} x {SDXL_ADM_WIDTH} size embeddings, as ComfyUI's SDXL model makes it from a CLIP with a "
            "pooled output: use the ipa_rt MODEL's own CLIP, or CLIP Text Encode SDXL on it)"
        )
    sizes = y[:, pooled_dim:].reshape(rows * SDXL_SIZES, SDXL_ADM_WIDTH)
    sizes = sizes.cpu()  # encode_adm embeds on the CPU: the check embeds there too, bit for bit
    ids = sizes_from_embedding(sizes)
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    again = timestep_embedding(ids.to(torch.float32), SDXL_ADM_WIDTH).to(sizes.dtype)
    if not torch.equal(again, sizes):
        raise ConfigError(
            "model: SDXL's `y` size conditions are not embeddings of integer sizes (ComfyUI's SDXL encode_adm of "
            "width, height, crop and target size); the ipa_rt MODEL takes integer sizes only"
        )
    return {
        "text_embeds": y[:, :pooled_dim].to(pipe.device, pipe.dtype),
        "time_ids": ids.reshape(rows, SDXL_SIZES).to(pipe.device, pipe.dtype),
    }


def sizes_from_embedding(emb: Tensor) -> Tensor:
    """Non-negative integers ``t`` from ``timestep_embedding(t, dim)`` rows (``[cos(t f), sin(t f)]`` with
    ``f_k = 10000^(-k / (dim / 2))``). The lowest frequency's angle, taken in [0, 2 pi), fixes t unambiguously
    below 2 pi / f_min (58,000 for dim 256); each next higher frequency (x1.07) refines it by its count of whole
    turns, so the final estimate has the highest frequency's precision. Float64 throughout."""
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    half = emb.shape[1] // 2
    one = timestep_embedding(torch.ones(1), emb.shape[1])[0].double()  # the frequencies, from ComfyUI's own function
    freqs = torch.atan2(one[half:], one[:half])  # [half], highest first
    angles = torch.atan2(emb[:, half:].double(), emb[:, :half].double())  # [rows, half], each in (-pi, pi]
    t = angles[:, -1].remainder(2 * torch.pi) / freqs[-1]
    for k in range(half - 2, -1, -1):
        turns = torch.round((t * freqs[k] - angles[:, k]) / (2 * torch.pi))
        t = (angles[:, k] + 2 * torch.pi * turns) / freqs[k]
    return torch.round(t)


def refuse_unhonoured(options: dict, control: Any, extra: dict) -> None:
    patches = {k: sorted(v) for k in ("patches", "patches_replace") if (v := options.get(k))}
    if patches:
        raise ConfigError(
            f"model: patches {patches} were applied to an ipa_rt model; its UNet runs inside ipa_rt and cannot run "
            "them (apply IP-Adapter with the ipa_rt Apply node; other attention/block patches are not supported)"
        )
    if control is not None:
        raise ConfigError(
            "model: a ControlNet was applied; an ipa_rt engine model runs only the ControlNets it was built with "
            "(ipa_rt build --controlnet), which ComfyUI's Apply ControlNet does not drive: remove it or use the "
            "ipa_rt Sampler"
        )
    unknown = sorted(k for k, v in extra.items() if v is not None)
    if unknown:
        raise ConfigError(f"model: conditioning inputs {unknown} are not inputs of the ipa_rt UNet")


def prepare_image_side(pipe: Any, ip: dict | None, options: dict, shape: torch.Size) -> None:
    """The image side for one UNet call on latents of ``shape``: tokens per row (ComfyUI's ``cond_or_uncond``
    order), keys/values and regional masks (at the call's pixel size) held by the adapter stack, as the runtime
    holds them for a pipeline call; then the ``[adapters, layers]`` scale gated by ComfyUI's sigma window."""
    stack = pipe.adapters
    if stack is None:
        if ip is not None:
            raise ConfigError("model: IP-Adapter was applied but the ipa_rt model has no adapter loaded")
        return
    if ip is None:
        stack.prepare(None)
        return
    order = list(options.get("cond_or_uncond") or [0])
    chunk = shape[0] // len(order)
    masks = ip["masks"]
    vsf = pipe.vae_scale_factor
    size = (shape[-2] * vsf, shape[-1] * vsf) if any(m is not None for m in masks) else None
    key = (ip["key"], tuple(order), chunk, size)
    if key != stack.context.prepared_key:
        embeds = [
            torch.cat([(e["neg"] if c == 1 else e["pos"]).expand(chunk, *e["pos"].shape[1:]) for c in order])
            for e in ip["adapters"]
        ]
        embeds = [e.to(pipe.device, pipe.dtype) for e in embeds]
        tokens = stack.project(embeds, [None] * len(embeds))
        if size is None:
            stack.prepare(tokens, key=key)
        else:  # what a pipeline call with ip_adapter_masks holds: the runtime's checks and downsampling
            from ..runtime.request import ip_masks, query_tokens
            from .pipelines import mask_tensors

            full = mask_tensors(masks, [e["pos"].shape[1] for e in ip["adapters"]], *size)
            checked = ip_masks(pipe, {"ip_adapter_masks": full}, (embeds, None, None))
            queries = query_tokens(pipe.unet, stack.layer_names, *size, vsf)
            stack.prepare(tokens, checked, None, key, None, queries)
    sigma = options["sigmas"].reshape(-1)[:1].to(ip["start"].device, ip["start"].dtype)
    gate = (sigma <= ip["start"]) & (sigma >= ip["end"])  # [A]: ComfyUI_IPAdapter_plus' sigma window
    stack.context.set_scale(ip["weights"] * gate.to(ip["weights"].dtype)[:, None], gated_only=True)


class IpaRtModelPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher that refuses weight patches (LoRA) instead of letting them miss the engine's weights."""

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        raise ConfigError(
            "model: a LoRA (weight patch) was applied to an ipa_rt model, whose weights live in its engines: fuse "
            "it when the engines are built (ipa_rt build --lora FILE, or the loader's lora input)"
        )

    def add_object_patch(self, name: str, obj: Any) -> None:
        if name not in ALLOWED_OBJECT_PATCHES:
            raise ConfigError(f"model: the object patch {name!r} cannot be applied to an ipa_rt model")
        super().add_object_patch(name, obj)


def make_model(pipe: Any, source: Any = None) -> IpaRtModelPatcher:
    """ComfyUI's ``MODEL`` whose diffusion model is ``pipe``'s UNet: ComfyUI's SD1.5 or SDXL model class (so
    KSampler's conditioning makes SDXL's ``y``, which :func:`added_conditions` reads back). ``source``: the ComfyUI
    MODEL the UNet's weights came from (ipa_rt Engine from MODEL), whose model type, sampling and latent format
    are kept (a v-prediction checkpoint stays one; ComfyUI detected it)."""
    classes = {"sd15": comfy.model_base.BaseModel, "sdxl": comfy.model_base.SDXL}
    if pipe.family.name not in classes:
        raise ConfigError(
            f"pipeline: a {pipe.family.name} model; the ipa_rt MODEL node supports SD1.5 and SDXL models: use the "
            "ipa_rt Sampler node"
        )
    sched = pipe.base.scheduler.config
    schedule = BETA_SCHEDULES.get(sched.get("beta_schedule", "scaled_linear"))
    if schedule is None:
        raise ConfigError(f"pipeline: beta_schedule {sched.get('beta_schedule')!r} has no ComfyUI equivalent")
    prediction = sched.get("prediction_type", "epsilon")
    types = {"epsilon": comfy.model_base.ModelType.EPS, "v_prediction": comfy.model_base.ModelType.V_PREDICTION}
    if prediction not in types:
        raise ConfigError(f"pipeline: prediction_type {prediction!r}; expected epsilon or v_prediction")
    config = comfy.supported_models_base.BASE({"disable_unet_model_creation": True})
    config.sampling_settings = {
        "beta_schedule": schedule,
        "linear_start": sched.get("beta_start", 0.00085),
        "linear_end": sched.get("beta_end", 0.012),
        "timesteps": sched.get("num_train_timesteps", 1000),
    }
    config.latent_format = comfy.latent_formats.LatentFormat()
    config.latent_format.scale_factor = pipe.vae_config.scaling_factor
    config.latent_format.latent_channels = 4
    model_type = types[prediction] if source is None else source.model.model_type
    base = classes[pipe.family.name](config, model_type=model_type, device=pipe.device)
    if source is not None:
        base.model_sampling = copy.deepcopy(source.model.model_sampling)  # a module: its own copy, not shared
        base.latent_format = source.model.latent_format
    base.diffusion_model = IpaRtDiffusionModel(pipe)
    device = comfy.model_management.get_torch_device()
    return IpaRtModelPatcher(base, load_device=device, offload_device=comfy.model_management.unet_offload_device())


def ip_options(model: Any, settings: list, pipe: Any) -> dict:
    """The ``transformer_options["ipa_rt"]`` payload: tensors and floats only (ComfyUI deep-copies it on clone)."""
    from .pipelines import ordered, scale_configs

    settings = ordered(pipe, settings)
    if any(s.mask is not None for s in settings) and not pipe.adapters.supports_masks:
        raise ConfigError(
            f"attention_mask: regional masks are not part of {pipe.backend} engines (as on the ipa_rt Sampler); "
            "load the pipeline with backend torch for masks on the MODEL"
        )
    weights, _ = pipe.scale_tables(scale_configs(pipe, settings))
    sampling = model.get_model_object("model_sampling")
    start = torch.tensor([float(sampling.percent_to_sigma(s.start_at)) for s in settings])
    end = torch.tensor([float(sampling.percent_to_sigma(s.end_at)) for s in settings])
    masks = [s.mask.detach().float().cpu() if s.mask is not None else None for s in settings]
    return {
        "adapters": [{"pos": s.embeds.pos, "neg": s.embeds.neg} for s in settings],
        "masks": masks,  # ComfyUI MASKs, made diffusers' ip_adapter_masks at each call's size
        "key": tuple((s.embeds.key, _digest(m)) for s, m in zip(settings, masks, strict=True)),
        "weights": weights.to(pipe.adapters.scale_eff.device),
        "start": start.to(pipe.adapters.scale_eff.device),
        "end": end.to(pipe.adapters.scale_eff.device),
    }


def _digest(mask: Tensor | None) -> str | None:
    """A MASK's content, for the prepared image side's key."""
    if mask is None:
        return None
    return hashlib.sha256(str(tuple(mask.shape)).encode() + mask.numpy().tobytes()).hexdigest()


class IpaRtClip:
    """ComfyUI's ``CLIP`` interface over the pipeline's text encoder(s), diffusers' prompt encoding (no ComfyUI
    prompt-weight syntax: the text is tokenized as diffusers tokenizes it)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def tokenize(self, text: str, return_word_ids: bool = False, **_: Any) -> dict:
        return {"ipa_rt": text}

    def encode_from_tokens(self, tokens: dict, return_pooled: bool = False, return_dict: bool = False) -> Any:
        from ..runtime.request import FAMILY_RUNTIME

        pipe = self.pipe
        encode_prompt = FAMILY_RUNTIME[pipe.family.name][0]
        text = encode_prompt(
            pipe.text_encoders,
            pipe.tokenizers,
            tokens["ipa_rt"],
            None,
            1,
            False,
            pipe.device,
            pipe.dtype,
            force_zeros_for_empty_prompt=pipe.base.force_zeros_for_empty_prompt,
        )
        if return_dict:
            return {"cond": text.embeds, "pooled_output": text.pooled}
        return (text.embeds, text.pooled) if return_pooled else text.embeds

    def encode_from_tokens_scheduled(
        self, tokens: dict, unprojected: bool = False, add_dict: dict | None = None, show_pbar: bool = True
    ) -> list:
        cond, pooled = self.encode_from_tokens(tokens, return_pooled=True)
        return [[cond, {"pooled_output": pooled, **(add_dict or {})}]]

    def clone(self) -> IpaRtClip:
        return self

    def add_patches(self, *args: Any, **kwargs: Any) -> list:
        raise ConfigError("clip: a LoRA was applied to the ipa_rt CLIP; fuse it into the pipeline (loader's lora)")

    def clip_layer(self, layer: int) -> None:
        raise ConfigError("clip: CLIP Set Last Layer is not supported by the ipa_rt CLIP (diffusers' encoding)")


class IpaRtVae:
    """ComfyUI's ``VAE`` interface over the pipeline's VAE: ``decode`` (unscaled latents → ``[B, H, W, 3]`` in
    0..1, diffusers' postprocessing) and ``encode`` (pixels → unscaled latents, the posterior's mode)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def decode(self, samples: Tensor, **_: Any) -> Tensor:
        pipe = self.pipe
        latents = samples.to(pipe.device) * pipe.vae.config.scaling_factor
        return pipe.decode(latents, "pt").permute(0, 2, 3, 1).float().cpu()

    def encode(self, pixels: Tensor, **_: Any) -> Tensor:
        pipe = self.pipe
        x = pixels[..., :3].permute(0, 3, 1, 2).to(pipe.device, pipe.vae.dtype) * 2 - 1
        out = pipe.vae.encode(x)
        z = out.latents if hasattr(out, "latents") else out.latent_dist.mode()
        return z.float().cpu()

    def spacial_compression_decode(self) -> int:
        return self.pipe.vae_scale_factor

    spacial_compression_encode = spacial_compression_decode
