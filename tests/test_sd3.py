"""SD3.5 IP-Adapter: parity with diffusers' own pipeline on the same files (tiny random models written in the real
on-disk formats), the step-independent resampler input once per call, the scale as an in-place tensor write, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_family_latents, family_latents

from ipa_rt import testing
from ipa_rt.errors import IncompatibleAdapterError, ScaleError

STEPS = 3
# every parity call of this module (conftest.family_latents: one prompt, one seed)
CALL = dict(height=32, width=32, num_inference_steps=STEPS, max_sequence_length=32, output_type="latent")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    base = testing.write_sd3_model(root / "sd35")
    out = {"base": base, "image": testing.make_image(0)}
    out["instantx"] = testing.write_sd3_adapter(root / "a" / "ip-adapter.safetensors", base)
    out["bin"] = testing.write_sd3_adapter(root / "b" / "ip-adapter.bin", base, seed=5, layout="diffusers")
    testing.write_siglip_encoder(root / "a" / "image_encoder")  # for the "beside the adapter" rule
    out["wide_encoder"] = testing.write_siglip_encoder(root / "wide", hidden_size=48)
    return out


def _load(cls, files, adapter: str | None = "instantx", **kw):
    pipe = cls.from_pretrained(str(files["base"]), dtype=torch.float32, **kw)
    pipe.set_progress_bar_config(disable=True)
    if adapter:
        pipe.load_ip_adapter(str(files[adapter].parent), weight_name=files[adapter].name)
    return pipe


def _pair(files, adapter: str = "instantx"):
    import diffusers

    import ipa_rt.sd3

    ours = _load(ipa_rt.sd3.StableDiffusion3Pipeline, files, adapter)
    return _load(diffusers.StableDiffusion3Pipeline, files, adapter), ours


def _latents(pipe, **kw):
    return family_latents(pipe, CALL, **kw)


def _same(ref, ours, **kw):
    return assert_same_family_latents(ref, ours, CALL, **kw)


@pytest.fixture(scope="module")
def base_latents(files):
    import diffusers

    plain = _load(diffusers.StableDiffusion3Pipeline, files, None)
    return {cfg: _latents(plain, guidance_scale=g) for cfg, g in (("cfg", 7.0), ("no_cfg", 1.0))}


@pytest.mark.parametrize("cfg", ["cfg", "no_cfg"])
def test_parity_scales_scale_zero_and_unload(files, base_latents, cfg):
    ref, ours = _pair(files)
    guidance = dict(guidance_scale=7.0 if cfg == "cfg" else 1.0)
    base = base_latents[cfg]
    image = files["image"]
    with_adapter = _same(ref, ours, ip_adapter_image=image, **guidance)  # diffusers' default scale: 0.5
    assert (with_adapter - base).abs().max() > 1e-2  # the adapter does something
    for scale in (1.3, 0.5):
        ref.set_ip_adapter_scale(scale)
        ours.set_ip_adapter_scale(scale)
        assert not torch.equal(_same(ref, ours, ip_adapter_image=image, **guidance), base)
    # scale 0 with embeddings given: the branch runs and adds where(scale != 0, ...) = exactly nothing
    embeds = ours.encode_image(image, "cpu")
    if cfg == "cfg":
        embeds = torch.cat([torch.zeros_like(embeds), embeds])  # diffusers' layout: negative (zeros) first
    ours.set_ip_adapter_scale(0.0)
    assert torch.equal(_latents(ours, ip_adapter_image_embeds=embeds, **guidance), base)
    assert torch.equal(_latents(ours, ip_adapter_image=image, **guidance), base)  # inactive: image not even encoded
    processors = dict(ours.transformer.attn_processors)
    ours.unload_ip_adapter()
    assert torch.equal(_latents(ours, **guidance), base)
    assert not hasattr(ours.transformer, "image_proj") and ours.image_encoder is None
    assert all(type(p).__name__ == "JointAttnProcessor2_0" for p in ours.transformer.attn_processors.values())
    assert processors.keys() != ours.transformer.attn_processors.keys()  # the side's resampler attentions are gone


def test_parity_bin_diffusers_layout_and_images_per_prompt(files):
    ref, ours = _pair(files, "bin")
    _same(ref, ours, ip_adapter_image=files["image"], num_images_per_prompt=2)
    ref.set_ip_adapter_scale(0.8)
    ours.set_ip_adapter_scale(0.8)
    _same(ref, ours, ip_adapter_image=files["image"], negative_prompt="blurry")


def test_img2img_parity(files):
    """The mixin serves every pipeline of the table (Inpaint: test_inpaint_parity, 16 latent channels)."""
    import diffusers

    import ipa_rt.sd3

    name = "StableDiffusion3Img2ImgPipeline"
    ref, ours = _load(getattr(diffusers, name), files), _load(getattr(ipa_rt.sd3, name), files)
    _same(ref, ours, image=testing.make_image(3, (32, 32)), strength=0.7, ip_adapter_image=files["image"])


def test_inpaint_parity(tmp_path):
    """StableDiffusion3InpaintPipeline (diffusers requires 16 or 33 transformer input channels: a tiny model with
    16 latent channels, as SD3's VAE has): bitwise diffusers with an image, a mask and the adapter."""
    import diffusers

    import ipa_rt.sd3

    base = testing.write_sd3_model(tmp_path / "sd35_16", configs={"vae": {"latent_channels": 16}})
    adapter = testing.write_sd3_adapter(tmp_path / "a" / "ip-adapter.safetensors", base)
    files = {"base": base, "instantx": adapter}
    name = "StableDiffusion3InpaintPipeline"
    ref, ours = _load(getattr(diffusers, name), files), _load(getattr(ipa_rt.sd3, name), files)
    mask = testing.make_image(5, (32, 32)).convert("L").point(lambda v: 255 if v > 127 else 0)
    call = dict(image=testing.make_image(3, (32, 32)), mask_image=mask, strength=0.8)
    out = _same(ref, ours, ip_adapter_image=testing.make_image(0), **call)
    assert not torch.equal(out, _latents(ours, ip_adapter_image=testing.make_image(1), **call))  # the image counts


def test_step_independent_part_once_per_call_and_scale_in_place(files):
    _, ours = _pair(files)
    side = ours.image_side
    modules = {
        "proj_in": side.proj_in,
        "ln1_first": side.layers[0].ln1,  # the first block's ln1 reads the learned latents: step-independent
        "ln1_second": side.layers[1].ln1,  # the second block's reads the first's output: per step
        "time_embedding": side.time_embedding,
        "to_k_ip": side.ip_blocks[0].to_k_ip,
        "encoder": ours.image_encoder,
    }
    calls = dict.fromkeys(modules, 0)
    for name, module in modules.items():
        module.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    first = _latents(ours, ip_adapter_image=files["image"])
    # CFG's negative (zeros) and positive embeddings are one tensor: the step-independent part once per call,
    # the timestep embedding and everything after it (resampler blocks, every block's image K/V) once per step
    per_call = {"proj_in": 1, "ln1_first": 1, "ln1_second": STEPS, "time_embedding": STEPS, "to_k_ip": STEPS}
    assert calls == {**per_call, "encoder": 1}
    again = _latents(ours, ip_adapter_image=files["image"])
    assert torch.equal(first, again)
    assert calls == {**{k: 2 * v for k, v in per_call.items()}, "encoder": 1}  # the reference came from the cache
    ours.set_ip_adapter_scale(0.0)  # diffusers' rule: an adapter at scale 0 is inactive, the image is not encoded
    _latents(ours, ip_adapter_image=testing.make_image(7))
    assert calls == {**{k: 2 * v for k, v in per_call.items()}, "encoder": 1}
    scale, ptr = side.scale, side.scale.data_ptr()
    ours.set_ip_adapter_scale(1.25)
    assert side.scale is scale and side.scale.data_ptr() == ptr
    assert side.scale.dtype == torch.float32 and side.scale.shape == () and side.scale.item() == 1.25
    ours.transformer.to(torch.float64)  # a dtype cast keeps the scale float32
    assert ours.image_side.scale.dtype == torch.float32


def test_image_encoder_beside_the_adapter(files):
    """diffusers' SD3 loader looks for image_encoder/ relative to the working directory (with subfolder=None it
    raises TypeError); ipa_rt's looks beside the adapter file, or at a path given as image_encoder_folder."""
    import ipa_rt.sd3

    cls = ipa_rt.sd3.StableDiffusion3Pipeline
    pipe = _load(cls, files, "instantx", image_encoder=None, feature_extractor=None)
    assert pipe.image_encoder is not None and pipe.feature_extractor is not None
    assert _latents(pipe, ip_adapter_image=files["image"]).shape == (1, 4, 16, 16)
    bare = _load(cls, files, None, image_encoder=None, feature_extractor=None)
    x = files["instantx"]
    with pytest.raises(IncompatibleAdapterError, match="hidden_size 48"):
        bare.load_ip_adapter(str(x.parent), weight_name=x.name, image_encoder_folder=str(files["wide_encoder"]))
    assert bare.image_encoder is None and not hasattr(bare.transformer, "image_proj")  # refused: nothing changed


def test_hub_ids_through_the_hub_cache(files, tmp_path):
    """Hub ids as users pass them (InstantX's repository and file name, SigLIP's id as image_encoder_folder), resolved
    by huggingface_hub from a cache written from local files (``local_files_only``: no network): the same latents as
    loading the files by path."""
    import ipa_rt.sd3

    cache = tmp_path / "hub"
    testing.write_hub_cache(cache, "InstantX/SD3.5-Large-IP-Adapter", {"ip-adapter.bin": files["bin"]})
    encoder = files["instantx"].parent / "image_encoder"
    testing.write_hub_cache(cache, "google/siglip-so400m-patch14-384", {".": encoder})
    cls = ipa_rt.sd3.StableDiffusion3Pipeline
    pipe = _load(cls, files, None, image_encoder=None, feature_extractor=None)
    pipe.load_ip_adapter(
        "InstantX/SD3.5-Large-IP-Adapter", weight_name="ip-adapter.bin",
        image_encoder_folder="google/siglip-so400m-patch14-384", cache_dir=str(cache), local_files_only=True,
    )  # fmt: skip
    by_path = _load(cls, files, None, image_encoder=None, feature_extractor=None)
    by_path.load_ip_adapter(str(files["bin"].parent), weight_name=files["bin"].name, image_encoder_folder=str(encoder))
    image = files["image"]
    assert torch.equal(_latents(pipe, ip_adapter_image=image), _latents(by_path, ip_adapter_image=image))


def test_errors(files, tmp_path):
    import ipa_rt.sd3

    pipe = _load(ipa_rt.sd3.StableDiffusion3Pipeline, files, None)
    original = dict(pipe.transformer.attn_processors)
    keys = set(pipe.transformer.state_dict())
    flux_base = testing.write_flux_model(tmp_path / "flux")
    flux = testing.write_flux_adapter(tmp_path / "fa" / "ip_adapter.safetensors", flux_base)
    with pytest.raises(IncompatibleAdapterError, match=r"Flux\.1 / Chroma.*SD3\.5"):
        pipe.load_ip_adapter(str(flux.parent), weight_name=flux.name)
    sd_base = testing.write_base_model(tmp_path / "sd15")
    sd = testing.write_adapter(tmp_path / "sd" / "ip-adapter_sd15.bin", "base", sd_base)
    with pytest.raises(IncompatibleAdapterError, match=r"SD1\.5 / SDXL"):
        pipe.load_ip_adapter(str(sd))  # a file path: weight_name is not needed
    state = testing.sd3_adapter_state_dict(files["base"])
    state["ip_adapter"]["1.to_k_ip.weight"] = torch.zeros(16, 32)
    with pytest.raises(IncompatibleAdapterError, match=r"1\.to_k_ip\.weight is \[16, 32\]; expected \[32, 32\]"):
        pipe.load_ip_adapter(state)
    state = testing.sd3_adapter_state_dict(files["base"])
    state["ip_adapter"]["2.to_k_ip.weight"] = torch.zeros(32, 32)
    with pytest.raises(IncompatibleAdapterError, match=r"2\.to_k_ip\.weight.*2-block"):
        pipe.load_ip_adapter(state)
    state = testing.sd3_adapter_state_dict(files["base"])
    del state["ip_adapter"]["0.norm_ip_k.weight"]
    with pytest.raises(IncompatibleAdapterError, match=r"0\.norm_ip_k\.weight is missing"):
        pipe.load_ip_adapter(state)
    assert not hasattr(pipe.transformer, "image_proj")  # the refused loads installed nothing
    pipe.load_ip_adapter(testing.sd3_adapter_state_dict(files["base"]))
    for bad in ("strong", [0.5, 0.5], True, float("nan"), None):
        with pytest.raises(ScaleError):
            pipe.set_ip_adapter_scale(bad)
    assert pipe.image_side.scale.item() == 0.5  # refused scales wrote nothing
    pipe.unload_ip_adapter()  # the very processor objects back, no adapter weights left in the transformer
    restored = pipe.transformer.attn_processors
    assert restored.keys() == original.keys() and all(restored[k] is v for k, v in original.items())
    assert set(pipe.transformer.state_dict()) == keys


def test_pipeline_table_covers_diffusers():
    """Every diffusers SD3 pipeline with SD3IPAdapterMixin (the modular one aside) has an ipa_rt class of its name."""
    import diffusers
    from diffusers.loaders import SD3IPAdapterMixin

    import ipa_rt.sd3

    names = [n for n in dir(diffusers) if n.startswith("StableDiffusion3") and n.endswith("Pipeline")]
    have = {n for n in names if "Modular" not in n and issubclass(getattr(diffusers, n), SD3IPAdapterMixin)}
    assert have == set(ipa_rt.sd3.PIPELINES)
    for name in ipa_rt.sd3.PIPELINES:
        cls = getattr(ipa_rt.sd3, name)
        assert cls.__bases__ == (ipa_rt.sd3.SD3AdapterMixin, getattr(diffusers, name))


def test_ipa_rt_pipeline_entry_point(files, tmp_path, monkeypatch):
    """``ipa_rt.Pipeline.from_pretrained`` on an SD3 folder gives ipa_rt.sd3's pipeline of the folder's class (engines:
    :func:`test_sd3_engine_parity_live_scale_and_reuse`)."""
    import ipa_rt
    import ipa_rt.sd3
    from ipa_rt.errors import ConfigError

    ref, _ = _pair(files)
    pipe = ipa_rt.Pipeline.from_pretrained(files["base"], files["instantx"])
    assert type(pipe) is ipa_rt.sd3.StableDiffusion3Pipeline
    pipe.set_progress_bar_config(disable=True)
    _same(ref, pipe, ip_adapter_image=testing.make_image(0))
    monkeypatch.setenv("IPA_RT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="engine_options"):  # refused before anything is built
        ipa_rt.Pipeline.from_pretrained(files["base"], files["instantx"], engine_options={"height": 32})
    with pytest.raises(ConfigError, match="frames"):
        ipa_rt.Pipeline.from_pretrained(
            files["base"], files["instantx"], backend="openvino", engine_options={"frames": 4}
        )
    with pytest.raises(ConfigError, match="ip_adapter"):
        ipa_rt.Pipeline.from_pretrained(files["base"], None, backend="openvino")
    assert not list((tmp_path / "cache").glob("*-sd3-*"))


ENGINE_SIZE = {"height": 32, "width": 32, "max_sequence_length": 32}


def _close(a, b):
    """Engine parity: <= 1e-3 of the latents' scale (fp32 engines; observed <= ~1e-6)."""
    assert (a - b).abs().max() <= 1e-3 * a.abs().max(), f"max |diff| {(a - b).abs().max().item():.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_sd3_engine_parity_live_scale_and_reuse(files, base_latents, backend, tmp_path, monkeypatch, capsys):
    """The transformer (with the per-step resampler) as an engine inside diffusers' StableDiffusion3Pipeline, against
    diffusers with the adapter: CFG on and off, the scale an engine input changed live, scale 0 and no image the base
    model, reuse from the cache, the adapter built in, from_engine."""
    import diffusers

    import ipa_rt
    from ipa_rt.errors import ConfigError
    from ipa_rt.families.sd3.engine import EngineTransformer

    monkeypatch.setenv("IPA_RT_CACHE", str(tmp_path / "cache"))
    args = (files["base"], files["instantx"])
    pipe = ipa_rt.Pipeline.from_pretrained(*args, backend=backend, engine_options=ENGINE_SIZE)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and isinstance(pipe.transformer, EngineTransformer)
    folder = next((tmp_path / "cache").glob(f"{backend}-sd3-*"))
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    ref, engine, image = _load(diffusers.StableDiffusion3Pipeline, files), pipe.transformer.engine, files["image"]
    for scale, guidance in ((0.5, 7.0), (1.3, 7.0), (1.3, 1.0)):  # 0.5: both loaders' default; then live changes
        ref.set_ip_adapter_scale(scale)
        pipe.set_ip_adapter_scale(scale)
        kw = dict(ip_adapter_image=image, guidance_scale=guidance)
        _close(_latents(ref, **kw), _latents(pipe, **kw))
    without = _latents(pipe)  # no image prompt: zero features and a zero scale
    _close(base_latents["cfg"], without)
    embeds = pipe.encode_image(image, "cpu")
    pipe.set_ip_adapter_scale(0.0)  # given embeddings, the branch runs in the engine and adds exactly nothing
    assert torch.equal(_latents(pipe, ip_adapter_image_embeds=torch.cat([torch.zeros_like(embeds), embeds])), without)
    assert pipe.transformer.engine is engine
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == stamps  # nothing rebuilt
    capsys.readouterr()
    again = ipa_rt.Pipeline.from_pretrained(*args, backend=backend, engine_options=ENGINE_SIZE)
    assert "reusing the sd3 engine" in "".join(capsys.readouterr())
    with pytest.raises(ConfigError, match="adapters built in"):
        again.load_ip_adapter(str(files["bin"].parent), weight_name=files["bin"].name)
    loaded = ipa_rt.Pipeline.from_engine(folder)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == "StableDiffusion3Pipeline" and "engine" in loaded.runtime_summary()
    ref.set_ip_adapter_scale(0.5)
    _close(_latents(ref, ip_adapter_image=image), _latents(loaded, ip_adapter_image=image))


@pytest.mark.slow
def test_sd3_cli_generate_and_build(files, tmp_path, monkeypatch):
    """``ipa_rt generate`` on an SD3 folder (PyTorch), ``ipa_rt build`` of its transformer engine and ``generate
    --engine`` on it, through the command line."""
    import json

    from PIL import Image

    from ipa_rt.cli import main

    monkeypatch.setenv("IPA_RT_CACHE", str(tmp_path / "cache"))
    ref, png, out = tmp_path / "ref.png", tmp_path / "out.png", tmp_path / "engines"
    testing.make_image(0).save(ref)
    common = ["--ip-adapter", str(files["instantx"]), "--height", "32", "--width", "32"]
    gen = ["generate", str(files["base"]), *common, "--ip-image", str(ref), "--steps", "2", "--device", "cpu"]
    assert main([*gen, "--backend", "torch", "-o", str(png)]) == 0
    assert main(["build", str(files["base"]), *common, "--max-sequence-length", "16", "-o", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["kind"] == "sd3"
    engine_gen = ["generate", "--engine", str(out), "--ip-image", str(ref), "--steps", "2", "--device", "cpu"]
    assert main([*engine_gen, "-o", str(png)]) == 0
    with Image.open(png) as im:
        assert im.size == (32, 32)


def test_sd3_graphed_transformer_with_a_replay_double(files, monkeypatch):
    """The CUDA-graph path on the CPU (a stand-in replays the captured body on its static inputs): bitwise diffusers
    across a new image and a scale change on one graph; the step-independent part (proj_in) runs eagerly once per
    call and the per-step resampler inside the body, reading the staged static copy."""
    from test_runtime import replay_capture

    from ipa_rt.runtime import graphs

    monkeypatch.setattr(graphs, "capture_graph", replay_capture)
    ref, ours = _pair(files)
    ours.set_cuda_graphs(True)
    calls = []
    ours.image_side.proj_in.register_forward_hook(lambda *a: calls.append(1))
    _same(ref, ours, ip_adapter_image=files["image"])
    ref.set_ip_adapter_scale(0.8)
    ours.set_ip_adapter_scale(0.8)
    _same(ref, ours, ip_adapter_image=testing.make_image(3))
    assert ours.graph_stats()["graphs"] == 1 and len(calls) == 2
    assert "forward" not in ours.transformer.__dict__
