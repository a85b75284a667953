"""Regional IP-Adapter masks (cross_attention_kwargs["ip_adapter_masks"]) and per-image scales vs diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CALL, FAMILY_CASES, KERNEL_DEVICE, assert_parity, diffusers_pipe, fixed_latents, ipa_pipe
from PIL import Image

import ipa_rt
from ipa_rt.kernels import fused_available


def masks(size: int = 32):
    from diffusers.image_processor import IPAdapterMaskProcessor

    left, right = np.zeros((size, size), np.uint8), np.zeros((size, size), np.uint8)
    left[:, : size // 2] = 255
    right[4:, size // 2 - 3 :] = 255  # overlapping, not aligned with the latent grid: bicubic matters
    m = IPAdapterMaskProcessor().preprocess([Image.fromarray(left), Image.fromarray(right)], height=size, width=size)
    return m.reshape(1, m.shape[0], m.shape[2], m.shape[3])


def run(models, images, family, attention="sdpa", device="cpu"):
    scale = [[0.7, 0.4], 0.5]  # adapter 0: two masked images with their own scales; adapter 1: unmasked
    ref = diffusers_pipe(models, family, ["plus.safetensors", "base.safetensors"])
    ref.set_ip_adapter_scale(scale)
    adapters = [models.adapter(family, "plus"), models.adapter(family, "base")]
    ours = ipa_pipe(models, family, adapters, attention=attention, device=device)
    ours.set_ip_adapter_scale(scale)
    kw = dict(
        ip_adapter_image=[[images[0], images[1]], images[2]],
        cross_attention_kwargs={"ip_adapter_masks": [masks(), None]},
        latents=fixed_latents(),
        **CALL,
    )
    return ours("two cats", **kw).images.cpu(), ref("two cats", **kw).images


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_masks_and_per_image_scales_match_diffusers(models, images, family):
    out, ref = run(models, images, family)
    assert_parity(out, ref)


@pytest.mark.slow
@pytest.mark.skipif(
    fused_available(torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.float32, 64) is not None,
    reason="the Triton kernel cannot run here",
)
def test_masks_through_the_fused_kernel(models, images):
    out, ref = run(models, images, "sd15", attention="triton", device=KERNEL_DEVICE)
    assert_parity(out, ref)


def test_mask_errors(models, images):
    pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "plus"))
    with pytest.raises(ipa_rt.ImageInputError, match=r"ip_adapter_masks\[0\] has 2 masks; expected 1"):
        pipe("x", ip_adapter_image=images[0], cross_attention_kwargs={"ip_adapter_masks": [masks()]}, **CALL)
    pipe.set_ip_adapter_scale([[0.5, 0.5]])
    with pytest.raises(ipa_rt.ScaleError, match=r"per-image scales .* need regional masks"):
        pipe("x", ip_adapter_image=[[images[0], images[1]]], **CALL)
    with pytest.raises(ipa_rt.ConfigError, match=r"only 'ip_adapter_masks' is supported"):
        pipe("x", cross_attention_kwargs={"scale": 0.5}, **CALL)


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_two_adapters_each_with_a_region(models, images, family):
    """diffusers' documented two-adapter regional setup: one mask per adapter, one image each."""
    both = masks()
    per_adapter = [both[:, :1], both[:, 1:]]
    ref = diffusers_pipe(models, family, ["plus.safetensors", "base.safetensors"])
    ref.set_ip_adapter_scale([0.6, 0.9])
    ours = ipa_pipe(models, family, [models.adapter(family, "plus"), models.adapter(family, "base")])
    ours.set_ip_adapter_scale([0.6, 0.9])
    kw = dict(
        ip_adapter_image=[images[0], images[1]],
        cross_attention_kwargs={"ip_adapter_masks": per_adapter},
        generator=None,
        **CALL,
    )
    a = ref("two cats", latents=fixed_latents(), **kw).images
    b = ours("two cats", latents=fixed_latents(), **kw).images
    assert_parity(b, a)
