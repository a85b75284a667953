"""LoRA fused at load equals diffusers' load_lora_weights + fuse_lora; vae= swaps in AutoencoderTiny (TAESD)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pytest
import torch
from conftest import CALL, FAMILY_CASES, assert_parity, diffusers_pipe, fixed_latents, ipa_pipe

import ipa_rt
from ipa_rt import testing as T

pytest.importorskip("peft")


@pytest.mark.slow
@pytest.mark.parametrize(("family", "fmt"), [("sd15", "diffusers"), ("sd15", "kohya"), ("sdxl", "diffusers")])
def test_fused_lora_matches_diffusers(models, images, tmp_path, family, fmt):
    lora = T.write_lora(tmp_path / f"style-{fmt}.safetensors", models.base(family), fmt=fmt)
    ref = diffusers_pipe(models, family)
    ref.load_lora_weights(str(tmp_path), weight_name=lora.name, adapter_name="style")
    ref.set_adapters(["style"], adapter_weights=[0.8])
    ref.fuse_lora(adapter_names=["style"])
    ref.load_ip_adapter(str(models.adapter_dir(family)), subfolder="", weight_name="base.safetensors")
    a = ref("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **CALL).images
    ours = ipa_pipe(models, family, models.adapter(family, "base"), lora=[(lora, 0.8)])
    b = ours("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **CALL).images
    assert_parity(b, a)
    plain = ipa_pipe(models, family, models.adapter(family, "base"))(
        "a cat", ip_adapter_image=images[0], latents=fixed_latents(), **CALL
    ).images
    assert not torch.allclose(plain, b, atol=1e-3)  # the LoRA really acts
    assert not any("lora" in n for n, _ in ours.unet.named_modules())  # fused, no LoRA modules left


def test_missing_or_broken_lora_file(models, tmp_path):
    with pytest.raises(ipa_rt.CheckpointError, match=r"LoRA file '.*nope\.safetensors' does not exist"):
        ipa_pipe(models, "sd15", lora=tmp_path / "nope.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    with pytest.raises(ipa_rt.CheckpointError, match=r"broken\.safetensors' cannot be loaded"):
        ipa_pipe(models, "sd15", lora=broken)


@contextlib.contextmanager
def recorded(name: str) -> Iterator[list[str]]:
    """The messages logged at warning level or above on logger ``name`` (and its children) within the block, whatever
    level the suite set it to (conftest runs diffusers at errors only; a user's console does not)."""
    messages: list[str] = []
    listener, logger = logging.Handler(logging.WARNING), logging.getLogger(name)
    listener.emit = lambda record: messages.append(record.getMessage())
    level = logger.level
    logger.addHandler(listener)
    logger.setLevel(logging.WARNING)
    try:
        yield messages
    finally:
        logger.removeHandler(listener)
        logger.setLevel(level)


def test_dropping_drops_that_note_only():
    """``console.dropping`` (what load_vae uses for diffusers' config note) drops the records with its text, on its
    logger, inside the block; other records pass, and after the block that note shows again."""
    from ipa_rt.console import dropping

    logger = logging.getLogger("ipa_rt.tests.dropping")
    with recorded(logger.name) as messages:
        with dropping(logger.name, "known note"):
            logger.warning("a known note")
            logger.warning("something else")
        logger.warning("a known note")
    assert messages == ["something else", "a known note"]


def test_vae_given_as_a_folder_or_by_name(models, images, tmp_path):
    """``vae=`` a TAESD folder loads it (the same result as the module), without diffusers' notes the user cannot
    act on (config keys its own save_pretrained writes; a cast to the dtype it already has); anything but an
    autoencoder is refused."""
    from diffusers import AutoencoderTiny

    folder = T.write_taesd(tmp_path / "taesd")
    module = AutoencoderTiny.from_pretrained(folder)
    call = {**CALL, "output_type": "pt"}
    with recorded("diffusers") as messages:
        by_path = ipa_pipe(models, "sd15", models.adapter("sd15", "base"), vae=str(folder))
    assert not messages, messages
    by_module = ipa_pipe(models, "sd15", models.adapter("sd15", "base"), vae=module)
    assert type(by_path.vae).__name__ == "AutoencoderTiny" and "decoder AutoencoderTiny" in by_path.runtime_summary()
    a = by_path("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **call).images
    b = by_module("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **call).images
    assert torch.equal(a, b)
    with pytest.raises(ipa_rt.ConfigError, match=r"vae '.*unet' is a 'UNet2DConditionModel'; expected one of"):
        ipa_pipe(models, "sd15", vae=str(models.base("sd15") / "unet"))
    with pytest.raises(ipa_rt.CheckpointError, match=r"vae folder '.*' has no config.json"):
        ipa_pipe(models, "sd15", vae=str(tmp_path))


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_tiny_autoencoder(models, images, family):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    taesd = AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    )
    ref = diffusers_pipe(models, family, ["base.safetensors"], vae=taesd)
    call = {**CALL, "output_type": "np"}
    a = ref("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **call).images
    ours = ipa_pipe(models, family, models.adapter(family, "base"), vae=taesd)
    b = ours("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **call).images
    assert a.shape == b.shape == (1, 32, 32, 3)
    assert abs(a - b).max() <= 1e-4
    with pytest.raises(ipa_rt.ConfigError, match=r"vae has 8 latent channels; the base model's latents have 4"):
        ipa_pipe(
            models,
            family,
            vae=AutoencoderTiny(
                latent_channels=8,
                encoder_block_out_channels=(8, 8),
                decoder_block_out_channels=(8, 8),
                num_encoder_blocks=(1, 1),
                num_decoder_blocks=(1, 1),
            ),
        )


@pytest.mark.slow
def test_sdxl_force_upcast_vae_decodes_in_fp32_as_diffusers(models, images):
    """diffusers' SDXL pipelines decode an fp16 VAE whose config has ``force_upcast`` in fp32 (real SDXL VAE
    weights overflow fp16: NaN, black images). The fixture VAE is made to overflow in fp16; through
    ``from_diffusers`` (shared fp16 modules) and ``from_pretrained(dtype=fp16)`` ipa_rt decodes it as diffusers does."""
    from diffusers import StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(models.base("sdxl"), torch_dtype=torch.float16)
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref.vae.decoder.conv_in.weight.mul_(30000)  # activations past fp16's 65504, fine in fp32
        z = fixed_latents().half() / ref.vae.config.scaling_factor
        assert not torch.isfinite(ref.vae.decode(z).sample).all()  # what an fp16 decode gives
    assert ref.vae.config.force_upcast
    call = {**CALL, "output_type": "pt", "num_inference_steps": 2}
    want = ref("a cat", latents=fixed_latents().half(), **call).images  # diffusers upcasts inside its call
    ref.load_ip_adapter(str(models.adapter_dir("sdxl")), subfolder="", weight_name="base.safetensors")
    ref.set_ip_adapter_scale(0.0)
    ours = ipa_rt.from_diffusers(ref)
    assert next(ref.vae.parameters()).dtype == torch.float32  # upcast once, as diffusers does per call
    got = ours("a cat", latents=fixed_latents().half(), **call).images
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    assert (got.float() - want.float()).abs().max() <= 2e-2  # fp16 UNet on both sides: a few fp16 ulps of [0, 1]
    fp16 = ipa_pipe(models, "sdxl", models.adapter("sdxl", "base"), dtype=torch.float16)
    assert next(fp16.vae.parameters()).dtype == torch.float32
    sd15 = ipa_pipe(models, "sd15", models.adapter("sd15", "base"), dtype=torch.float16)
    assert next(sd15.vae.parameters()).dtype == torch.float16  # diffusers' SD1.5 pipelines never upcast
