"""Single-file checkpoints (original LDM layout) and single-file image encoders, written from the tiny models with
the inverse of diffusers' conversion, loaded offline: the same latents as the diffusers folder (bitwise, torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CALL, fixed_latents

import ipa_rt
from ipa_rt import testing as T
from ipa_rt.errors import CheckpointError, IncompatibleAdapterError
from ipa_rt.testing.ldm import write_single_file

# tiny models whose head counts follow the real families' rules (SD1.5's UNet: 8 heads; SDXL's UNet and the CLIP
# text encoders: 64-wide heads), so that configs built from the shapes alone are theirs
RULED = {
    "sd15": dict(
        unet=dict(
            block_out_channels=(64, 64, 128, 128), attention_head_dim=8, norm_num_groups=32, cross_attention_dim=64
        ),
        vae=dict(block_out_channels=[32, 64], norm_num_groups=32),
        text=dict(hidden_size=64, num_attention_heads=1, projection_dim=64),
    ),
    "sdxl": dict(
        unet=dict(
            block_out_channels=(64, 128, 128),
            attention_head_dim=(1, 2, 2),
            norm_num_groups=32,
            cross_attention_dim=192,
            projection_class_embeddings_input_dim=6 * 8 + 64,
        ),
        vae=dict(block_out_channels=[32, 64], norm_num_groups=32),
        text=dict(hidden_size=64, num_attention_heads=1, projection_dim=64),
        text_2=dict(hidden_size=128, num_attention_heads=2, projection_dim=64, hidden_act="gelu"),
    ),
}


def latents(pipe, image) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a cat", ip_adapter_image=image, latents=fixed_latents(), **CALL).images


def both(base, file, adapter, image, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    ref = latents(ipa_rt.Pipeline.from_pretrained(base, ip_adapter=adapter), image)
    ours = latents(ipa_rt.Pipeline.from_single_file(file, ip_adapter=adapter, **kw), image)
    return ours, ref


def test_sd15_file_with_ema_gives_the_folders_latents(models, images, tmp_path):
    """The EMA copy is ignored (non-EMA weights, as diffusers, A1111 and ComfyUI); from_pretrained routes a file."""
    base = models.base("sd15")
    file = write_single_file(base, tmp_path / "sd15.safetensors", ema=True)
    ours, ref = both(base, file, models.adapter("sd15", "base"), images[0], config=base)
    assert torch.equal(ours, ref)
    routed = ipa_rt.Pipeline.from_pretrained(file, ip_adapter=models.adapter("sd15", "base"), config=base)
    assert torch.equal(latents(routed, images[0]), ref)


def test_generate_from_a_single_file_offline(models, images, tmp_path):
    """``ipa_rt generate FILE --tokenizer DIR`` as a user types it, no hub: the PNG is the folder's, byte for byte."""
    from ipa_rt.cli import main

    base = models.base("sd15")
    file = write_single_file(base, tmp_path / "sd15.safetensors")
    images[0].save(tmp_path / "ref.png")
    argv = ["--ip-adapter", str(models.adapter("sd15", "base")), "--ip-image", str(tmp_path / "ref.png"), "--seed", "3"]
    argv += ["--prompt", "a cat", "--steps", "2", "--height", "32", "--width", "32", "--backend", "torch"]
    assert main(["generate", str(base), *argv, "-o", str(tmp_path / "folder.png")]) == 0
    assert main(["generate", str(file), *argv, "--config", str(base), "-o", str(tmp_path / "file.png")]) == 0
    assert (tmp_path / "file.png").read_bytes() == (tmp_path / "folder.png").read_bytes()


def test_a_serve_config_names_a_single_file(models, images, tmp_path):
    """A served model's ``base`` may be a single file, loaded offline with the config's ``config`` / ``tokenizer``:
    the replica's pipeline (loaded as a replica loads it, without Ray's HTTP side) gives the folder's latents."""
    pytest.importorskip("ray.serve", reason="ipa_rt serve needs Ray Serve (pip install 'ipa_rt[serve]')")
    from ipa_rt.serving.app import load_pipeline
    from ipa_rt.serving.config import ServeConfig

    base = models.base("sd15")
    file = write_single_file(base, tmp_path / "sd15.safetensors")
    adapter = str(models.adapter("sd15", "base"))
    spec = {"base": str(file), "ip_adapter": [adapter], "config": str(base), "tokenizer": str(base / "tokenizer")}
    config = ServeConfig.from_dict({"models": {"file": spec}})
    served = load_pipeline(config.models["file"])
    ref = latents(ipa_rt.Pipeline.from_pretrained(base, ip_adapter=adapter), images[0])
    assert torch.equal(latents(served, images[0]), ref)


