"""Flux.1 / Chroma IP-Adapter: parity with diffusers' own pipelines on the same files (tiny random models written
in the real on-disk formats), the scale as an in-place tensor write, the image side once per call, and errors."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_family_latents, family_latents

from ipa_rt import testing
from ipa_rt.errors import CheckpointError, ConfigError, IncompatibleAdapterError, ScaleError
from ipa_rt.flux import FluxImageSide, expand_flux_scale

ENCODER_DIM = 24
STEPS = 3
# every parity call of this module (conftest.family_latents: one prompt, one seed)
CALL = dict(height=32, width=32, num_inference_steps=STEPS, max_sequence_length=32, output_type="latent")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    out = {
        "flux": testing.write_flux_model(root / "flux", family="flux"),
        "chroma": testing.write_flux_model(root / "chroma", family="chroma"),
        "encoder": testing.write_image_encoder(root / "encoder", projection_dim=ENCODER_DIM),
    }
    out["xlabs"] = testing.write_flux_adapter(root / "a" / "ip_adapter.safetensors", out["flux"], layout="xlabs")
    out["bin"] = testing.write_flux_adapter(root / "b" / "ip_adapter.bin", out["flux"], layout="diffusers", seed=7)
    out["chroma_adapter"] = testing.write_flux_adapter(root / "c" / "ip_adapter.safetensors", out["chroma"], seed=9)
    out["sd_base"] = testing.write_base_model(root / "sd15")
    out["sd_adapter"] = testing.write_adapter(root / "sd" / "ip-adapter_sd15.bin", "base", out["sd_base"])
    return out


def _load(cls, folder, files, *adapters):
    pipe = cls.from_pretrained(str(folder), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if adapters:
        paths = [files[a] for a in adapters]
        pipe.load_ip_adapter(
            [str(p.parent) for p in paths],
            weight_name=[p.name for p in paths],
            image_encoder_pretrained_model_name_or_path=str(files["encoder"]),
            image_encoder_dtype=torch.float32,
        )
    return pipe


def _flux(files, *adapters):
    import diffusers

    import ipa_rt.flux

    return (
        _load(diffusers.FluxPipeline, files["flux"], files, *adapters),
        _load(ipa_rt.flux.FluxPipeline, files["flux"], files, *adapters),
    )


def _latents(pipe, **kw):
    return family_latents(pipe, CALL, **kw)


def _same(ref, ours, **kw):
    return assert_same_family_latents(ref, ours, CALL, **kw)


def test_flux_parity_one_adapter_scales(files):
    ref, ours = _flux(files, "xlabs")
    image = testing.make_image(0)
    base = _latents(_load(__import__("ipa_rt.flux").flux.FluxPipeline, files["flux"], files))
    with_adapter = _same(ref, ours, ip_adapter_image=image)
    assert (with_adapter - base).abs().max() > 1e-3  # the adapter does something
    for scale in (0.6, [0.3, 1.2]):  # global, then per double-stream block
        ref.set_ip_adapter_scale(scale)
        ours.set_ip_adapter_scale(scale)
        _same(ref, ours, ip_adapter_image=image)
    ours.set_ip_adapter_scale(0.0)
    assert torch.equal(_latents(ours, ip_adapter_image=image), base)  # scale 0: the base model exactly
    ours.unload_ip_adapter()
    assert torch.equal(_latents(ours), base)
    assert not hasattr(ours.transformer, "encoder_hid_proj")


def test_flux_parity_true_cfg_images_and_batch(files):
    ref, ours = _flux(files, "xlabs")
    a, b = testing.make_image(0), testing.make_image(5)
    cfg = dict(negative_prompt="blurry", true_cfg_scale=3.0)
    _same(ref, ours, ip_adapter_image=a, **cfg)  # default negative image: black
    _same(ref, ours, ip_adapter_image=a, negative_ip_adapter_image=b, **cfg)
    _same(ref, ours, ip_adapter_image=[[a, b]])  # two images for one adapter: tokens laid end to end
    _same(ref, ours, ip_adapter_image=a, num_images_per_prompt=2)


def test_flux_parity_two_adapters_and_layouts(files):
    ref, ours = _flux(files, "xlabs", "bin")
    images = [testing.make_image(0), testing.make_image(5)]
    _same(ref, ours, ip_adapter_image=images)
    for scale in ([0.5, 1.0], [0.5, [0.0, 2.0]]):
        ref.set_ip_adapter_scale(scale)
        ours.set_ip_adapter_scale(scale)
        _same(ref, ours, ip_adapter_image=images)


def test_chroma_parity(files):
    import diffusers

    import ipa_rt.flux

    ref = _load(diffusers.ChromaPipeline, files["chroma"], files, "chroma_adapter")
    ours = _load(ipa_rt.flux.ChromaPipeline, files["chroma"], files, "chroma_adapter")
    image = testing.make_image(3)
    _same(ref, ours, ip_adapter_image=image, negative_prompt="blurry", guidance_scale=4.0)
    ref.set_ip_adapter_scale(0.4)
    ours.set_ip_adapter_scale(0.4)
    _same(ref, ours, ip_adapter_image=image, negative_prompt="blurry", guidance_scale=4.0)


def test_image_side_once_per_call_and_scale_in_place(files):
    _, ours = _flux(files, "xlabs")
    side = ours.transformer.encoder_hid_proj
    assert isinstance(side, FluxImageSide)
    projections = []
    side.image_projection_layers[0].register_forward_hook(lambda *a: projections.append(1))
    encodes = []
    ours.image_encoder.register_forward_hook(lambda *a: encodes.append(1))
    image = testing.make_image(0)
    first = _latents(ours, ip_adapter_image=image, negative_prompt="x", true_cfg_scale=2.0)
    # per call: one projection for the image, one for the (black) negative, not one per step and pass
    assert len(projections) == 2
    assert len(encodes) == 2
    again = _latents(ours, ip_adapter_image=image, negative_prompt="x", true_cfg_scale=2.0)
    assert torch.equal(first, again)
    assert len(encodes) == 2  # both references came from the cache
    scale, ptr = side.scale, side.scale.data_ptr()
    ours.set_ip_adapter_scale([0.25, 0.75])
    assert side.scale is scale and side.scale.data_ptr() == ptr and side.scale.dtype == torch.float32
    assert side.scale.tolist() == [[0.25, 0.75]]


def test_expand_flux_scale_follows_diffusers():
    assert expand_flux_scale(0.5, 2, 3) == [[0.5] * 3, [0.5] * 3]
    assert expand_flux_scale([0.1, 0.2, 0.3], 1, 3) == [[0.1, 0.2, 0.3]]
    assert expand_flux_scale([0.5, [0.1, 0.2, 0.3]], 2, 3) == [[0.5] * 3, [0.1, 0.2, 0.3]]
    with pytest.raises(ScaleError, match="one per adapter"):
        expand_flux_scale([0.5, 0.5, 0.5], 2, 3)
    with pytest.raises(ScaleError, match="expected 3"):
        expand_flux_scale([0.5, [0.1, 0.2]], 2, 3)
    with pytest.raises(ScaleError, match="expected a number"):
        expand_flux_scale("strong", 1, 3)


def test_errors(files):
    import ipa_rt
    import ipa_rt.flux

    flux = _load(ipa_rt.flux.FluxPipeline, files["flux"], files)
    sd = files["sd_adapter"]
    with pytest.raises(IncompatibleAdapterError, match=r"SD1\.5 / SDXL"):
        flux.load_ip_adapter(str(sd.parent), weight_name=sd.name)
    with pytest.raises(IncompatibleAdapterError, match="Flux"):
        ipa_rt.Pipeline.from_pretrained(str(files["sd_base"]), str(files["xlabs"]))
    wrong = testing.write_image_encoder(files["encoder"].parent / "wrong_encoder", projection_dim=ENCODER_DIM + 8)
    x = files["xlabs"]
    with pytest.raises(IncompatibleAdapterError, match="projection_dim"):
        flux.load_ip_adapter(str(x.parent), weight_name=x.name, image_encoder_pretrained_model_name_or_path=str(wrong))
    state = testing.flux_adapter_state_dict(files["flux"], encoder_dim=ENCODER_DIM)
    del state["ip_adapter"]["1.to_v_ip.bias"]
    with pytest.raises(IncompatibleAdapterError, match=r"1\.to_v_ip"):
        flux.load_ip_adapter(state, weight_name="missing.bin")
    state = testing.flux_adapter_state_dict(files["flux"], encoder_dim=ENCODER_DIM)
    state["image_proj"]["norm.weight"] = torch.ones(48)
    state["image_proj"]["norm.bias"] = torch.zeros(48)
    state["image_proj"]["proj.weight"] = torch.zeros(4 * 48, ENCODER_DIM)
    state["image_proj"]["proj.bias"] = torch.zeros(4 * 48)
    with pytest.raises(IncompatibleAdapterError, match="joint_attention_dim"):
        flux.load_ip_adapter(state, weight_name="other.bin")
    assert flux.image_encoder is None  # the refused loads registered nothing
    flux.load_ip_adapter(
        str(x.parent), weight_name=x.name, image_encoder_pretrained_model_name_or_path=str(files["encoder"])
    )
    with pytest.raises(ScaleError):
        flux.set_ip_adapter_scale([[0.1]])
    with pytest.raises(ConfigError, match="regional masks"):
        _latents(flux, ip_adapter_image=testing.make_image(0), joint_attention_kwargs={"ip_adapter_masks": [1]})


def test_ipa_rt_pipeline_entry_point(files):
    """``ipa_rt.Pipeline.from_pretrained`` on a Flux folder gives ipa_rt.flux's pipeline of the folder's class."""
    import ipa_rt
    import ipa_rt.flux

    ref, _ = _flux(files, "xlabs")
    pipe = ipa_rt.Pipeline.from_pretrained(files["flux"], files["xlabs"], files["encoder"])
    assert type(pipe) is ipa_rt.flux.FluxPipeline
    pipe.set_progress_bar_config(disable=True)
    _same(ref, pipe, ip_adapter_image=testing.make_image(0))
    chroma = ipa_rt.Pipeline.from_pretrained(files["chroma"], files["chroma_adapter"], files["encoder"])
    assert type(chroma) is ipa_rt.flux.ChromaPipeline
    with pytest.raises(ConfigError, match="scheduler"):
        ipa_rt.Pipeline.from_pretrained(files["flux"], files["xlabs"], files["encoder"], scheduler="lcm")


ENGINE_SIZE = {"height": 32, "width": 32, "max_sequence_length": 32}


def _close(ref, ours, **kw):
    """Engine parity: ≤ 1e-3 of the latents' scale (fp32 engines; observed ~5e-7)."""
    a, b = _latents(ref, **kw), _latents(ours, **kw)
    assert (a - b).abs().max() <= 1e-3 * a.abs().max(), f"max |diff| {(a - b).abs().max().item():.3g}"
    return b


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_flux_engine_parity_live_scale_and_reuse(files, backend, tmp_path, monkeypatch, capsys):
    import ipa_rt
    from ipa_rt.families.flux.engine import EngineTransformer

    monkeypatch.setenv("IPA_RT_CACHE", str(tmp_path / "cache"))
    args = (files["flux"], files["xlabs"], files["encoder"])
    pipe = ipa_rt.Pipeline.from_pretrained(*args, backend=backend, engine_options=ENGINE_SIZE)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.transformer, EngineTransformer)
    folder = next((tmp_path / "cache").glob(f"{backend}-flux-*"))
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    ref, _ = _flux(files, "xlabs")
    image = testing.make_image(0)
    base = _latents(_load(__import__("ipa_rt.flux").flux.FluxPipeline, files["flux"], files))
    engine = pipe.transformer.engine
    for scale in (1.0, 0.4, [0.0, 1.5]):  # live: one tensor write, the same compiled engine
        ref.set_ip_adapter_scale(scale)
        pipe.set_ip_adapter_scale(scale)
        _close(ref, pipe, ip_adapter_image=image)
    _close(ref, pipe, ip_adapter_image=image, negative_prompt="blurry", true_cfg_scale=3.0)
    pipe.set_ip_adapter_scale(0.0)
    zero = _latents(pipe, ip_adapter_image=image)
    assert (zero - base).abs().max() <= 1e-3 * base.abs().max()  # scale 0: the base model
    assert pipe.transformer.engine is engine
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == stamps  # nothing rebuilt
    capsys.readouterr()
    again = ipa_rt.Pipeline.from_pretrained(*args, backend=backend, engine_options=ENGINE_SIZE)
    assert "reusing the flux engine" in capsys.readouterr().err + capsys.readouterr().out
    assert again.transformer.engine is not engine
    with pytest.raises(ConfigError, match="adapters built in"):
        again.load_ip_adapter(str(files["bin"]))
    with pytest.raises(ConfigError, match="was built for"):
        _latents(again, ip_adapter_image=image, height=64, width=64)
    loaded = ipa_rt.Pipeline.from_engine(folder)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == "FluxPipeline"
    ref.set_ip_adapter_scale(1.0)
    _close(ref, loaded, ip_adapter_image=image)


