"""ipa_rt.testing.kolors: the tiny Kolors folder and Kolors IP-Adapter-Plus files load and run through diffusers' own
``KolorsPipeline`` and ``load_ip_adapter``, in both file formats, with the weights that were written."""

from __future__ import annotations

import json

import pytest
import torch

from ipa_rt import testing
from ipa_rt.testing.kolors import KOLORS_ENCODER, kolors_adapter_state_dict

ARGS = dict(height=64, width=64, num_inference_steps=2, guidance_scale=5.0, output_type="latent")
SEEDS = {"bin": 2, "safetensors": 3}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("kolors_testing")
    model = testing.write_kolors_model(root / "Kolors-diffusers")
    adapters = root / "Kolors-IP-Adapter-Plus"  # the hub repo's layout: the adapter beside image_encoder/
    out = {"model": model, "encoder": testing.write_image_encoder(adapters / "image_encoder", **KOLORS_ENCODER)}
    for fmt, seed in SEEDS.items():
        out[fmt] = testing.write_kolors_adapter(adapters / f"ip_adapter_plus_general.{fmt}", model, seed=seed)
    return out


def _pipe(folder):
    from diffusers import KolorsPipeline

    pipe = KolorsPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kw) -> torch.Tensor:
    out = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **ARGS, **kw).images
    assert torch.isfinite(out).all()
    return out


@pytest.fixture(scope="module")
def plain(files) -> torch.Tensor:
    """The same call on a fresh pipeline without an adapter."""
    return _run(_pipe(files["model"]))


def test_folder_is_a_kolors_pipeline(files):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer

    folder = files["model"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "KolorsPipeline"
    assert index["text_encoder"] == ["kolors", "ChatGLMModel"]
    assert index["tokenizer"] == ["kolors", "ChatGLMTokenizer"]
    assert index["force_zeros_for_empty_prompt"] is False
    assert index["image_encoder"] == [None, None]
    assert sorted(p.name for p in (folder / "tokenizer").iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    pipe = _pipe(folder)
    assert isinstance(pipe.text_encoder, ChatGLMModel) and isinstance(pipe.tokenizer, ChatGLMTokenizer)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.scheduler.config.num_train_timesteps == 1100 and pipe.scheduler.config.beta_end == 0.014
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1
    width = pipe.text_encoder.config.hidden_size
    unet = pipe.unet.config
    assert unet.encoder_hid_dim_type == "text_proj" and unet.encoder_hid_dim == width
    assert pipe.unet.encoder_hid_proj.in_features == width
    assert pipe.unet.encoder_hid_proj.out_features == unet.cross_attention_dim
    assert unet.projection_class_embeddings_input_dim == width + 6 * unet.addition_time_embed_dim
    assert pipe.text_encoder.config.padded_vocab_size >= pipe.tokenizer.vocab_size
    assert pipe.vae.config.force_upcast


def test_tokenizer_and_prompt_encoding(files):
    pipe = _pipe(files["model"])
    tok = pipe.tokenizer
    enc = tok("a photo of a cat", padding="max_length", max_length=256, truncation=True, return_tensors="pt")
    ids, mask, pos = enc["input_ids"][0], enc["attention_mask"][0], enc["position_ids"][0]
    assert ids.shape == mask.shape == pos.shape == (256,)
    words = tok.convert_ids_to_tokens(ids[mask.bool()].tolist())
    assert words == ["[gMASK]", "sop", "▁a", "▁photo", "▁of", "▁a", "▁cat"]  # whole words: a trained vocabulary
    assert mask[: 256 - len(words)].sum() == 0 and (ids[: 256 - len(words)] == tok.pad_token_id).all()  # left pad
    assert pos[-len(words) :].tolist() == list(range(len(words)))
    assert tok.decode(tok("A red car, 42!")["input_ids"][2:]) == "A red car, 42!"
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a photo of a cat", device="cpu")
    width = pipe.text_encoder.config.hidden_size
    assert embeds.shape == negative.shape == (1, 256, width)
    assert pooled.shape == negative_pooled.shape == (1, width)
    for t in (embeds, negative, pooled):
        assert torch.isfinite(t).all() and t.abs().mean() > 0.1
    assert not torch.equal(embeds, negative)  # force_zeros_for_empty_prompt is off: "" is encoded


@pytest.mark.parametrize("fmt", list(SEEDS))
def test_ip_adapter_loads_and_steers(files, plain, fmt):
    """``.bin``: the image encoder comes from ``<adapter folder>/image_encoder`` (diffusers' default
    ``image_encoder_folder``); ``.safetensors``: registered first, then ``image_encoder_folder=None`` (as diffusers'
    Kolors docs do)."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from transformers import CLIPVisionModelWithProjection

    adapter = files[fmt]
    pipe = _pipe(files["model"])
    text_proj = pipe.unet.encoder_hid_proj
    if fmt == "bin":
        pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name)
    else:
        pipe.register_modules(image_encoder=CLIPVisionModelWithProjection.from_pretrained(files["encoder"]))
        pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name, image_encoder_folder=None)
    assert pipe.image_encoder.config.image_size == KOLORS_ENCODER["image_size"]
    assert pipe.feature_extractor.crop_size == {"height": 48, "width": 48}
    assert pipe.unet.text_encoder_hid_proj is text_proj  # Kolors' text projection, kept aside by diffusers
    assert pipe.unet.config.encoder_hid_dim_type == "ip_image_proj"
    proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    assert isinstance(proj, IPAdapterPlusImageProjection)
    expected = kolors_adapter_state_dict(files["model"], seed=SEEDS[fmt])
    assert torch.equal(proj.proj_in.weight, expected["image_proj"]["proj_in.weight"])
    assert torch.equal(proj.latents, expected["image_proj"]["latents"])
    procs = [p for n, p in pipe.unet.attn_processors.items() if "attn2" in n]
    assert len(procs) == len(expected["ip_adapter"]) // 2
    assert torch.equal(procs[0].to_k_ip[0].weight, expected["ip_adapter"]["1.to_k_ip.weight"])
    steered = _run(pipe, ip_adapter_image=testing.make_image())
    assert steered.shape == plain.shape == (1, 4, 32, 32)
    assert (steered - plain).abs().mean() > 1e-3
    pipe.unload_ip_adapter()  # diffusers puts the text projection back: the plain call again
    assert pipe.unet.encoder_hid_proj is text_proj and pipe.unet.config.encoder_hid_dim_type == "text_proj"
    assert torch.allclose(_run(pipe), plain)