@pytest.mark.slow
def test_engines_from_a_single_file(models, images, tmp_path, monkeypatch):
    """ONNX Runtime engines built from a single file (its configs from ``config=``, named by the file's and the
    configs' content) give the folder's torch latents within 1e-3 (the engines' tolerance elsewhere), and the CLI
    build of the same file reuses them."""
    from ipa_rt.cli import main

    monkeypatch.setenv("IPA_RT_CACHE", str(tmp_path / "cache"))
    base, adapter = models.base("sd15"), models.adapter("sd15", "base")
    file = write_single_file(base, tmp_path / "sd15.safetensors")
    ref = latents(ipa_rt.Pipeline.from_pretrained(base, ip_adapter=adapter), images[0])
    options = {"height": 32, "width": 32}
    pipe = ipa_rt.Pipeline.from_pretrained(file, adapter, backend="onnxruntime", engine_options=options, config=base)
    ours = latents(pipe, images[0])
    assert torch.isfinite(ours).all()
    error = ((ours - ref).norm() / ref.norm()).item()
    assert error <= 1e-3, error
    print(f"engine from a single file vs the folder on torch: {error:.1e}")
    out = tmp_path / "engines"
    argv = ["build", str(file), "--ip-adapter", str(adapter), "--config", str(base), "--height", "32", "--width", "32"]
    assert main([*argv, "-o", str(out)]) == 0
    assert main([*argv, "-o", str(out)]) == 0  # the second build reuses: same file, same configs
    manifest = json.loads((out / "manifest.json").read_text())
    assert any(role.startswith("base/") and role.endswith("sd15.safetensors") for role in manifest["sources"])
    assert any(role.startswith("config/") for role in manifest["sources"])


def test_diffusers_from_single_file_agrees(models, tmp_path):
    """diffusers' own StableDiffusionPipeline.from_single_file on the same file loads the same weights."""
    from diffusers import StableDiffusionPipeline

    base = models.base("sd15")
    file = write_single_file(base, tmp_path / "sd15.safetensors")
    theirs = StableDiffusionPipeline.from_single_file(str(file), config=str(base), local_files_only=True)
    ours = ipa_rt.Pipeline.from_single_file(file, config=base)
    for name in ("unet", "vae"):
        a, b = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_fp16_ckpt_without_vae(models, images, tmp_path):
    """An fp16 .ckpt (weights_only) with no VAE: vae= is required, and the weights are the fp16 rounding."""
    base = models.base("sd15")
    file = write_single_file(base, tmp_path / "sd15.ckpt", dtype=torch.float16, vae=False)
    with pytest.raises(CheckpointError, match="has no VAE") as err:
        ipa_rt.Pipeline.from_single_file(file, config=base)
    assert str(file) in str(err.value)
    pipe = ipa_rt.Pipeline.from_single_file(
        file, ip_adapter=models.adapter("sd15", "base"), config=base, vae=base / "vae"
    )
    folder = ipa_rt.Pipeline.from_pretrained(base)
    for k, v in folder.unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[k], v.half().float()), k
    assert torch.isfinite(latents(pipe, images[0])).all()


def test_configs_from_the_shapes_alone(images, tmp_path):
    """No config=: the shipped SD1.5 configs completed from the file's shapes; the tokenizer from tokenizer=."""
    base = T.write_base_model(tmp_path / "ruled", family="sd15", configs=RULED["sd15"])
    adapter = T.write_adapter(tmp_path / "a" / "base.safetensors", "base", base)
    T.write_image_encoder(tmp_path / "a" / "image_encoder")
    file = write_single_file(base, tmp_path / "ruled.ckpt")
    ours, ref = both(base, file, adapter, images[0], tokenizer=base)
    assert torch.equal(ours, ref)


@pytest.mark.slow
@pytest.mark.parametrize("derived", [False, True])
def test_sdxl_file_gives_the_folders_latents(models, images, tmp_path, derived):
    if derived:
        base = T.write_base_model(tmp_path / "ruled", family="sdxl", configs=RULED["sdxl"])
        # the tiny folder's Euler spaces its timesteps as diffusers' default ("linspace"); SDXL's config: "leading"
        shipped = json.loads((Path(ipa_rt.__file__).parent / "configs" / "sdxl.json").read_text())["scheduler"]
        (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(shipped))
        for name in ("text_encoder", "text_encoder_2"):  # the real configs' token ids (eos 2: pooled at the argmax)
            config = json.loads((base / name / "config.json").read_text())
            (base / name / "config.json").write_text(json.dumps(config | {"bos_token_id": 0, "eos_token_id": 2}))
        adapter = T.write_adapter(tmp_path / "a" / "base.safetensors", "base", base)
        T.write_image_encoder(tmp_path / "a" / "image_encoder")
        kw = {"tokenizer": base}
    else:
        base, adapter, kw = models.base("sdxl"), models.adapter("sdxl", "base"), {"config": models.base("sdxl")}
    file = write_single_file(base, tmp_path / "sdxl.safetensors")
    ours, ref = both(base, file, adapter, images[0], **kw)
    err = ((ours - ref).norm() / ref.norm()).item()
    assert torch.equal(ours, ref) or err < 1e-6, err


