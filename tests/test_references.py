"""Reference-image features: negative image prompt, combine modes, embeds files, the reference cache."""

from __future__ import annotations

import pytest
import torch
from conftest import CALL, assert_parity, count_forwards, diffusers_pipe, fixed_latents, ipa_pipe

import ipa_rt
from ipa_rt.adapters.conditions import combine, load_ip_adapter_embeds, save_ip_adapter_embeds


def diffusers_embeds(ref, image, hidden: bool):
    """The conditional encoder output diffusers computes for one image, [1, 1, ...]."""
    cond, _ = ref.encode_image(image, "cpu", 1, output_hidden_states=hidden)
    return cond[None]


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_negative_image_prompt_equals_embeds_with_that_negative(models, images, variant):
    hidden = variant != "base"
    ref = diffusers_pipe(models, "sd15", [f"{variant}.safetensors"])
    pos, neg = diffusers_embeds(ref, images[0], hidden), diffusers_embeds(ref, images[2], hidden)
    a = ref("a cat", ip_adapter_image_embeds=[torch.cat([neg, pos])], latents=fixed_latents(), **CALL).images
    ours = ipa_pipe(models, "sd15", models.adapter("sd15", variant))
    b = ours("a cat", ip_adapter_image=images[0], negative_ip_adapter_image=images[2], latents=fixed_latents(), **CALL)
    assert_parity(b.images, a)


@pytest.mark.parametrize(
    "mode", ["average", *(pytest.param(mode, marks=pytest.mark.slow) for mode in ("norm_average", "add", "subtract"))]
)
def test_combine_modes_equal_precombined_embeds(models, images, mode):
    ref = diffusers_pipe(models, "sd15", ["base.safetensors"])
    per_image = torch.cat([diffusers_embeds(ref, im, False) for im in images], dim=1)  # [1, 3, D]
    pos = combine(per_image, mode)
    expected = {
        "average": per_image.mean(1, keepdim=True),
        "norm_average": (per_image / per_image.norm(dim=1, keepdim=True)).mean(1, keepdim=True),
        "add": per_image.sum(1, keepdim=True),
        "subtract": per_image[:, :1] - per_image[:, 1:].mean(1, keepdim=True),
    }[mode]
    torch.testing.assert_close(pos, expected, rtol=0, atol=0)
    a = ref("a cat", ip_adapter_image_embeds=[torch.cat([torch.zeros_like(pos), pos])], latents=fixed_latents(), **CALL)
    ours = ipa_pipe(models, "sd15", models.adapter("sd15", "base"))
    b = ours("a cat", ip_adapter_image=[list(images)], ip_adapter_combine=mode, latents=fixed_latents(), **CALL)
    assert_parity(b.images, a.images)


def test_embeds_file_roundtrip(models, images, tmp_path):
    ours = ipa_pipe(models, "sdxl", [models.adapter("sdxl", "base"), models.adapter("sdxl", "plus")])
    embeds = ours.prepare_ip_adapter_image_embeds([images[0], [images[1], images[2]]])
    path = save_ip_adapter_embeds(tmp_path / "ref.safetensors", embeds)
    loaded = load_ip_adapter_embeds(path)
    assert all(torch.equal(x, y) for x, y in zip(embeds, loaded, strict=True))
    a = ours("a cat", ip_adapter_image=[images[0], [images[1], images[2]]], latents=fixed_latents(), **CALL).images
    b = ours("a cat", ip_adapter_image_embeds=loaded, latents=fixed_latents(), **CALL).images
    assert torch.equal(a, b)
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(ipa_rt.CheckpointError, match=r"bad\.safetensors.*not a readable safetensors"):
        load_ip_adapter_embeds(tmp_path / "bad.safetensors")


def test_reference_cache_skips_encoder_projection_and_kv(models, images):
    pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "plus"))
    counts = count_forwards(
        encoder=pipe.image_encoder, projection=pipe.adapters.projections[0], to_k_ip=pipe.adapters.to_k_ip[0][0]
    )
    first = pipe("x", ip_adapter_image=images[0], latents=fixed_latents(), **CALL).images
    seen = dict(counts)
    same_pixels = images[0].copy()  # another object, same content: still a cache hit
    pipe.set_ip_adapter_scale(0.5)
    second = pipe("x", ip_adapter_image=same_pixels, latents=fixed_latents(), **CALL).images
    assert counts == seen and pipe.cache_stats()["reference"]["by_kind"]["encoder"]["hits"] == 1
    pipe.set_ip_adapter_scale(1.0)
    again = pipe("x", ip_adapter_image=same_pixels, latents=fixed_latents(), **CALL).images
    assert torch.equal(again, first) and not torch.equal(second, first)
    pipe("x", ip_adapter_image=images[1], latents=fixed_latents(), **CALL)
    assert counts["encoder"] == seen["encoder"] + 2 and counts["projection"] == seen["projection"] + 1
