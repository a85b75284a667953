"""img2img and inpainting (4- and 9-channel UNets) against diffusers' own pipelines, seeded, fp32 CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CALL, FAMILY_CASES, assert_parity, ipa_pipe
from PIL import Image

from ipa_rt import testing as T

SCHEDULERS = ["ddim", "euler_a", "dpm++2m", None]  # None: the base model's own (PNDM for SD1.5: eager path)


def reference_class(family: str, mode: str):
    import diffusers

    name = {"img2img": "Img2Img", "inpaint": "Inpaint"}[mode]
    return getattr(diffusers, f"StableDiffusion{'XL' if family == 'sdxl' else ''}{name}Pipeline")


def make_mask(size: int = 32) -> Image.Image:
    arr = np.zeros((size, size), np.uint8)
    arr[size // 4 : 3 * size // 4, size // 3 :] = 255
    return Image.fromarray(arr)


def run_mode(models, family, mode, images, base=None, scheduler=None, seed=5, **call):
    """Same files, same seed: diffusers' mode pipeline vs ipa_rt's one pipeline."""
    import ipa_rt

    base = base or models.base(family)
    ref = reference_class(family, mode).from_pretrained(base)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(models.adapter_dir(family)), subfolder="", weight_name="plus.safetensors")
    ours = ipa_pipe(models, family, models.adapter(family, "plus"), base=base, scheduler=scheduler)
    if scheduler is not None:
        ref.scheduler = type(ours.scheduler).from_config(ours.scheduler.config)
    ref.set_ip_adapter_scale(0.7)
    ours.set_ip_adapter_scale(0.7)
    kw = {**{k: v for k, v in CALL.items() if k not in ("height", "width")}, **call}
    if mode == "inpaint":
        kw |= {"mask_image": make_mask(), "height": 32, "width": 32}
    inputs = dict(prompt="a cat", image=T.make_image(seed=9, size=(32, 32)), ip_adapter_image=images[0], **kw)
    a = ref(generator=torch.Generator().manual_seed(seed), **inputs).images
    b = ours(generator=torch.Generator().manual_seed(seed), **inputs).images
    assert isinstance(ours, ipa_rt.Pipeline)
    return b, a


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("family", FAMILY_CASES)
def test_img2img(models, images, family, scheduler):
    out, ref = run_mode(models, family, "img2img", images, scheduler=scheduler, strength=0.6, num_inference_steps=4)
    assert_parity(out, ref)


@pytest.mark.parametrize("strength", [1.0, pytest.param(0.75, marks=pytest.mark.slow)])
@pytest.mark.parametrize("channels", [4, 9])
@pytest.mark.parametrize("family", FAMILY_CASES)
def test_inpaint(models, images, family, channels, strength):
    base = models.base(family) if channels == 4 else models.root / f"{family}-inpaint"
    out, ref = run_mode(
        models, family, "inpaint", images, base=base, scheduler="ddim", strength=strength, num_inference_steps=4
    )
    assert_parity(out, ref)


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_inpaint_eager_scheduler_and_euler(models, images, family):
    for scheduler in (None, "euler"):
        out, ref = run_mode(models, family, "inpaint", images, scheduler=scheduler, strength=0.8, num_inference_steps=3)
        assert_parity(out, ref)


def test_decoded_img2img(models, images):
    out, ref = run_mode(models, "sd15", "img2img", images, scheduler="ddim", strength=0.5, output_type="np")
    assert out.shape == ref.shape == (1, 32, 32, 3)
    assert np.abs(out - ref).max() <= 1e-4