def test_unet_only_file(images, tmp_path, monkeypatch):
    """A UNet alone (what ComfyUI's checkpoint saving writes for a MODEL: ``model.diffusion_model.*`` only) loads
    with no text encoder and no VAE (none faked: absent), the UNet bitwise the full file's; its engines are the UNet
    side only; a call for an image is a ConfigError naming what is missing."""
    from safetensors.torch import load_file, save_file

    from ipa_rt.errors import ConfigError

    monkeypatch.setenv("IPA_RT_CACHE", str(tmp_path / "cache"))
    base = T.write_base_model(tmp_path / "ruled", family="sd15", configs=RULED["sd15"])
    adapter = T.write_adapter(tmp_path / "a" / "base.safetensors", "base", base)
    encoder = T.write_image_encoder(tmp_path / "a" / "image_encoder")
    full = write_single_file(base, tmp_path / "full.safetensors")
    unet = tmp_path / "unet.safetensors"
    save_file({k: v for k, v in load_file(str(full)).items() if k.startswith("model.diffusion_model.")}, str(unet))
    pipe = ipa_rt.Pipeline.from_single_file(unet, ip_adapter=adapter, image_encoder=encoder)
    assert pipe.vae is None and pipe.text_encoders == [] and pipe.tokenizers == []
    assert pipe.vae_scale_factor == 8 and pipe.vae_config.scaling_factor == 0.18215  # SD1.5's latent space
    reference = ipa_rt.Pipeline.from_single_file(full, ip_adapter=adapter, tokenizer=base).unet.state_dict()
    ours = pipe.unet.state_dict()
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    with pytest.raises(ConfigError, match="is a UNet alone") as err:
        pipe("a cat", ip_adapter_image=images[0])
    assert str(unet) in str(err.value) and "text encoder" in str(err.value) and "VAE" in str(err.value)

    options = {"height": 64, "width": 64}
    engine = ipa_rt.Pipeline.from_single_file(unet, adapter, encoder, backend="onnxruntime", engine_options=options)
    assert engine.vae is None and engine.text_encoders == [] and engine.vae_scale_factor == 8
    assert sorted(engine.engine_manifest["networks"]) == ["image_encoder", "image_projection_0", "unet"]
    with pytest.raises(ConfigError, match="is a UNet alone"):
        engine("a cat", ip_adapter_image=images[0])


