"""T2I-Adapter + IP-Adapter on the torch backend against diffusers' adapter pipelines (same files and latents).

diffusers' ``StableDiffusionXLAdapterPipeline`` takes IP-Adapters; its SD1.5 sibling does not, so there the
oracle is diffusers' own adapter pipeline with the image embeddings its IP-Adapter loader computes passed to
the UNet call (:func:`inject`). Compositions diffusers has no pipeline for (T2I-Adapter with ControlNet, T2I
img2img) are checked against diffusers' ControlNet / img2img pipelines with diffusers' own adapter features
injected the same way.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import CALL, FAMILIES, assert_parity, fixed_latents, ipa_pipe

import ipa_rt
from ipa_rt import testing as T


@pytest.fixture(scope="module")
def t2i(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    out = {(fam, "full"): T.write_t2i_adapter(root / f"{fam}-full", models.base(fam), seed=5) for fam in FAMILIES}
    out[("sdxl", "full2")] = T.write_t2i_adapter(root / "sdxl-full2", models.base("sdxl"), seed=6)
    out[("sd15", "light_gray")] = T.write_t2i_adapter(
        root / "sd15-light", models.base("sd15"), seed=7, adapter_type="light_adapter", in_channels=1
    )
    return out


@contextlib.contextmanager
def inject(unet, **extra):
    """Every UNet call gets ``extra`` (values: functions of the call's batch rows) on top of its own kwargs."""
    forward = unet.forward

    def patched(sample, *args, **kwargs):
        for key, make in extra.items():
            value = make(sample.shape[0])
            kwargs[key] = {**(kwargs.get(key) or {}), **value} if isinstance(value, dict) else value
        return forward(sample, *args, **kwargs)

    unet.forward = patched
    try:
        yield
    finally:
        unet.forward = forward


def adapter_pipeline(models, family, adapters):
    """diffusers' T2I-Adapter pipeline of the family (MultiAdapter for several), IP-Adapter loaded."""
    from diffusers import (
        MultiAdapter,
        StableDiffusionAdapterPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLAdapterPipeline,
        T2IAdapter,
    )

    loaded = [T2IAdapter.from_pretrained(a) for a in adapters]
    adapter = MultiAdapter(loaded) if len(loaded) > 1 else loaded[0]
    if family == "sdxl":
        pipe = StableDiffusionXLAdapterPipeline.from_pretrained(models.base(family), adapter=adapter)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_ip_adapter(str(models.adapter_dir(family)), subfolder="", weight_name="plus.safetensors")
        return pipe, None
    pipe = StableDiffusionAdapterPipeline.from_pretrained(models.base(family), adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    ip = StableDiffusionPipeline.from_pretrained(models.base(family), unet=pipe.unet)  # the IP loader, same UNet
    ip.set_progress_bar_config(disable=True)
    ip.load_ip_adapter(str(models.adapter_dir(family)), subfolder="", weight_name="plus.safetensors")
    return pipe, ip


def reference(models, family, adapters, prompt, ip_image, ip_scale, **call):
    pipe, ip = adapter_pipeline(models, family, adapters)
    if ip is None:
        pipe.set_ip_adapter_scale(ip_scale)
        return pipe(prompt, ip_adapter_image=ip_image, **call).images
    ip.set_ip_adapter_scale(ip_scale)
    (embeds,) = ip.prepare_ip_adapter_image_embeds(ip_image, None, "cpu", 1, True)
    with inject(pipe.unet, added_cond_kwargs=lambda rows: {"image_embeds": [embeds]}):
        return pipe(prompt, **call).images


def diffusers_features(adapter_dirs, image, scales, size, cfg=True):
    """What diffusers' adapter pipelines feed the UNet: ``_preprocess_adapter_image``, MultiAdapter weights."""
    from diffusers import MultiAdapter, T2IAdapter
    from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_adapter import _preprocess_adapter_image

    loaded = [T2IAdapter.from_pretrained(a) for a in adapter_dirs]
    if len(loaded) > 1:
        states = MultiAdapter(loaded)([_preprocess_adapter_image(i, *size) for i in image], scales)
    else:
        states = [s * scales for s in loaded[0](_preprocess_adapter_image(image, *size))]
    return [torch.cat([s] * 2) if cfg else s for s in states]


CASES = {
    "one": dict(adapters=("full",), scale=0.8, factor=1.0),
    "one_factor": dict(adapters=("full",), scale=1.3, factor=0.5),
    "two": dict(adapters=("full", "full2"), scale=[0.8, 0.5], factor=1.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_sdxl_t2i_with_ip_adapter_matches_diffusers(models, images, t2i, case):
    c = CASES[case]
    dirs = [t2i[("sdxl", a)] for a in c["adapters"]]
    cond = [T.make_image(seed=10 + i, size=(32, 32)) for i in range(len(dirs))]
    cond = cond if len(cond) > 1 else cond[0]
    kw = dict(CALL, image=cond, adapter_conditioning_scale=c["scale"], adapter_conditioning_factor=c["factor"])
    want = reference(models, "sdxl", dirs, "a house", images[0], 0.6, latents=fixed_latents(), **kw)
    ours = ipa_pipe(models, "sdxl", models.adapter("sdxl", "plus"), t2i_adapter=dirs if len(dirs) > 1 else dirs[0])
    ours.set_ip_adapter_scale(0.6)
    got = ours("a house", ip_adapter_image=images[0], latents=fixed_latents(), **kw).images
    assert_parity(got, want)


@pytest.mark.parametrize("adapters", [("full",), ("full", "light_gray")])
def test_sd15_t2i_with_ip_adapter_matches_diffusers(models, images, t2i, adapters):
    """Two adapters: an RGB full adapter and a grayscale light adapter (one input channel) at once."""
    dirs = [t2i[("sd15", a)] for a in adapters]
    cond = [T.make_image(seed=20, size=(32, 32)), T.make_image(seed=21, size=(32, 32)).convert("L")][: len(dirs)]
    cond = cond if len(cond) > 1 else cond[0]
    scale = [0.9, 0.6][: len(dirs)] if len(dirs) > 1 else 0.9
    kw = dict(CALL, image=cond, adapter_conditioning_scale=scale)
    want = reference(models, "sd15", dirs, "a road", images[1], 0.7, latents=fixed_latents(), **kw)
    ours = ipa_pipe(models, "sd15", models.adapter("sd15", "plus"), t2i_adapter=dirs if len(dirs) > 1 else dirs[0])
    ours.set_ip_adapter_scale(0.7)
    got = ours("a road", ip_adapter_image=images[1], latents=fixed_latents(), **kw).images
    assert_parity(got, want)


@pytest.mark.slow
def test_t2i_scale_and_factor_are_live(models, images, t2i):
    """Scale and factor are tensor writes: one adapter run per request, the same buffers for every value."""
    from conftest import count_forwards

    dirs = [t2i[("sdxl", "full")], t2i[("sdxl", "full2")]]
    ours = ipa_pipe(models, "sdxl", models.adapter("sdxl", "plus"), t2i_adapter=dirs)
    ours.set_ip_adapter_scale(0.6)
    calls = count_forwards(first=ours.t2i.adapters[0])
    cond = [T.make_image(seed=3, size=(32, 32)), T.make_image(seed=4, size=(32, 32))]
    states = None
    for n, (scale, factor) in enumerate((([1.0, 0.2], 1.0), ([0.1, 1.3], 0.4), ([0.0, 0.0], 1.0)), start=1):
        kw = dict(CALL, image=cond, adapter_conditioning_scale=scale, adapter_conditioning_factor=factor)
        want = reference(models, "sdxl", dirs, "a road", images[1], 0.6, latents=fixed_latents(), **kw)
        got = ours("a road", ip_adapter_image=images[1], latents=fixed_latents(), **kw).images
        assert_parity(got, want)
        assert calls["first"] == n
        if states is None:
            states = list(ours.loop.states.values())
        assert list(ours.loop.states.values()) == states  # no new signature, buffers or graph
    assert ours.loop.captures == 0


@pytest.mark.slow
def test_t2i_with_controlnet(models, images, t2i, tmp_path):
    """Both structure inputs at once (``adapter_image=`` then), against diffusers' ControlNet pipeline with
    diffusers' adapter features in the UNet call."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    net = T.write_controlnet(tmp_path / "cn", models.base("sd15"), seed=5)
    ref = StableDiffusionControlNetPipeline.from_pretrained(
        models.base("sd15"), controlnet=ControlNetModel.from_pretrained(net)
    )
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(models.adapter_dir("sd15")), subfolder="", weight_name="plus.safetensors")
    control, cond = T.make_image(seed=30, size=(32, 32)), T.make_image(seed=31, size=(32, 32))
    feats = diffusers_features([t2i[("sd15", "full")]], cond, 0.7, (32, 32))
    ref.set_ip_adapter_scale(0.5)
    kw = dict(CALL, image=control, controlnet_conditioning_scale=0.8, ip_adapter_image=images[2])
    with inject(ref.unet, down_intrablock_additional_residuals=lambda rows: [f.clone() for f in feats]):
        want = ref("a car", latents=fixed_latents(), **kw).images
    ours = ipa_pipe(models, "sd15", models.adapter("sd15", "plus"), controlnet=net, t2i_adapter=t2i[("sd15", "full")])
    ours.set_ip_adapter_scale(0.5)
    got = ours("a car", latents=fixed_latents(), adapter_image=cond, adapter_conditioning_scale=0.7, **kw).images
    assert_parity(got, want)
    with pytest.raises(ipa_rt.ImageInputError, match="pass the T2I-Adapter image"):
        ours("a car", **kw)


@pytest.mark.slow
def test_t2i_img2img(models, images, t2i):
    """``image`` = init image, ``adapter_image`` = structure, against diffusers' img2img pipeline with its
    adapter's features in the UNet call."""
    from diffusers import StableDiffusionImg2ImgPipeline

    ref = StableDiffusionImg2ImgPipeline.from_pretrained(models.base("sd15"))
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(models.adapter_dir("sd15")), subfolder="", weight_name="plus.safetensors")
    init, cond = T.make_image(seed=40, size=(32, 32)), T.make_image(seed=41, size=(32, 32))
    feats = diffusers_features([t2i[("sd15", "full")]], cond, 1.1, (32, 32))
    ref.set_ip_adapter_scale(0.5)
    kw = dict(num_inference_steps=4, output_type="latent", strength=0.6, image=init, ip_adapter_image=images[0])
    with inject(ref.unet, down_intrablock_additional_residuals=lambda rows: [f.clone() for f in feats]):
        want = ref("a car", generator=torch.Generator().manual_seed(2), **kw).images
    ours = ipa_pipe(models, "sd15", models.adapter("sd15", "plus"), t2i_adapter=t2i[("sd15", "full")])
    ours.set_ip_adapter_scale(0.5)
    got = ours(
        "a car", adapter_image=cond, adapter_conditioning_scale=1.1, generator=torch.Generator().manual_seed(2), **kw
    ).images
    assert_parity(got, want)


def test_t2i_errors(models, images, t2i, tmp_path):
    plus = models.adapter("sd15", "plus")
    with pytest.raises(ipa_rt.IncompatibleAdapterError, match=r"t2i_adapter\[0\] gives features"):
        ipa_pipe(models, "sd15", plus, t2i_adapter=t2i[("sdxl", "full")])
    with pytest.raises(ipa_rt.CheckpointError, match=r"t2i_adapter\[0\] .* no config\.json"):
        ipa_pipe(models, "sd15", plus, t2i_adapter=tmp_path)
    pipe = ipa_pipe(models, "sd15", plus, t2i_adapter=[t2i[("sd15", "full")], t2i[("sd15", "light_gray")]])
    rgb, gray = T.make_image(seed=3, size=(32, 32)), T.make_image(seed=3, size=(32, 32)).convert("L")
    with pytest.raises(ipa_rt.ImageInputError, match="pass their condition image"):
        pipe("x", ip_adapter_image=images[0], **CALL)
    with pytest.raises(ipa_rt.ImageInputError, match="list of 2 images"):
        pipe("x", image=rgb, **CALL)
    with pytest.raises(ipa_rt.ImageInputError, match=r"adapter image 1 has shape \[1, 3, 32, 32\].*\[B, 1, H, W\]"):
        pipe("x", image=[rgb, rgb], **CALL)
    with pytest.raises(ipa_rt.ImageInputError, match="divisible by 16"):
        pipe("x", image=[rgb, gray], **dict(CALL, height=40, width=40))
    with pytest.raises(ipa_rt.ConfigError, match="adapter_conditioning_scale has 3 entries; expected 2"):
        pipe("x", image=[rgb, gray], adapter_conditioning_scale=[1, 1, 1], **CALL)
    with pytest.raises(ipa_rt.ConfigError, match=r"adapter_conditioning_factor is 1.5; expected a number in \[0, 1\]"):
        pipe("x", image=[rgb, gray], adapter_conditioning_factor=1.5, **CALL)
    with pytest.raises(ipa_rt.ImageInputError, match="adapter image 0 is a str"):
        pipe("x", image=["cat.png", gray], **CALL)
    from diffusers import T2IAdapter

    module = T2IAdapter.from_pretrained(t2i[("sd15", "full")])
    with pytest.raises(ipa_rt.ConfigError, match="needs t2i_adapter as folders, not loaded modules"):
        ipa_pipe(models, "sd15", plus, t2i_adapter=module, backend="onnxruntime")
    with pytest.raises(
        ipa_rt.ConfigError, match=r"t2i_adapter '.*' has no config\.json; expected a diffusers T2IAdapter"
    ):
        ipa_pipe(models, "sd15", plus, t2i_adapter=tmp_path, backend="onnxruntime")
    three = tmp_path / "xl-three"  # SDXL adapter without the mid-block feature: 3 features, not 4
    T2IAdapter(
        channels=[32, 64, 64], num_res_blocks=1, downscale_factor=4, adapter_type="full_adapter_xl"
    ).save_pretrained(three)
    with pytest.raises(ipa_rt.IncompatibleAdapterError, match=r"give \[4, 3\] features; expected the same count"):
        ipa_pipe(models, "sdxl", models.adapter("sdxl", "plus"), t2i_adapter=[t2i[("sdxl", "full")], three])
    plain = ipa_pipe(models, "sd15", plus)
    with pytest.raises(ipa_rt.ConfigError, match="no T2I-Adapter is loaded"):
        plain("x", adapter_image=rgb, **CALL)


def test_t2i_layout_table():
    """The variant table against diffusers' own modules: feature channels and strides of each adapter type."""
    from diffusers import T2IAdapter

    from ipa_rt.controls.t2i import feature_layout

    for kind, chans in (
        ("full_adapter", [8, 16, 16]),
        ("light_adapter", [8, 16]),
        ("full_adapter_xl", [8, 16, 16, 16]),
    ):
        adapter = T2IAdapter(in_channels=3, channels=chans, num_res_blocks=1, downscale_factor=4, adapter_type=kind)
        feats = adapter(torch.rand(1, 3, 64, 64))
        assert feature_layout(adapter.config) == [(f.shape[1], 64 // f.shape[-1]) for f in feats]
    with pytest.raises(ipa_rt.IncompatibleAdapterError, match="T2I-Adapter type 'odd' is unknown"):
        feature_layout({"adapter_type": "odd", "channels": [8], "downscale_factor": 8})


@pytest.fixture(scope="module")
def sdxl_structure_engines(models, t2i, tmp_path_factory):
    """SDXL + Plus adapter + one ControlNet + one T2I-Adapter, built by from_pretrained(backend="onnxruntime")."""
    import os

    root = tmp_path_factory.mktemp("sdxl-structure")
    net = T.write_controlnet(root / "controlnet", models.base("sdxl"), seed=5)
    old = os.environ.get("IPA_RT_CACHE")
    os.environ["IPA_RT_CACHE"] = str(root / "cache")
    try:
        pipe = ipa_rt.Pipeline.from_pretrained(
            models.base("sdxl"),
            models.adapter("sdxl", "plus"),
            controlnet=net,
            t2i_adapter=t2i[("sdxl", "full")],
            backend="onnxruntime",
            engine_options={"height": 32, "width": 32},
        )
    finally:
        os.environ.pop("IPA_RT_CACHE") if old is None else os.environ.__setitem__("IPA_RT_CACHE", old)
    pipe.set_progress_bar_config(disable=True)
    engines = next(p for p in (root / "cache").iterdir() if (p / "manifest.json").is_file())  # not kept exports
    return pipe, engines, net


@pytest.mark.slow
def test_sdxl_engine_with_t2i_and_controlnet_matches_diffusers(models, images, t2i, sdxl_structure_engines):
    """One engine set, two oracles: with the ControlNet at scale 0 it is diffusers' SDXL adapter pipeline; with it on,
    diffusers' SDXL ControlNet pipeline with diffusers' adapter features in the UNet call. Scales and the factor
    change between calls without touching an engine file or session."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from test_engines import snapshot

    pipe, folder, net = sdxl_structure_engines
    adapter = t2i[("sdxl", "full")]
    assert [a["origin"] for a in pipe.engine_manifest["t2i_adapters"]] == [str(adapter)]
    before, sessions = snapshot(folder), [id(pipe.t2i.adapters[0].engine), id(pipe.unet.engine)]
    cond, control = T.make_image(seed=50, size=(32, 32)), T.make_image(seed=51, size=(32, 32))
    pipe.set_ip_adapter_scale(0.6)
    for scale, factor in ((0.8, 1.0), (1.4, 0.5)):
        kw = dict(CALL, adapter_conditioning_scale=scale, adapter_conditioning_factor=factor)
        want = reference(
            models, "sdxl", [adapter], "a house", images[0], 0.6, latents=fixed_latents(), image=cond, **kw
        )
        got = pipe(
            "a house",
            ip_adapter_image=[images[0]],
            latents=fixed_latents(),
            image=control,
            adapter_image=cond,
            controlnet_conditioning_scale=0.0,
            **kw,
        ).images
        assert_parity(got, want, 1e-3)  # ONNX Runtime vs PyTorch kernels (observed ~1e-6), the bound
    ref = StableDiffusionXLControlNetPipeline.from_pretrained(
        models.base("sdxl"), controlnet=ControlNetModel.from_pretrained(net)
    )
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(models.adapter_dir("sdxl")), subfolder="", weight_name="plus.safetensors")
    ref.set_ip_adapter_scale(0.6)
    feats = diffusers_features([adapter], cond, 0.9, (32, 32))
    kw = dict(CALL, image=control, controlnet_conditioning_scale=0.7, ip_adapter_image=images[1])
    with inject(ref.unet, down_intrablock_additional_residuals=lambda rows: [f.clone() for f in feats]):
        want = ref("a road", latents=fixed_latents(), **kw).images
    kw["ip_adapter_image"] = [images[1]]
    got = pipe("a road", latents=fixed_latents(), adapter_image=cond, adapter_conditioning_scale=0.9, **kw).images
    assert_parity(got, want, 1e-3)
    assert snapshot(folder) == before and sessions == [id(pipe.t2i.adapters[0].engine), id(pipe.unet.engine)]


@pytest.mark.slow
def test_build_cli_with_t2i_adapter_is_up_to_date(models, t2i, sdxl_structure_engines, capsys):
    from ipa_rt import cli

    _, folder, net = sdxl_structure_engines
    argv = ["build", str(models.base("sdxl")), "--ip-adapter", str(models.adapter("sdxl", "plus"))]
    argv += ["--controlnet", str(net), "--t2i-adapter", str(t2i[("sdxl", "full")])]
    assert cli.main([*argv, "--height", "32", "--width", "32", "-o", str(folder)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert cli.main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "T2I-Adapter [0] from" in out and "full_adapter_xl, 4 features" in out
