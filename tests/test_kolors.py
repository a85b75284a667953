"""Kolors + IP-Adapter-Plus: ipa_rt's runtime inside diffusers' ``KolorsPipeline`` against diffusers' own, on the same
files (tiny random models written in the real on-disk formats): bitwise in fp32, the image side once per call, the
scale written in place, exact unload, and errors."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_family_latents, family_latents
from test_masks import masks

from ipa_rt import testing
from ipa_rt.errors import ConfigError, ImageInputError, IncompatibleAdapterError, ScaleError

STEPS = 3
# every parity call of this module (conftest.family_latents: one prompt, one seed)
CALL = dict(height=64, width=64, num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("kolors")
    base = testing.write_kolors_model(root / "kolors")
    out = {"base": base, "encoder": testing.write_image_encoder(root / "encoder", **testing.KOLORS_ENCODER)}
    out["plus"] = testing.write_kolors_adapter(root / "a" / "ip_adapter_plus_general.safetensors", base)
    out["plus_bin"] = testing.write_kolors_adapter(root / "b" / "ip_adapter_plus_general.bin", base, seed=5)
    out["flux_base"] = testing.write_flux_model(root / "flux")
    out["flux_adapter"] = testing.write_flux_adapter(root / "f" / "ip_adapter.safetensors", out["flux_base"])
    return out


def _load(cls, files, *adapters):
    pipe = cls.from_pretrained(str(files["base"]))
    pipe.set_progress_bar_config(disable=True)
    if adapters:
        from transformers import CLIPVisionModelWithProjection

        encoder = CLIPVisionModelWithProjection.from_pretrained(str(files["encoder"])).eval()
        pipe.register_modules(image_encoder=encoder)
        paths = [files[a] for a in adapters]
        pipe.load_ip_adapter(
            [str(p.parent) for p in paths], subfolder="", weight_name=[p.name for p in paths], image_encoder_folder=None
        )
    return pipe


def _pair(files, *adapters):
    import diffusers

    import ipa_rt.kolors

    return _load(diffusers.KolorsPipeline, files, *adapters), _load(ipa_rt.kolors.KolorsPipeline, files, *adapters)


def _latents(pipe, **kw):
    return family_latents(pipe, CALL, **kw)


def _same(ref, ours, **kw):
    return assert_same_family_latents(ref, ours, CALL, **kw)


@pytest.mark.slow
def test_kolors_parity_scales_and_unload(files):
    import ipa_rt.kolors

    ref, ours = _pair(files, "plus")
    base = _latents(_load(ipa_rt.kolors.KolorsPipeline, files))
    image = testing.make_image(0)
    assert (_same(ref, ours, ip_adapter_image=image) - base).abs().max() > 1e-3  # the adapter does something
    for scale in (0.5, {"up": {"block_0": [0.0, 1.0, 0.0]}}, "style"):  # number, InstantStyle dict, preset
        if scale == "style":
            ours.set_ip_adapter_scale(scale)
            ref.set_ip_adapter_scale({"up": {"block_0": [0.0, 1.0, 0.0]}})  # SDXL's style preset, spelled out
        else:
            ref.set_ip_adapter_scale(scale)
            ours.set_ip_adapter_scale(scale)
        _same(ref, ours, ip_adapter_image=image)
    _same(ref, ours, ip_adapter_image=image, guidance_scale=1.0)  # CFG off
    ours.set_ip_adapter_scale(0.0)
    assert torch.equal(_latents(ours, ip_adapter_image=image), base)  # scale 0: the base model exactly
    ours.unload_ip_adapter()
    assert torch.equal(_latents(ours), base)
    unet = ours.unet
    assert type(unet.encoder_hid_proj) is torch.nn.Linear and unet.config.encoder_hid_dim_type == "text_proj"
    assert not hasattr(unet, "text_encoder_hid_proj")


def test_kolors_two_adapters_and_bin_layout(files):
    ref, ours = _pair(files, "plus", "plus_bin")
    images = [testing.make_image(0), testing.make_image(5)]
    _same(ref, ours, ip_adapter_image=images)
    ref.set_ip_adapter_scale([0.3, 1.1])
    ours.set_ip_adapter_scale([0.3, 1.1])
    _same(ref, ours, ip_adapter_image=images)


def test_kolors_image_side_once_per_call_and_scale_in_place(files):
    _, ours = _pair(files, "plus")
    calls = []
    ours.adapters.projections[0].register_forward_hook(lambda *a: calls.append(1))
    _latents(ours, ip_adapter_image=testing.make_image(0))
    assert len(calls) == 1  # once per call (the CFG batch together), not once per step
    scale, ptr = ours.adapters.scale, ours.adapters.scale.data_ptr()
    ours.set_ip_adapter_scale(0.25)
    assert ours.adapters.scale is scale and scale.data_ptr() == ptr and scale.dtype == torch.float32
    assert torch.all(scale == 0.25)


def test_ipa_rt_pipeline_entry_point(files):
    import ipa_rt
    import ipa_rt.kolors

    ref, _ = _pair(files, "plus")
    pipe = ipa_rt.Pipeline.from_pretrained(files["base"], files["plus"], files["encoder"])
    assert type(pipe) is ipa_rt.kolors.KolorsPipeline
    pipe.set_progress_bar_config(disable=True)
    _same(ref, pipe, ip_adapter_image=testing.make_image(0))


@pytest.mark.slow
def test_kolors_hub_ids_through_the_hub_cache(files, tmp_path):
    """Hub ids as users pass them (Kolors' diffusers repository, Kolors-IP-Adapter-Plus with its file name and its
    image_encoder/ subfolder found by diffusers' rule), resolved by huggingface_hub from a cache written from local
    files (``local_files_only``: no network): the same latents as loading the files by path."""
    import ipa_rt

    cache = tmp_path / "hub"
    testing.write_hub_cache(cache, "Kwai-Kolors/Kolors-diffusers", {".": files["base"]})
    adapter = {"ip_adapter_plus_general.safetensors": files["plus"], "image_encoder": files["encoder"]}
    testing.write_hub_cache(cache, "Kwai-Kolors/Kolors-IP-Adapter-Plus", adapter)
    pipe = ipa_rt.Pipeline.from_pretrained(
        "Kwai-Kolors/Kolors-diffusers", "Kwai-Kolors/Kolors-IP-Adapter-Plus", subfolder="",
        weight_name="ip_adapter_plus_general.safetensors", cache_dir=str(cache), local_files_only=True,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    _, by_path = _pair(files, "plus")
    image = testing.make_image(0)
    assert torch.equal(_latents(pipe, ip_adapter_image=image), _latents(by_path, ip_adapter_image=image))


def test_errors(files):
    import ipa_rt.kolors

    pipe = _load(ipa_rt.kolors.KolorsPipeline, files)
    flux = files["flux_adapter"]
    with pytest.raises(IncompatibleAdapterError, match="Flux"):
        pipe.load_ip_adapter(str(flux.parent), subfolder="", weight_name=flux.name, image_encoder_folder=None)
    wrong = testing.write_image_encoder(files["encoder"].parent / "wrong", hidden_size=40, num_attention_heads=4)
    from transformers import CLIPVisionModelWithProjection

    pipe.register_modules(image_encoder=CLIPVisionModelWithProjection.from_pretrained(str(wrong)))
    plus = files["plus"]
    with pytest.raises(IncompatibleAdapterError, match="hidden_size"):
        pipe.load_ip_adapter(str(plus.parent), subfolder="", weight_name=plus.name, image_encoder_folder=None)
    assert pipe.adapters is None and type(pipe.unet.encoder_hid_proj) is torch.nn.Linear  # nothing changed
    with pytest.raises(ConfigError, match="no IP-Adapter"):
        pipe.set_ip_adapter_scale(0.5)
    ours = _pair(files, "plus")[1]
    with pytest.raises(ScaleError):
        ours.set_ip_adapter_scale([0.5, 0.5])
    with pytest.raises(ImageInputError, match=r"ip_adapter_masks\[0\] is int"):
        _latents(ours, ip_adapter_image=testing.make_image(0), cross_attention_kwargs={"ip_adapter_masks": [1]})
    with pytest.raises(ImageInputError, match="without ip_adapter_image"):
        _latents(ours, cross_attention_kwargs={"ip_adapter_masks": [masks(64)]})
    ours.set_ip_adapter_scale([[0.7, 0.4]])  # per image: only with masks
    with pytest.raises(ScaleError, match="need regional masks"):
        _latents(ours, ip_adapter_image=[[testing.make_image(0), testing.make_image(1)]])


@pytest.mark.slow
def test_kolors_regional_masks_and_per_image_scales(files):
    """diffusers' regional masks (``cross_attention_kwargs={"ip_adapter_masks": ...}``) and per-image scales: two
    masked images with their own scales on one adapter beside an unmasked adapter, bitwise diffusers' KolorsPipeline;
    the masks change the image (they are applied, not ignored)."""
    ref, ours = _pair(files, "plus", "plus_bin")
    scale = [[0.7, 0.4], 0.5]
    ref.set_ip_adapter_scale(scale)
    ours.set_ip_adapter_scale(scale)
    images = [[testing.make_image(0), testing.make_image(1)], testing.make_image(2)]
    masked = _same(ref, ours, ip_adapter_image=images, cross_attention_kwargs={"ip_adapter_masks": [masks(64), None]})
    ours.set_ip_adapter_scale([0.5, 0.5])
    ref.set_ip_adapter_scale([0.5, 0.5])
    assert not torch.equal(masked, _same(ref, ours, ip_adapter_image=images))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_kolors_engine_parity_live_scale_and_reuse(files, backend, tmp_path, monkeypatch, capsys):
    """The UNet as an engine inside diffusers' KolorsPipeline: <= 1e-5 of the latents' scale against diffusers
    (fp32 engines; observed ~2e-6), the scale (InstantStyle dicts too) an engine input, reuse from the cache."""
    import ipa_rt
    from ipa_rt.families.kolors.engine import EngineUNet

    monkeypatch.setenv("IPA_RT_CACHE", str(tmp_path / "cache"))
    args, size = (files["base"], files["plus"], files["encoder"]), {"height": 64, "width": 64}
    pipe = ipa_rt.Pipeline.from_pretrained(*args, backend=backend, engine_options=size)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.unet, EngineUNet)
    ref, _ = _pair(files, "plus")
    image = testing.make_image(0)
    for scale in (1.0, 0.4, {"up": {"block_0": [0.0, 1.0, 0.0]}}):
        ref.set_ip_adapter_scale(scale)
        pipe.set_ip_adapter_scale(scale)
        a, b = _latents(ref, ip_adapter_image=image), _latents(pipe, ip_adapter_image=image)
        assert (a - b).abs().max() <= 1e-5 * a.abs().max(), f"max |diff| {(a - b).abs().max().item():.3g}"
    calls = []
    pipe.adapters.projections[0].register_forward_hook(lambda *a: calls.append(1))
    _latents(pipe, ip_adapter_image=image)
    assert len(calls) == 1  # the Resampler feeds the engine once per call, not once per step
    capsys.readouterr()
    again = ipa_rt.Pipeline.from_pretrained(*args, backend=backend, engine_options=size)
    assert "reusing the kolors engine" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="engines do not take them"):  # regional masks: PyTorch pipelines only
        _latents(again, ip_adapter_image=image, cross_attention_kwargs={"ip_adapter_masks": [masks(64)]})
    with pytest.raises(ConfigError, match="adapters built in"):
        again.load_ip_adapter(str(files["plus_bin"].parent), subfolder="", weight_name=files["plus_bin"].name)
    folder = next((tmp_path / "cache").glob(f"{backend}-kolors-*"))
    assert type(ipa_rt.Pipeline.from_engine(folder)).__name__ == "KolorsPipeline"


@pytest.mark.slow
def test_kolors_cli_build_and_generate(files, tmp_path, monkeypatch):
    import json

    from ipa_rt.cli import main

    monkeypatch.setenv("IPA_RT_CACHE", str(tmp_path / "cache"))
    out, png, ref = tmp_path / "engines", tmp_path / "out.png", tmp_path / "ref.png"
    testing.make_image(0).save(ref)
    common = ["--ip-adapter", str(files["plus"]), "--image-encoder", str(files["encoder"])]
    size = ["--height", "64", "--width", "64"]
    assert main(["build", str(files["base"]), *common, "--backend", "onnxruntime", *size, "-o", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["kind"] == "kolors"
    gen = ["generate", "--engine", str(out), "--ip-image", str(ref), "--prompt", "a cat", "--steps", "2"]
    assert main([*gen, "--device", "cpu", "-o", str(png)]) == 0
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (64, 64)


@pytest.mark.slow
def test_kolors_fused_kernel(files):
    """Kolors' cross-attention through the fused Triton kernel (the interpreter on the CPU) against diffusers: within
    fp32 summation-order error."""
    from ipa_rt.kernels import fused_available

    why = fused_available(torch.device("cpu"), torch.float32, 8)
    if why is not None:
        pytest.skip(f"the Triton kernel cannot run here: {why}")
    ref, ours = _pair(files, "plus")
    ours.set_ip_attention("triton")
    assert all(p.fused for p in ours.adapters.processors)
    kw = dict(ip_adapter_image=testing.make_image(0), num_inference_steps=1, guidance_scale=1.0)  # the interpreter
    a, b = _latents(ref, **kw), _latents(ours, **kw)
    assert (a - b).abs().max() <= 2e-5 * a.abs().max(), f"max |diff| {(a - b).abs().max().item():.3g}"
    with pytest.raises(ConfigError, match="unknown"):
        ours.set_ip_attention("flash")


@pytest.mark.slow
def test_kolors_graphed_unet_with_a_replay_double(files, monkeypatch):
    """The CUDA-graph path on the CPU (a stand-in replays the captured body on its static inputs): the UNet captured
    once for the CFG batch and replayed at every step, bitwise diffusers across a new image and scale changes
    (InstantStyle dict included) with no recapture; the Resampler runs eagerly once per call, never in the body."""
    from test_runtime import replay_capture

    from ipa_rt.runtime import graphs

    monkeypatch.setattr(graphs, "capture_graph", replay_capture)
    ref, ours = _pair(files, "plus")
    ours.set_cuda_graphs(True)
    calls = []
    ours.adapters.projections[0].register_forward_hook(lambda *a: calls.append(1))
    for i, scale in enumerate((None, 0.4, {"up": {"block_0": [0.0, 1.0, 0.0]}})):
        if scale is not None:
            ref.set_ip_adapter_scale(scale)
            ours.set_ip_adapter_scale(scale)
        _same(ref, ours, ip_adapter_image=testing.make_image(i))
    assert ours.graph_stats()["graphs"] == 1 and len(calls) == 3
    assert "forward" not in ours.unet.__dict__
    scale, pair = [[0.7, 0.4]], [[testing.make_image(0), testing.make_image(1)]]
    ref.set_ip_adapter_scale(scale)
    ours.set_ip_adapter_scale(scale)  # masked: another buffer set (the downsampled masks), so another graph
    _same(ref, ours, ip_adapter_image=pair, cross_attention_kwargs={"ip_adapter_masks": [masks(64)]})
    assert ours.graph_stats()["graphs"] == 2