def test_unet_only_sdxl_file(tmp_path):
    """An SDXL UNet alone: SDXL from its ``label_emb``, the UNet bitwise the full file's, and the pooled text width
    (what ComfyUI's ``y`` carries first) read from the UNet's config, with no text encoder to ask. The size
    embeddings are 256 wide here as in SDXL (a UNet-only file's config keeps the shipped width: its shapes give
    only the sum of the pooled width and six size embeddings)."""
    from safetensors.torch import load_file, save_file

    from ipa_rt.models import pooled_text_width

    sizes = {"addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 6 * 256 + 64}
    configs = {**RULED["sdxl"], "unet": {**RULED["sdxl"]["unet"], **sizes}}
    base = T.write_base_model(tmp_path / "ruled", family="sdxl", configs=configs)
    full = write_single_file(base, tmp_path / "full.safetensors")
    unet = tmp_path / "unet.safetensors"
    save_file({k: v for k, v in load_file(str(full)).items() if k.startswith("model.diffusion_model.")}, str(unet))
    pipe = ipa_rt.Pipeline.from_single_file(unet)
    reference = ipa_rt.Pipeline.from_single_file(full, tokenizer=base)
    assert pipe.family.name == "sdxl" and pipe.text_encoders == [] and pipe.vae is None
    assert pooled_text_width(pipe.unet.config) == reference.text_encoders[-1].config.projection_dim == 64
    ours, theirs = pipe.unet.state_dict(), reference.unet.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_bad_files_name_the_file(models, tmp_path):
    good = write_single_file(models.base("sd15"), tmp_path / "sd15.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    unknown = models.adapter("sd15", "base")  # an IP-Adapter file: no Stable Diffusion UNet
    for file, expected in ((truncated, "cannot be read"), (unknown, "no Stable Diffusion UNet")):
        with pytest.raises(CheckpointError, match=expected) as err:
            ipa_rt.Pipeline.from_single_file(file)
        assert str(file) in str(err.value)
    with pytest.raises(CheckpointError, match="is not a file"):
        ipa_rt.Pipeline.from_single_file(tmp_path / "missing.safetensors")


def test_sd15_adapter_on_sdxl_checkpoint(models, tmp_path):
    file = write_single_file(models.base("sdxl"), tmp_path / "sdxl.safetensors")
    with pytest.raises(IncompatibleAdapterError):
        ipa_rt.Pipeline.from_single_file(file, ip_adapter=models.adapter("sd15", "base"), config=models.base("sdxl"))


def test_engine_sources_hash_the_single_file(models, tmp_path):
    from ipa_rt.export.build import BuildRequest, source_records

    file = write_single_file(models.base("sd15"), tmp_path / "sd15.safetensors")
    req = BuildRequest(base=str(file), ip_adapter=[str(models.adapter("sd15", "base"))])
    records = source_records(req)
    assert records["base/sd15.safetensors"]["sha256"]
    assert not [r for r in records if r.startswith("base/") and r != "base/sd15.safetensors"]


# --- image encoders ----------------------------------------------------------------------------------------------
def open_clip_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIPVisionModelWithProjection keys as OpenCLIP's visual tower (what open_clip saves)."""
    out = {}
    names = {v: k for k, v in __import__("ipa_rt.single_file", fromlist=["x"]).OPEN_CLIP_VISION.items()}
    block = {v: k for k, v in __import__("ipa_rt.single_file", fromlist=["x"]).OPEN_CLIP_BLOCK.items()}
    layers = {int(k.split(".")[3]) for k in state if k.startswith("vision_model.encoder.layers.")}
    for key, value in state.items():
        if key in names:
            out[f"visual.{names[key]}"] = value
    out["visual.proj"] = state["visual_projection.weight"].T.contiguous()
    for i in layers:
        src = f"vision_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{src}self_attn.{q}_proj.{kind}"] for q in "qkv"]
            out[f"visual.transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(qkv)
            for theirs, ours in block.items():
                out[f"visual.transformer.resblocks.{i}.{ours}.{kind}"] = state[f"{src}{theirs}.{kind}"]
    out["text_projection"] = torch.zeros(2, 2)  # a full OpenCLIP file carries the text tower too: ignored
    return out


def test_encoder_files_in_both_layouts(tmp_path, images):
    from safetensors.torch import load_file, save_file
    from transformers import CLIPVisionModelWithProjection

    from ipa_rt.models import load_image_encoder

    folder = T.write_image_encoder(tmp_path / "enc", num_attention_heads=16, hidden_act="gelu")  # ViT-H/bigG
    ref = CLIPVisionModelWithProjection.from_pretrained(folder).eval()
    state = load_file(str(folder / "model.safetensors"))
    save_file(state, str(tmp_path / "clip_vision_h.safetensors"))
    save_file(open_clip_layout(state), str(tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"))
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want = ref(pixels, output_hidden_states=True)
    for name in ("clip_vision_h.safetensors", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"):
        enc = load_image_encoder(tmp_path / name, torch.float32)
        mine = enc.state_dict()
        assert mine.keys() == state.keys() and all(torch.equal(mine[k], v) for k, v in state.items()), name
        got = enc(pixels, output_hidden_states=True)
        # the same weights in other storage (split/transposed tensors) may take another BLAS path: last-bit noise
        for a, b in ((got.image_embeds, want.image_embeds), (got.hidden_states[-2], want.hidden_states[-2])):
            assert ((a - b).norm() / b.norm()).item() < 1e-6, name


def test_encoder_file_errors(models, tmp_path):
    from safetensors.torch import load_file, save_file

    from ipa_rt.models import load_image_encoder

    with pytest.raises(CheckpointError, match="not a CLIP vision model") as err:
        load_image_encoder(models.adapter("sd15", "base"), torch.float32)
    assert str(models.adapter("sd15", "base")) in str(err.value)
    # an encoder whose projection does not fit the adapter: the error names the file
    folder = T.write_image_encoder(tmp_path / "enc", num_attention_heads=16, hidden_act="gelu", projection_dim=40)
    file = tmp_path / "clip_vision_g.safetensors"
    save_file(load_file(str(folder / "model.safetensors")), str(file))
    base = models.base("sd15")
    with pytest.raises(IncompatibleAdapterError, match="clip_vision_g") as err:
        ipa_rt.Pipeline.from_pretrained(base, ip_adapter=models.adapter("sd15", "base"), image_encoder=file)
    assert json.dumps(str(file))[1:-1] in str(err.value)