def test_flux_engine_errors(files, tmp_path, monkeypatch):
    import ipa_rt

    monkeypatch.setenv("IPA_RT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="engine_options"):
        ipa_rt.Pipeline.from_pretrained(
            files["flux"], files["xlabs"], files["encoder"], backend="onnxruntime", engine_options={"frames": 4}
        )
    with pytest.raises(ConfigError, match="ip_adapter"):
        ipa_rt.Pipeline.from_pretrained(files["flux"], None, files["encoder"], backend="onnxruntime")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*-flux-*"))


@pytest.mark.slow
def test_flux_cli_build_and_generate(files, tmp_path):
    from ipa_rt.cli import main

    out, png = tmp_path / "engines", tmp_path / "out.png"
    testing.make_image(0).save(tmp_path / "ref.png")
    x, size = files["xlabs"], ["--height", "32", "--width", "32"]
    common = ["--ip-adapter", str(x), "--image-encoder", str(files["encoder"])]
    assert main(["build", str(files["flux"]), *common, *size, "--max-sequence-length", "32", "-o", str(out)]) == 0
    assert (out / "manifest.json").is_file()
    gen = ["generate", "--engine", str(out), "--ip-image", str(tmp_path / "ref.png"), "--prompt", "a cat"]
    assert main([*gen, "--steps", "2", "--device", "cpu", "-o", str(png)]) == 0
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (32, 32)
    assert main(["build", str(files["flux"]), *common, *size, "--lora", str(x), "-o", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()  # refused before anything was written


@pytest.mark.slow
def test_chroma_engine_parity(files, tmp_path, monkeypatch):
    import diffusers

    import ipa_rt

    monkeypatch.setenv("IPA_RT_CACHE", str(tmp_path / "cache"))
    pipe = ipa_rt.Pipeline.from_pretrained(
        files["chroma"], files["chroma_adapter"], files["encoder"], backend="openvino", engine_options=ENGINE_SIZE
    )
    pipe.set_progress_bar_config(disable=True)
    ref = _load(diffusers.ChromaPipeline, files["chroma"], files, "chroma_adapter")
    image, cfg = testing.make_image(3), dict(negative_prompt="blurry", guidance_scale=4.0)
    for scale in (1.0, 0.3):
        ref.set_ip_adapter_scale(scale)
        pipe.set_ip_adapter_scale(scale)
        _close(ref, pipe, ip_adapter_image=image, **cfg)


@pytest.mark.slow
def test_flux_fused_kernel_branch(files, monkeypatch):
    """The image branch through the fused Triton kernel (here: the Triton interpreter on the CPU) against diffusers:
    within fp32 summation-order error; scale 0 still exactly the base model's path (the kernel's zero select)."""
    from ipa_rt.kernels import decoupled_kernel, fused_available

    if fused_available(torch.device("cpu"), torch.float32, 16) is not None:
        pytest.skip(f"the Triton kernel cannot run here: {fused_available(torch.device('cpu'), torch.float32, 16)}")
    ref, ours = _flux(files, "xlabs", "bin")
    ours.set_ip_attention("triton")
    launches = []
    launch = decoupled_kernel.launch
    monkeypatch.setattr(decoupled_kernel, "launch", lambda *a, **k: launches.append(1) or launch(*a, **k))
    images = [testing.make_image(0), testing.make_image(5)]
    for scale in ([0.7, 1.2], [0.0, [1.0, 0.5]]):
        ref.set_ip_adapter_scale(scale)
        ours.set_ip_adapter_scale(scale)
        a, b = _latents(ref, ip_adapter_image=images), _latents(ours, ip_adapter_image=images)
        assert (a - b).abs().max() <= 2e-5 * a.abs().max(), f"max |diff| {(a - b).abs().max().item():.3g}"
    assert len(launches) == 2 * STEPS * 2  # two double blocks, every step, both scales: the kernel ran
    with pytest.raises(ConfigError, match="unknown"):
        ours.set_ip_attention("flash")


@pytest.mark.parametrize("family", ["flux", "kolors", "sd3"])
def test_family_package_exports_diffusers_names(family):
    """``ipa_rt.<family>.<name>`` is diffusers' class with the family's mixin, made once (the CLI's and the engines'
    ``runtime_class`` give the same object), listed in ``__all__``; another name is an AttributeError."""
    import importlib

    import diffusers

    package = importlib.import_module(f"ipa_rt.{family}")
    name = package.PIPELINES[0]
    cls = getattr(package, name)
    assert cls is package.runtime_class(name) and name in package.__all__
    assert issubclass(cls, getattr(diffusers, name)) and cls.__module__ == f"ipa_rt.{family}"
    with pytest.raises(AttributeError, match="NoSuchPipeline"):
        _ = package.NoSuchPipeline


def test_flux_graphed_transformer_with_a_replay_double(files, monkeypatch):
    """The CUDA-graph path, checked on the CPU: the transformer captured per signature and replayed by a stand-in
    that re-runs the captured body on its static inputs. Bitwise diffusers with a new image, a scale change and true
    CFG (two replays per step, the negative's keys/values staged in between) on one graph; the image side is computed
    eagerly once per embeddings set, never inside the body; the transformer's forward is restored after each call."""
    from test_runtime import replay_capture

    from ipa_rt.runtime import graphs

    monkeypatch.setattr(graphs, "capture_graph", replay_capture)
    ref, ours = _flux(files, "xlabs")
    ours.set_cuda_graphs(True)
    side = ours.image_side
    projected = []
    monkeypatch.setattr(side, "project", lambda embeds: projected.append(1) or FluxImageSide.project(side, embeds))
    _same(ref, ours, ip_adapter_image=testing.make_image(0))
    assert ours.graph_stats()["graphs"] == 1 and len(projected) == 1
    assert "forward" not in ours.transformer.__dict__
    static = {t.data_ptr() for t in graphs.tensors_of(side.static.current)}
    for scale in (0.4, [0.3, 1.2]):
        ref.set_ip_adapter_scale(scale)
        ours.set_ip_adapter_scale(scale)
        _same(ref, ours, ip_adapter_image=testing.make_image(1))
    _same(ref, ours, ip_adapter_image=testing.make_image(2), true_cfg_scale=2.0, negative_prompt="blurry")
    assert ours.graph_stats() == {"graphs": 1, "eager": 0, "pool_bytes": 0} and len(projected) == 5
    assert {t.data_ptr() for t in graphs.tensors_of(side.static.current)} == static  # the same buffers, refilled


def test_flux_hub_ids_through_the_hub_cache(files, tmp_path):
    """Hub ids as users pass them (FLUX.1's, XLabs' repository with its file name, the CLIP encoder's id), resolved by
    huggingface_hub from a cache written from local files (``local_files_only``: no network): the same latents as
    loading the files by path, through ``ipa_rt.Pipeline.from_pretrained`` and ``load_ip_adapter``."""
    import ipa_rt

    cache = tmp_path / "hub"
    testing.write_hub_cache(cache, "black-forest-labs/FLUX.1-dev", {".": files["flux"]})
    testing.write_hub_cache(cache, "XLabs-AI/flux-ip-adapter", {"ip_adapter.safetensors": files["xlabs"]})
    testing.write_hub_cache(cache, "openai/clip-vit-large-patch14", {".": files["encoder"]})
    hub = dict(cache_dir=str(cache), local_files_only=True)
    pipe = ipa_rt.Pipeline.from_pretrained(
        "black-forest-labs/FLUX.1-dev", "XLabs-AI/flux-ip-adapter", "openai/clip-vit-large-patch14",
        weight_name="ip_adapter.safetensors", **hub,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    by_path = _load(__import__("ipa_rt.flux").flux.FluxPipeline, files["flux"], files, "xlabs")
    image = testing.make_image(0)
    assert torch.equal(_latents(pipe, ip_adapter_image=image), _latents(by_path, ip_adapter_image=image))
    with pytest.raises(CheckpointError, match="flux-ip-adapter-v2' is neither a local path"):  # not in the cache
        pipe.load_ip_adapter("XLabs-AI/flux-ip-adapter-v2", weight_name="ip_adapter.safetensors", **hub)
