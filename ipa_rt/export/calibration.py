"""Calibration inputs for int8 post-training quantisation of the UNet and the CLIP image encoder (``precision="int8"``).

The UNet's inputs are drawn the way diffusion training draws them, so no UNet has to run to make them:
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` from the VAE latent ``x0`` of a calibration image (every diffusers
scheduler feeds the UNet this variance-preserving ``x_t``, Euler's scaled input included), with the pipeline's own
text embeddings and image tokens, guidance's unconditional rows among them, and timesteps over the whole schedule,
LCM's four (999/759/499/259) included. The image encoder gets the same images, preprocessed as diffusers does.
docs/guides/cpu.md (int8 compute): the sets, the zero image, the built-in and the user's calibration sets.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..adapters.image import load_image
from ..errors import ConfigError

BUILTIN_PROMPTS = (
    "a photo of a cat sitting on a wooden table, soft window light",
    "portrait of a woman with red hair, studio lighting, 85mm",
    "a mountain lake at sunrise, mist over the water",
    "an oil painting of a harbour with fishing boats",
    "a red sports car on a wet city street at night, neon reflections",
    "a bowl of fruit, still life, high detail",
    "an astronaut riding a horse, digital art",
    "a cozy living room interior with plants and bookshelves",
)
TIMESTEPS = (999, 759, 499, 259, 899, 639, 379, 139, 49)  # LCM-4's first, then the rest of the schedule
SAMPLES = 16  # UNet inputs per calibration: statistics settle by then (each costs one fp32 UNet run at build)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class CalibrationSet:
    """Prompts and reference images a UNet is calibrated with; ``source`` says whose they are."""

    prompts: list[str]
    images: list  # PIL images
    source: str  # "built-in" or "user"

    def identity(self) -> str:
        """sha256 of the prompts and the images' pixels: two builds calibrated alike share engines."""
        h = hashlib.sha256()
        for p in self.prompts:
            h.update(p.encode() + b"\0")
        for im in self.images:
            h.update(np.asarray(im.convert("RGB")).tobytes())
        return h.hexdigest()


def builtin_images(count: int = 8, size: int = 256) -> list[Image.Image]:
    """Seeded procedural pictures (gradients, discs, stripes, texture): varied colour and structure, no files."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(count):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        angle = rng.uniform(0, np.pi)
        ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
        img = c0 * (1 - ramp) + c1 * ramp
        for _ in range(rng.integers(2, 6)):
            (cx, cy), r = rng.uniform(0, 1, 2), rng.uniform(0.05, 0.3)
            disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2)[..., None]
            img = np.where(disc, rng.uniform(0, 255, 3), img)
        img += 20 * np.sin(xx * rng.uniform(5, 40))[..., None] + rng.normal(0, 8, img.shape)
        out.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)))
    return out


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt a line (blank lines skipped)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"calibration prompts file '{file}' does not exist; expected a text file, one prompt a line")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"calibration prompts file '{file}' has no prompt; expected one prompt a line")
    return prompts


def image_files(path: str | os.PathLike) -> list[Path]:
    """A folder's images (sorted), or one image file."""
    p = Path(path)
    if p.is_file():
        return [p]
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else []
    if not files:
        raise ConfigError(
            f"calibration images '{p}' holds no image; expected a folder of {'/'.join(IMAGE_SUFFIXES)} files or a file"
        )
    return files


def calibration_set(prompts: list[str], images: list[str]) -> CalibrationSet:
    """The user's prompts and image files where given, the built-in set for what is not."""
    loaded = [load_image(str(f), "calibration_images") for f in images]
    source = "user" if prompts or images else "built-in"
    return CalibrationSet(list(prompts) or list(BUILTIN_PROMPTS), loaded or builtin_images(), source)


@torch.no_grad()
def _latents(pipe, image: Image.Image, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """``image`` encoded as img2img encodes it (the pipeline's preprocessing and VAE), in the UNet's scale."""
    from ..runtime.modes import encode_vae_image

    pixels = pipe.image_processor.preprocess(image, height=height, width=width).to(pipe.device, torch.float32)
    return encode_vae_image(pipe.vae, pixels, generator, torch.float32, pipe.family.name == "sdxl", False).cpu()


@torch.no_grad()
def encoder_feeds(pipe, calib: CalibrationSet) -> list[dict]:
    """The image encoder's calibration inputs: each image's ``pixel_values`` (one row) and the all-zero one."""
    pixels = [pipe.feature_extractor([im], return_tensors="pt").pixel_values.float() for im in calib.images]
    return [{"pixel_values": x.numpy()} for x in (*pixels, torch.zeros_like(pixels[0]))]


@torch.no_grad()
def unet_feeds(pipe, example: dict[str, torch.Tensor], calib: CalibrationSet, samples: int = SAMPLES) -> list[dict]:
    """``samples`` UNet input sets (numpy, one row each, named as the UNet contract's ``example`` inputs): every
    fourth row is the unconditional one guidance adds. Inputs the set does not draw (SDXL's time ids, an LCM UNet's
    guidance embedding) keep the contract's example row."""
    from diffusers import DDPMScheduler

    from ..runtime.request import FAMILY_RUNTIME, added_conditions, guidance_embedding

    encode = FAMILY_RUNTIME[pipe.family.name][0]
    height, width = (int(d) * pipe.vae_scale_factor for d in example["sample"].shape[-2:])
    abar = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    latents = [_latents(pipe, im, height, width, gen) for im in calib.images]
    tokens = []
    for im in calib.images:  # [neg, pos] rows per adapter, as guidance batches them
        embeds = pipe.prepare_ip_adapter_image_embeds([im] * pipe.adapters.num_adapters)
        projected = pipe.adapters.project(embeds, [None] * len(embeds))
        tokens.append([t.flatten(1, 2).float() for t in projected])
    texts: dict[int, Any] = {}  # each prompt encoded once ([negative, positive] rows)
    feeds = []
    for i in range(samples):
        p = i % len(calib.prompts)
        if p not in texts:
            zeros = pipe.base.force_zeros_for_empty_prompt
            texts[p] = encode(pipe.text_encoders, pipe.tokenizers, calib.prompts[p], None, 1, True, pipe.device,
                              torch.float32, force_zeros_for_empty_prompt=zeros)  # fmt: skip
        text = texts[p]
        row = 0 if i % 4 == 3 else 1  # every fourth the unconditional row
        k = i % len(latents)
        t = TIMESTEPS[i % len(TIMESTEPS)]
        noise = torch.randn(latents[k].shape, generator=gen)
        sample = abar[t].sqrt() * latents[k] + (1 - abar[t]).sqrt() * noise
        feed = {name: x[:1].float() for name, x in example.items()}
        feed["sample"] = sample.float()
        feed["timestep"] = torch.tensor([float(t)])
        feed["encoder_hidden_states"] = text.embeds[row : row + 1].float()
        extra = added_conditions(pipe, text, height, width, 1, True)
        if "text_embeds" in feed and extra:
            feed["text_embeds"] = extra["text_embeds"][row : row + 1].float()
        if "timestep_cond" in feed:
            feed["timestep_cond"] = guidance_embedding(pipe, 1.0 + (i % 3) * 3.0, 1, torch.float32)
        for a, tok in enumerate(tokens[k]):
            feed[f"ip_tokens_{a}"] = tok[row : row + 1]
        feed["ip_scale"] = torch.full_like(feed["ip_scale"], (0.5, 1.0)[i % 2])  # the usual range of the slider
        feeds.append({name: x.cpu().numpy() for name, x in feed.items()})
    return feeds
