"""Initial latents for txt2img, img2img and inpainting, exactly as diffusers' SD / SDXL pipelines make them.

The generator is drawn from in diffusers' order (VAE posterior samples and noise), so the same seed gives
the same result. Per-step inpainting blend coefficients are taken from the diffusers scheduler itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from ..console import hushed
from ..errors import ConfigError, ImageInputError

# diffusers' pipeline modules import transformers' CLIP image processors, which note that torchvision is missing and
# fall back to PIL, the path ipa_rt uses: a note for no one (here when a submodule such as ipa_rt.export is imported
# before the package's own hushed imports)
with hushed("transformers"):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

# family -> default strength (img2img, inpaint), as the diffusers pipelines default them
DEFAULT_STRENGTH = {"sd15": (0.8, 1.0), "sdxl": (0.3, 0.9999)}


@dataclass
class ModeSetup:
    latents: Tensor  # initial latents, noised and scaled as the mode requires
    height: int
    width: int
    mask: Tensor | None = None  # [B(x2 with CFG), 1, h, w]
    inpaint_latents: Tensor | None = None  # 9-ch: masked-image latents (x2 with CFG); 4-ch: clean image latents
    noise: Tensor | None = None  # 4-ch inpaint: the initial noise, re-mixed into the known region each step


def encode_vae_image(vae, image: Tensor, generator, dtype, sdxl: bool, latents_stats: bool) -> Tensor:
    """diffusers' ``_encode_vae_image`` (SDXL: upcast VAEs encode in fp32; img2img also applies latents stats)."""
    vae_dtype = next(vae.parameters()).dtype
    image = image.to(dtype=vae_dtype if sdxl and vae.config.force_upcast else dtype)
    if isinstance(generator, list):
        out = torch.cat(
            [retrieve_latents(vae.encode(image[i : i + 1]), generator=generator[i]) for i in range(image.shape[0])]
        )
    else:
        out = retrieve_latents(vae.encode(image), generator=generator)
    out = out.to(dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if latents_stats and mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(out.device, out.dtype)
        std = torch.tensor(std).view(1, -1, 1, 1).to(out.device, out.dtype)
        return (out - mean) * vae.config.scaling_factor / std
    return vae.config.scaling_factor * out


def _repeat(x: Tensor, batch: int, what: str) -> Tensor:
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0]:
        raise ImageInputError(f"{what} has batch {x.shape[0]}, which does not divide the requested batch {batch}")
    return x.repeat(batch // x.shape[0], 1, 1, 1)


def txt2img(shape, plan, generator, device, dtype, latents: Tensor | None) -> Tensor:
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    elif tuple(latents.shape) != tuple(shape):
        raise ConfigError(f"latents have shape {list(latents.shape)}; expected {list(shape)} for this call")
    return latents.to(device=device, dtype=dtype) * plan.init_noise_sigma  # given latents join the pipeline's dtype


def img2img(pipe, image, plan, batch, generator, device, dtype, latents: Tensor | None, size=None) -> ModeSetup:
    """``StableDiffusion(XL)Img2ImgPipeline.prepare_latents``: encode, then noise to the first timestep.
    ``size``: ``(height, width)`` to resize the image to first (the ControlNet img2img pipelines do)."""
    pixels = pipe.image_processor.preprocess(image, *(size or ()))
    height, width = pixels.shape[-2:]
    pixels = pixels.to(device=device, dtype=dtype)
    sdxl = pipe.family.name == "sdxl"
    init = pixels if pixels.shape[1] == 4 else encode_vae_image(pipe.vae, pixels, generator, dtype, sdxl, sdxl)
    init = _repeat(init, batch, "image")
    if latents is not None:
        raise ConfigError("latents= cannot be combined with image= (img2img makes its latents from the image)")
    noise = randn_tensor(init.shape, generator=generator, device=device, dtype=dtype)
    t0 = plan.timesteps[:1].repeat(batch)
    return ModeSetup(plan.scheduler.add_noise(init, noise, t0), height, width)


def inpaint(
    pipe, image, mask_image, plan, batch, generator, device, dtype, latents, height, width, strength, cfg
) -> ModeSetup:
    """``StableDiffusion(XL)InpaintPipeline``: 9-channel UNets get mask + masked-image latents as input,
    4-channel UNets blend the re-noised known region back after every step."""
    sdxl = pipe.family.name == "sdxl"
    pixels = pipe.image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
    mask = pipe.mask_processor.preprocess(mask_image, height=height, width=width)
    masked = pixels * (mask < 0.5)
    latent_size = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    shape = (batch, pipe.vae.config.latent_channels, *latent_size)
    strength_max = strength == 1.0
    four = pipe.unet.config.in_channels == 4
    image_latents = None
    if four or (latents is None and not strength_max):
        image_latents = encode_vae_image(pipe.vae, pixels.to(device=device, dtype=dtype), generator, dtype, sdxl, False)
        image_latents = _repeat(image_latents, batch, "image")
    t0 = plan.timesteps[:1].repeat(batch)
    if latents is None:
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        init = noise * plan.init_noise_sigma if strength_max else plan.scheduler.add_noise(image_latents, noise, t0)
    else:
        noise = latents.to(device)
        init = noise * plan.init_noise_sigma
    mask_lat = torch.nn.functional.interpolate(mask, size=latent_size).to(device=device, dtype=dtype)
    mask_lat = _repeat(mask_lat, batch, "mask_image")
    masked_lat = encode_vae_image(pipe.vae, masked.to(device=device, dtype=dtype), generator, dtype, sdxl, False)
    masked_lat = _repeat(masked_lat, batch, "image")
    if cfg:
        mask_lat, masked_lat = torch.cat([mask_lat] * 2), torch.cat([masked_lat] * 2)
    if four:
        return ModeSetup(init, height, width, mask=mask_lat, inpaint_latents=image_latents, noise=noise)
    return ModeSetup(init, height, width, mask=mask_lat, inpaint_latents=masked_lat.to(device=device, dtype=dtype))


@torch.no_grad()
def blend_coefficients(plan) -> Tensor:
    """``[S, 2]``: the known region at step i is ``a_i * image_latents + b_i * noise`` — diffusers'
    ``scheduler.add_noise(image_latents, noise, t_{i+1})`` after step i (plain image latents after the last),
    read off the scheduler by advancing a copy of it exactly as the loop would."""
    sched = copy.deepcopy(plan.scheduler)
    one, zero = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    throwaway = torch.Generator().manual_seed(0)  # dummy steps may draw noise: never from the user's generator
    rows = []
    for i, t in enumerate(plan.timesteps):
        kw: dict[str, Any] = {"generator": throwaway} if "generator" in sched.step.__code__.co_varnames else {}
        sched.step(zero, t, zero, return_dict=False, **kw)
        if i < plan.steps - 1:
            t_next = plan.timesteps[i + 1 : i + 2]
            rows.append(
                [sched.add_noise(one, zero, t_next).flatten()[0], sched.add_noise(zero, one, t_next).flatten()[0]]
            )
        else:
            rows.append([torch.ones(()), torch.zeros(())])
    return torch.tensor([[float(a), float(b)] for a, b in rows], dtype=torch.float32)


def mask_processor(vae_scale_factor: int) -> VaeImageProcessor:
    return VaeImageProcessor(
        vae_scale_factor=vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )
