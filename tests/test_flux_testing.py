"""ipa_rt.testing.flux: the tiny Flux.1 / Chroma folders and Flux IP-Adapter files load and run through diffusers'
own loaders and pipelines, in each on-disk layout, with the weights that were written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from ipa_rt import testing
from ipa_rt.testing.flux import flux_adapter_state_dict, save_flux_adapter

ARGS = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=32, output_type="latent")
SEEDS = {"xlabs": 2, "bin": 7, "flat": 8, "chroma": 9, "v2": 11}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux_testing")
    out = {
        "flux": testing.write_flux_model(root / "flux"),
        "chroma": testing.write_flux_model(root / "chroma", family="chroma"),
        "v2_base": testing.write_flux_model(root / "v2", joint_attention_dim=4096),
        "encoder": testing.write_image_encoder(root / "encoder", **testing.FLUX_ENCODER),
    }
    flux = out["flux"]
    out["xlabs"] = testing.write_flux_adapter(root / "a" / "ip_adapter.safetensors", flux, seed=SEEDS["xlabs"])
    out["bin"] = testing.write_flux_adapter(root / "b" / "ip_adapter.bin", flux, "diffusers", seed=SEEDS["bin"])
    out["flat"] = testing.write_flux_adapter(root / "f" / "ip.safetensors", flux, "diffusers", seed=SEEDS["flat"])
    out["chroma_adapter"] = testing.write_flux_adapter(
        root / "c" / "ip.safetensors", out["chroma"], seed=SEEDS["chroma"]
    )
    out["v2"] = testing.write_flux_adapter(root / "v" / "ip.safetensors", out["v2_base"], tokens=16, seed=SEEDS["v2"])
    return out


def _pipe(cls_name: str, folder, files, adapter=None):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(str(folder), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        pipe.load_ip_adapter(
            str(adapter.parent),
            weight_name=adapter.name,
            image_encoder_pretrained_model_name_or_path=str(files["encoder"]),
            image_encoder_dtype=torch.float32,
        )
    return pipe


def _run(pipe, **kw) -> torch.Tensor:
    out = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **ARGS, **kw).images
    assert torch.isfinite(out).all()
    return out


def _assert_loaded(pipe, expected: dict[str, dict[str, torch.Tensor]]) -> None:
    """The transformer holds the written weights: image projection and every double-stream block's K/V."""
    proj = pipe.transformer.encoder_hid_proj.image_projection_layers[0]
    assert torch.equal(proj.image_embeds.weight, expected["image_proj"]["proj.weight"])
    assert torch.equal(proj.norm.bias, expected["image_proj"]["norm.bias"])
    procs = {k: v for k, v in pipe.transformer.attn_processors.items() if k.startswith("transformer_blocks.")}
    assert len(procs) == pipe.transformer.config.num_layers
    for i in range(pipe.transformer.config.num_layers):
        proc = procs[f"transformer_blocks.{i}.attn.processor"]
        for name in ("to_k_ip", "to_v_ip"):
            assert torch.equal(getattr(proc, name)[0].weight, expected["ip_adapter"][f"{i}.{name}.weight"])
            assert torch.equal(getattr(proc, name)[0].bias, expected["ip_adapter"][f"{i}.{name}.bias"])


def test_flux_folder_is_a_flux_pipeline(files):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel, T5TokenizerFast

    folder = files["flux"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]  # FLUX.1-dev's entry
    assert {p.name for p in (folder / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt", "tokenizer_config.json"}
    pipe = _pipe("FluxPipeline", folder, files)
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    sched = pipe.scheduler.config
    assert (sched.shift, sched.use_dynamic_shifting, sched.base_shift, sched.max_shift) == (3.0, True, 0.5, 1.15)
    assert (sched.base_image_seq_len, sched.max_image_seq_len) == (256, 4096)
    cfg = pipe.transformer.config
    assert cfg.in_channels == 4 * pipe.vae.config.latent_channels and cfg.guidance_embeds
    assert cfg.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert cfg.joint_attention_dim == pipe.text_encoder_2.config.d_model == 32
    assert pipe.vae.config.shift_factor == 0.1159 and not pipe.vae.config.use_quant_conv
    assert _run(pipe).shape == (1, 8 * 8, cfg.in_channels)  # 32 px / VAE factor 2 / 2x2 packing

    tok = T5TokenizerFast.from_pretrained(folder / "tokenizer_2")
    ids = tok("a photo of a cat", padding="max_length", max_length=32, truncation=True).input_ids
    words = tok.convert_ids_to_tokens(ids[:6])
    assert words == ["▁a", "▁photo", "▁of", "▁a", "▁cat", "</s>"] and ids[6:] == [tok.pad_token_id] * 26
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    long = tok("a cat " * 40, padding="max_length", max_length=32, truncation=True).input_ids
    assert len(long) == 32 and long[-1] == tok.eos_token_id
    assert tok.decode(tok("Red house, 42!").input_ids, skip_special_tokens=True) == "Red house, 42!"
    assert max(tok("Zebra #7").input_ids) < pipe.text_encoder_2.config.vocab_size


@pytest.mark.parametrize("kind", ["xlabs", "bin", "flat"])
def test_flux_adapter_layouts_load_and_run(files, kind):
    expected = flux_adapter_state_dict(files["flux"], seed=SEEDS[kind])
    path = files[kind]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # atomic write: no temp file left behind
    if kind == "xlabs":  # XLabs-AI/flux-ip-adapter's key names
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            v1 = f.get_tensor("double_blocks.1.processor.ip_adapter_double_stream_v_proj.weight")
        assert torch.equal(v1, expected["ip_adapter"]["1.to_v_ip.weight"])
        assert keys == {
            f"ip_adapter_proj_model.{k}" for k in ("proj.weight", "proj.bias", "norm.weight", "norm.bias")
        } | {
            f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.{p}"
            for i in range(2)
            for kv in "kv"
            for p in ("weight", "bias")
        }
    elif kind == "bin":
        nested = torch.load(path, weights_only=True)
        assert list(nested) == ["image_proj", "ip_adapter"]
    pipe = _pipe("FluxPipeline", files["flux"], files)
    plain = _run(pipe)
    pipe = _pipe("FluxPipeline", files["flux"], files, path)
    _assert_loaded(pipe, expected)
    assert pipe.transformer.encoder_hid_proj.image_projection_layers[0].num_image_text_embeds == 4
    with_image = _run(pipe, ip_adapter_image=testing.make_image())
    assert (with_image - plain).abs().max() > 1e-3  # the adapter changes the result


def test_chroma_folder_runs_with_an_adapter(files):
    from diffusers import ChromaTransformer2DModel
    from transformers import T5EncoderModel

    index = json.loads((files["chroma"] / "model_index.json").read_text())
    assert index["_class_name"] == "ChromaPipeline" and "text_encoder_2" not in index
    pipe = _pipe("ChromaPipeline", files["chroma"], files, files["chroma_adapter"])
    assert isinstance(pipe.transformer, ChromaTransformer2DModel) and isinstance(pipe.text_encoder, T5EncoderModel)
    _assert_loaded(pipe, flux_adapter_state_dict(files["chroma"], seed=SEEDS["chroma"]))
    a = _run(pipe, ip_adapter_image=testing.make_image(0))
    b = _run(pipe, ip_adapter_image=testing.make_image(1))
    assert (a - b).abs().max() > 1e-4  # the reference image reaches the latents


def test_sixteen_tokens_with_t5_width(files):
    state = flux_adapter_state_dict(files["v2_base"], tokens=16, seed=SEEDS["v2"])
    assert state["image_proj"]["proj.weight"].shape == (65536, 24)
    pipe = _pipe("FluxPipeline", files["v2_base"], files, files["v2"])
    proj = pipe.transformer.encoder_hid_proj.image_projection_layers[0]
    assert proj.num_image_text_embeds == 16
    assert pipe.transformer.attn_processors["transformer_blocks.0.attn.processor"].to_k_ip[0].in_features == 4096
    _assert_loaded(pipe, state)
    _run(pipe, ip_adapter_image=testing.make_image())


def test_state_dict_shapes_and_scale(files):
    state = flux_adapter_state_dict(files["flux"], encoder_dim=20, seed=3)
    assert state["image_proj"]["proj.weight"].shape == (4 * 32, 20)
    assert state["image_proj"]["norm.weight"].shape == (32,)
    assert len(state["ip_adapter"]) == 4 * 2  # k/v weight/bias per double-stream block
    assert state["ip_adapter"]["1.to_k_ip.weight"].shape == (2 * 16, 32)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    assert 0.3 < (x @ state["ip_adapter"]["0.to_k_ip.weight"].T).std() < 3  # activations stay O(1)
    again = flux_adapter_state_dict(files["flux"], encoder_dim=20, seed=3)
    assert torch.equal(again["ip_adapter"]["1.to_v_ip.bias"], state["ip_adapter"]["1.to_v_ip.bias"])


def test_bad_arguments_raise(files, tmp_path):
    with pytest.raises(ValueError, match="tokens=16"):
        flux_adapter_state_dict(files["flux"], tokens=16)
    with pytest.raises(ValueError, match="tokens=3"):
        flux_adapter_state_dict(files["flux"], tokens=3)
    state = flux_adapter_state_dict(files["flux"])
    with pytest.raises(ValueError, match=r"xlabs.*\.safetensors"):
        save_flux_adapter(state, tmp_path / "a.bin", layout="xlabs")
    with pytest.raises(ValueError, match="layout"):
        save_flux_adapter(state, tmp_path / "a.safetensors", layout="kohya")
    with pytest.raises(ValueError, match=r"\.pt"):
        save_flux_adapter(state, tmp_path / "a.pt", layout="diffusers")
    with pytest.raises(ValueError, match="family"):
        testing.write_flux_model(tmp_path / "m", family="sd3")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
