"""Tier 2: parity with diffusers through the public API, same files, same latents (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import CALL, FAMILIES, FAMILY_CASES, assert_parity, diffusers_pipe, face_embeds, fixed_latents, ipa_pipe

import ipa_rt

IMAGE_VARIANTS = ("base", "plus", "full")


def run_both(models, family, variants, images, scale=0.7, fmt="safetensors", call=None, **pipe_kw):
    """Run diffusers and ipa_rt on the same adapters, scale, inputs and latents; return both latents."""
    call = {**CALL, **(call or {})}
    names = [f"{v}.{fmt}" for v in variants]
    ref_pipe = diffusers_pipe(models, family, names)
    ours = ipa_pipe(models, family, [models.adapter(family, v, fmt) for v in variants], **pipe_kw)
    if "scheduler" in pipe_kw:
        ref_pipe.scheduler = type(ours.scheduler).from_config(ours.scheduler.config)
    ref_pipe.set_ip_adapter_scale(scale)
    ours.set_ip_adapter_scale(scale)
    latents = call.pop("latents", fixed_latents())
    seed = call.pop("seed", None)  # a fresh generator per run: both must draw the same noise

    def gen():
        return {} if seed is None else {"generator": torch.Generator().manual_seed(seed)}

    ref = ref_pipe("a cat", ip_adapter_image=images, latents=latents.clone(), **call, **gen()).images
    out = ours("a cat", ip_adapter_image=images, latents=latents.clone(), **call, **gen()).images
    return out, ref


@pytest.mark.parametrize("fmt", ["safetensors", pytest.param("bin", marks=pytest.mark.slow)])
@pytest.mark.parametrize("variant", IMAGE_VARIANTS)
@pytest.mark.parametrize("family", FAMILY_CASES)
def test_image_variants(models, images, family, variant, fmt):
    out, ref = run_both(models, family, [variant], images[0], fmt=fmt)
    assert_parity(out, ref)


@pytest.mark.parametrize(("variant", "shortcut"), [("faceid", False), ("faceid_plus", False), ("faceid_plus", True)])
@pytest.mark.parametrize("family", FAMILY_CASES)
def test_faceid_variants(models, images, family, variant, shortcut):
    """FaceID (LoRA + id embeds), FaceID-Plus (also CLIP states) and PlusV2 (shortcut flag)."""
    plus = variant == "faceid_plus"
    ref_pipe = diffusers_pipe(
        models, family, [f"{variant}.bin"], image_encoder_folder="image_encoder" if plus else None
    )
    ref_pipe.set_ip_adapter_scale(0.8)
    if plus:  # diffusers' documented FaceID-Plus recipe: CLIP states and the shortcut set by hand
        layer = ref_pipe.unet.encoder_hid_proj.image_projection_layers[0]
        layer.clip_embeds = ref_pipe.prepare_ip_adapter_image_embeds([images[0]], None, "cpu", 1, True)[0]
        layer.shortcut = shortcut
    ids = face_embeds()
    ref = ref_pipe("a face", ip_adapter_image_embeds=[ids], latents=fixed_latents(), **CALL).images
    src = ipa_rt.AdapterSource(models.adapter(family, variant, "bin"), shortcut=shortcut)
    ours = ipa_pipe(models, family, src)
    ours.set_ip_adapter_scale(0.8)
    extra = {"ip_adapter_image": [images[0]]} if plus else {}
    out = ours("a face", ip_adapter_image_embeds=[ids], latents=fixed_latents(), **CALL, **extra).images
    assert_parity(out, ref)


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_cfg_off(models, images, family):
    out, ref = run_both(models, family, ["plus"], images[0], call={"guidance_scale": 1.0})
    assert_parity(out, ref)


@pytest.mark.parametrize(
    "scheduler", ["ddim", "lcm", "euler_a", *(pytest.param(s, marks=pytest.mark.slow) for s in ("euler", "dpm++2m"))]
)
@pytest.mark.parametrize("family", FAMILY_CASES)
def test_schedulers(models, images, family, scheduler):
    call = {"seed": 11}  # ancestral / LCM steps draw noise
    if scheduler == "lcm":
        call["guidance_scale"] = 1.0
    out, ref = run_both(models, family, ["base"], images[0], scheduler=scheduler, call=call)
    assert_parity(out, ref)


def test_lcm_distilled_unet(models, images):
    """A UNet with time_cond_proj_dim: guidance as an embedding, no CFG batch (LCM-distilled SD1.5)."""
    base = models.root / "sd15-lcm"
    ref_pipe = diffusers_pipe(models, "sd15", ["base.safetensors"], base=base)
    ours = ipa_pipe(models, "sd15", models.adapter("sd15", "base"), base=base)
    call = {**CALL, "guidance_scale": 8.0, "generator": torch.Generator().manual_seed(1)}
    ref = ref_pipe("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **call).images
    call["generator"] = torch.Generator().manual_seed(1)
    out = ours("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **call).images
    assert_parity(out, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_adapters_multi_image(models, images, family):
    """Two adapters with their own scales; the second gets two images (tokens in one softmax)."""
    out, ref = run_both(models, family, ["base", "plus"], [images[0], [images[1], images[2]]], scale=[0.5, 0.8])
    assert_parity(out, ref)


PER_BLOCK = {
    "sd15": [{"up": {"block_1": [0.0, 1.0, 0.0]}}, {"down": 0.5, "mid": 0.3, "up": {"block_2": [1.5]}}],
    # InstantStyle's SDXL style-only and style+layout dicts
    "sdxl": [
        {"up": {"block_0": [0.0, 1.0, 0.0]}},
        {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
    ],
}


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_per_block_dict(models, images, family):
    style, layout = PER_BLOCK[family]
    out, ref = run_both(models, family, ["base"], images[0], scale=style)
    assert_parity(out, ref)
    out, ref = run_both(models, family, ["base", "plus"], [images[0], images[1]], scale=[style, layout])
    assert_parity(out, ref)


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_scale_zero_is_exactly_no_adapter(models, images, family):
    ref = diffusers_pipe(models, family)("a cat", latents=fixed_latents(), **CALL).images
    ours = ipa_pipe(models, family, [models.adapter(family, "base"), models.adapter(family, "plus")])
    ours.set_ip_adapter_scale(0.0)
    out = ours("a cat", ip_adapter_image=[images[0], images[1]], latents=fixed_latents(), **CALL).images
    assert torch.isfinite(out).all()
    assert torch.equal(out, ref), f"max abs diff {(out - ref).abs().max():.3e}"


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_large_scale(models, images, family):
    out, ref = run_both(models, family, ["plus"], images[0], scale=42.0)
    assert_parity(out, ref)
    no_adapter = diffusers_pipe(models, family)("a cat", latents=fixed_latents(), **CALL).images
    assert (out - no_adapter).abs().max() > 1e-2  # the adapter really acts


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_precomputed_embeds(models, images, family):
    ref_pipe = diffusers_pipe(models, family, ["base.safetensors", "full.safetensors"])
    embeds = ref_pipe.prepare_ip_adapter_image_embeds([images[0], images[1]], None, "cpu", 1, True)
    ref = ref_pipe("a cat", ip_adapter_image_embeds=embeds, latents=fixed_latents(), **CALL).images
    ours = ipa_pipe(models, family, [models.adapter(family, "base"), models.adapter(family, "full")])
    out = ours("a cat", ip_adapter_image_embeds=[e.clone() for e in embeds], latents=fixed_latents(), **CALL).images
    assert_parity(out, ref)


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_batch_and_images_per_prompt(models, images, family):
    call = {"num_images_per_prompt": 2, "negative_prompt": "blurry", "latents": fixed_latents(2)}
    out, ref = run_both(models, family, ["base"], images[0], call=call)
    assert_parity(out, ref)
    ours_prompts = ["a cat", "a dog"]  # a list of prompts, each with its own negative
    ref_pipe = diffusers_pipe(models, family, ["base.safetensors"])
    ours = ipa_pipe(models, family, models.adapter(family, "base"))
    lat = fixed_latents(2)
    r = ref_pipe(ours_prompts, ip_adapter_image=images[0], latents=lat.clone(), negative_prompt=["x", "y"], **CALL)
    o = ours(ours_prompts, ip_adapter_image=images[0], latents=lat.clone(), negative_prompt=["x", "y"], **CALL)
    assert_parity(o.images, r.images)


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_decoded_images_match(models, images, family):
    out, ref = run_both(models, family, ["base"], images[0], call={"output_type": "np"})
    assert out.shape == (1, 32, 32, 3)
    assert abs(out - ref).max() <= 1e-4


def test_hub_style_folder_subfolder_weight_name(models, images):
    """The (folder, subfolder, weight_name) form diffusers takes, with image_encoder/ found beside it."""
    ours = ipa_rt.Pipeline.from_pretrained(
        models.base("sd15"), ip_adapter=str(models.root), subfolder="sd15-adapters", weight_name="plus.bin"
    )
    ours.set_progress_bar_config(disable=True)
    ref = diffusers_pipe(models, "sd15", ["plus.bin"])
    a = ours("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **CALL).images
    b = ref("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **CALL).images
    assert_parity(a, b)


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_from_diffusers_and_restore(models, images, family):
    ref_pipe = diffusers_pipe(models, family, ["base.safetensors", "plus.safetensors"])
    ref_pipe.set_ip_adapter_scale([0.6, 0.9])
    imgs = [images[0], images[1]]
    ref = ref_pipe("a cat", ip_adapter_image=imgs, latents=fixed_latents(), **CALL).images
    ours = ipa_rt.from_diffusers(ref_pipe)
    ours.set_progress_bar_config(disable=True)
    out = ours("a cat", ip_adapter_image=imgs, latents=fixed_latents(), **CALL).images
    assert_parity(out, ref)
    ours.unload_ip_adapter()  # diffusers' own processors come back and work as before
    again = ref_pipe("a cat", ip_adapter_image=imgs, latents=fixed_latents(), **CALL).images
    assert torch.equal(again, ref)


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_seeded_generator_without_latents(models, images, family):
    """No latents given: the same generator draws the same initial noise as diffusers."""
    call = {k: v for k, v in CALL.items()}
    ref = diffusers_pipe(models, family, ["base.safetensors"])
    ours = ipa_pipe(models, family, models.adapter(family, "base"))
    a = ref("a cat", ip_adapter_image=images[0], generator=torch.Generator().manual_seed(4), **call).images
    b = ours("a cat", ip_adapter_image=images[0], generator=torch.Generator().manual_seed(4), **call).images
    assert_parity(b, a)


def test_faceid_without_lora_and_state_dict_source(models):
    """A FaceID checkpoint without LoRA keys (as diffusers' own test builders make) passed as a dict."""
    from ipa_rt import testing as T

    state = T.adapter_state_dict("faceid", models.base("sd15"))
    state["ip_adapter"] = {k: v for k, v in state["ip_adapter"].items() if "lora" not in k}
    ref_pipe = diffusers_pipe(models, "sd15")
    ref_pipe.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None)
    ref = ref_pipe("a face", ip_adapter_image_embeds=[face_embeds()], latents=fixed_latents(), **CALL).images
    ours = ipa_pipe(models, "sd15", state)
    out = ours("a face", ip_adapter_image_embeds=[face_embeds()], latents=fixed_latents(), **CALL).images
    assert_parity(out, ref)
