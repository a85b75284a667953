"""ControlNet + IP-Adapter on the torch backend against diffusers' ControlNet pipelines (same files and latents)."""

from __future__ import annotations

import pytest
import torch
from conftest import CALL, FAMILIES, FAMILY_CASES, assert_parity, fixed_latents, ipa_pipe, scoped_env
from test_modes import make_mask

import ipa_rt
from ipa_rt import testing as T


@pytest.fixture(scope="module")
def controlnets(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    return {
        (fam, seed): T.write_controlnet(root / f"{fam}-{seed}", models.base(fam), seed=seed)
        for fam in FAMILIES
        for seed in (5, 6)
    }


def reference(models, family, nets):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    cls = StableDiffusionXLControlNetPipeline if family == "sdxl" else StableDiffusionControlNetPipeline
    loaded = [ControlNetModel.from_pretrained(n) for n in nets]
    pipe = cls.from_pretrained(models.base(family), controlnet=loaded if len(loaded) > 1 else loaded[0])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(models.adapter_dir(family)), subfolder="", weight_name="plus.safetensors")
    return pipe


CASES = {
    "one": dict(nets=(5,), scale=0.8, start=0.0, end=1.0, guess=False),
    "two_with_ranges": dict(nets=(5, 6), scale=[0.8, 0.5], start=[0.0, 0.3], end=[0.7, 1.0], guess=False),
    "guess_mode": dict(nets=(5,), scale=0.9, start=0.0, end=1.0, guess=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", FAMILY_CASES)
def test_controlnet_with_ip_adapter_matches_diffusers(models, images, controlnets, family, case):
    c = CASES[case]
    nets = [controlnets[(family, s)] for s in c["nets"]]
    ref = reference(models, family, nets)
    ours = ipa_pipe(models, family, models.adapter(family, "plus"), controlnet=nets if len(nets) > 1 else nets[0])
    control = [T.make_image(seed=10 + s, size=(32, 32)) for s in c["nets"]]
    control = control if len(control) > 1 else control[0]
    kw = dict(
        CALL,
        image=control,
        ip_adapter_image=images[0],
        controlnet_conditioning_scale=c["scale"],
        control_guidance_start=c["start"],
        control_guidance_end=c["end"],
        guess_mode=c["guess"],
    )
    for p in (ref, ours):
        p.set_ip_adapter_scale(0.6)
    want = ref("a house", latents=fixed_latents(), **kw).images
    got = ours("a house", latents=fixed_latents(), **kw).images
    assert_parity(got, want)


def test_control_scale_changes_are_live(models, images, controlnets):
    """Conditioning scale and guidance range are tensor writes: the same static buffers serve every value."""
    nets = [controlnets[("sd15", 5)], controlnets[("sd15", 6)]]
    ref = reference(models, "sd15", nets)
    ours = ipa_pipe(models, "sd15", models.adapter("sd15", "plus"), controlnet=nets)
    control = [T.make_image(seed=3, size=(32, 32)), T.make_image(seed=4, size=(32, 32))]
    states = None
    for scale, end in (([1.0, 0.2], 1.0), ([0.1, 1.3], 0.6), ([0.0, 0.0], 1.0)):
        kw = dict(CALL, image=control, ip_adapter_image=images[1], controlnet_conditioning_scale=scale)
        kw["control_guidance_end"] = end
        want = ref("a road", latents=fixed_latents(), **kw).images
        got = ours("a road", latents=fixed_latents(), **kw).images
        assert_parity(got, want)
        if states is None:
            states = list(ours.loop.states.values())
        assert list(ours.loop.states.values()) == states  # no new signature, buffers or graph
    assert ours.loop.captures == 0


def test_controlnet_errors(models, images, controlnets, tmp_path):
    with pytest.raises(ipa_rt.IncompatibleAdapterError, match=r"controlnet\[0\] has cross_attention_dim"):
        ipa_pipe(models, "sd15", models.adapter("sd15", "base"), controlnet=controlnets[("sdxl", 5)])
    with pytest.raises(ipa_rt.CheckpointError, match=r"no config\.json"):
        ipa_pipe(models, "sd15", models.adapter("sd15", "base"), controlnet=tmp_path)
    cn = ipa_pipe(models, "sd15", models.adapter("sd15", "base"), controlnet=controlnets[("sd15", 5)])
    with pytest.raises(ipa_rt.ImageInputError, match="ControlNet inpainting takes the init image as image="):
        cn("x", image=images[0], mask_image=images[1], **CALL)
    pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "base"), controlnet=[controlnets[("sd15", 5)]] * 2)
    control = T.make_image(seed=3, size=(32, 32))
    with pytest.raises(ipa_rt.ImageInputError, match="pass their control image"):
        pipe("x", ip_adapter_image=images[0], **CALL)
    with pytest.raises(ipa_rt.ImageInputError, match="list of 2 control images"):
        pipe("x", image=control, ip_adapter_image=images[0], **CALL)
    with pytest.raises(ipa_rt.ConfigError, match="controlnet_conditioning_scale has 3 entries; expected 2"):
        pipe("x", image=[control] * 2, controlnet_conditioning_scale=[1, 1, 1], **CALL)
    with pytest.raises(ipa_rt.ConfigError, match="expected 0 <= start < end <= 1"):
        pipe("x", image=[control] * 2, control_guidance_start=0.8, control_guidance_end=0.2, **CALL)
    plain = ipa_pipe(models, "sd15", models.adapter("sd15", "base"))
    with pytest.raises(ipa_rt.ConfigError, match="no ControlNet is loaded"):
        plain("x", control_image=control, **CALL)


@pytest.fixture(scope="module")
def control_engines(models, controlnets, tmp_path_factory):
    """SD1.5 + Plus adapter + two ControlNets, built transparently by from_pretrained(backend="onnxruntime")."""
    cache = tmp_path_factory.mktemp("cn-engines")
    with scoped_env(IPA_RT_CACHE=str(cache)):
        pipe = ipa_rt.Pipeline.from_pretrained(
            models.base("sd15"),
            models.adapter("sd15", "plus"),
            controlnet=[controlnets[("sd15", 5)], controlnets[("sd15", 6)]],
            backend="onnxruntime",
            engine_options={"height": 32, "width": 32},
        )
    return pipe, next(p for p in cache.iterdir() if (p / "manifest.json").is_file())  # not the kept exports


@pytest.mark.slow
def test_controlnet_engine_matches_diffusers_and_scales_are_inputs(models, images, controlnets, control_engines):
    from test_engines import snapshot

    pipe, folder = control_engines
    pipe.set_progress_bar_config(disable=True)
    assert [c["origin"] for c in pipe.engine_manifest["controlnets"]] == [
        str(controlnets[("sd15", 5)]),
        str(controlnets[("sd15", 6)]),
    ]
    ref = reference(models, "sd15", [controlnets[("sd15", 5)], controlnets[("sd15", 6)]])
    control = [T.make_image(seed=21, size=(32, 32)), T.make_image(seed=22, size=(32, 32))]
    before = snapshot(folder)
    sessions = [id(n.engine) for n in pipe.control.nets]
    for scale, end, guess in (([0.8, 0.5], [1.0, 0.6], False), ([0.2, 1.4], 1.0, False), ([0.9, 0.7], 1.0, True)):
        kw = dict(CALL, image=control, controlnet_conditioning_scale=scale, control_guidance_end=end, guess_mode=guess)
        for p in (ref, pipe):
            p.set_ip_adapter_scale(0.6)
        want = ref("a house", ip_adapter_image=images[0], latents=fixed_latents(), **kw).images
        got = pipe("a house", ip_adapter_image=[images[0]], latents=fixed_latents(), **kw).images
        assert_parity(got, want, 1e-3)  # ONNX Runtime vs PyTorch kernels (observed ~1e-6), the bound
    assert snapshot(folder) == before and sessions == [id(n.engine) for n in pipe.control.nets]


@pytest.mark.slow
def test_build_cli_with_controlnets_is_up_to_date(models, controlnets, control_engines, capsys):
    from ipa_rt import cli

    _, folder = control_engines
    argv = ["build", str(models.base("sd15")), "--ip-adapter", str(models.adapter("sd15", "plus"))]
    argv += ["--controlnet", str(controlnets[("sd15", 5)]), "--controlnet", str(controlnets[("sd15", 6)])]
    assert cli.main([*argv, "--height", "32", "--width", "32", "-o", str(folder)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert cli.main(["inspect", str(folder)]) == 0
    assert "ControlNet [1] from" in capsys.readouterr().out


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_controlnet_img2img_matches_diffusers(models, images, controlnets, family):
    """``image`` = init image, ``control_image`` = structure: diffusers' ControlNet img2img pipelines, seeded."""
    import diffusers
    from diffusers import ControlNetModel

    name = (
        "StableDiffusionXLControlNetImg2ImgPipeline" if family == "sdxl" else "StableDiffusionControlNetImg2ImgPipeline"
    )
    net = controlnets[(family, 5)]
    ref = getattr(diffusers, name).from_pretrained(models.base(family), controlnet=ControlNetModel.from_pretrained(net))
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(models.adapter_dir(family)), subfolder="", weight_name="plus.safetensors")
    ours = ipa_pipe(models, family, models.adapter(family, "plus"), controlnet=net)
    init, control = T.make_image(seed=31, size=(32, 32)), T.make_image(seed=32, size=(32, 32))
    for strength in (None, 0.6):  # None: diffusers' ControlNet img2img default (0.8 for both families)
        kw = dict(num_inference_steps=4, output_type="latent", controlnet_conditioning_scale=0.7)
        kw |= {"strength": strength} if strength else {}
        for p in (ref, ours):
            p.set_ip_adapter_scale(0.6)
        call = dict(kw, image=init, control_image=control, ip_adapter_image=images[2])
        want = ref("a car", generator=torch.Generator().manual_seed(2), **call).images
        got = ours("a car", generator=torch.Generator().manual_seed(2), **call).images
        assert_parity(got, want)


@pytest.mark.slow
def test_controlnet_img2img_through_engines(models, images, controlnets, control_engines):
    import diffusers
    from diffusers import ControlNetModel

    pipe, _ = control_engines
    nets = [controlnets[("sd15", 5)], controlnets[("sd15", 6)]]
    ref = diffusers.StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
        models.base("sd15"), controlnet=[ControlNetModel.from_pretrained(n) for n in nets]
    )
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(models.adapter_dir("sd15")), subfolder="", weight_name="plus.safetensors")
    init, control = T.make_image(seed=41, size=(32, 32)), [T.make_image(seed=s, size=(32, 32)) for s in (42, 43)]
    kw = dict(num_inference_steps=4, output_type="latent", controlnet_conditioning_scale=[0.7, 0.4], strength=0.7)
    for p in (ref, pipe):
        p.set_ip_adapter_scale(0.5)
    want = ref(
        "a car",
        image=init,
        control_image=control,
        ip_adapter_image=images[2],
        generator=torch.Generator().manual_seed(2),
        **kw,
    ).images
    got = pipe(
        "a car",
        image=init,
        control_image=control,
        ip_adapter_image=[images[2]],
        generator=torch.Generator().manual_seed(2),
        **kw,
    ).images
    assert_parity(got, want, 1e-3)


def _inpaint_reference(models, family, base, nets):
    import diffusers
    from diffusers import ControlNetModel

    name = (
        "StableDiffusionXLControlNetInpaintPipeline" if family == "sdxl" else "StableDiffusionControlNetInpaintPipeline"
    )
    loaded = [ControlNetModel.from_pretrained(n) for n in nets]
    ref = getattr(diffusers, name).from_pretrained(base, controlnet=loaded if len(loaded) > 1 else loaded[0])
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(models.adapter_dir(family)), subfolder="", weight_name="plus.safetensors")
    return ref


@pytest.mark.parametrize("channels", [4, 9])
@pytest.mark.parametrize("family", FAMILY_CASES)
def test_controlnet_inpaint_matches_diffusers(models, images, controlnets, family, channels):
    """``image`` = init, ``mask_image``, ``control_image``: diffusers' ControlNet inpaint pipelines (their default
    strength and guidance), on a 4-channel UNet (blend after each step) and a 9-channel inpainting UNet (the
    ControlNet sees the 4 latent channels), seeded."""
    base = models.base(family) if channels == 4 else models.root / f"{family}-inpaint"
    net = controlnets[(family, 5)]
    ref = _inpaint_reference(models, family, base, [net])
    ours = ipa_pipe(models, family, models.adapter(family, "plus"), controlnet=net, base=base)
    init, control = T.make_image(seed=61, size=(32, 32)), T.make_image(seed=62, size=(32, 32))
    mask = make_mask()
    for guess in (False, True):
        call = dict(num_inference_steps=3, output_type="latent", controlnet_conditioning_scale=0.7, guess_mode=guess)
        call |= dict(image=init, mask_image=mask, control_image=control, ip_adapter_image=images[0])
        for p in (ref, ours):
            p.set_ip_adapter_scale(0.6)
        want = ref("a car", generator=torch.Generator().manual_seed(4), **call).images
        got = ours("a car", generator=torch.Generator().manual_seed(4), **call).images
        assert_parity(got, want)


@pytest.mark.slow
def test_controlnet_inpaint_through_engines(models, images, controlnets, control_engines):
    nets = [controlnets[("sd15", 5)], controlnets[("sd15", 6)]]
    ref = _inpaint_reference(models, "sd15", models.base("sd15"), nets)
    pipe, _ = control_engines
    init, control = T.make_image(seed=71, size=(32, 32)), [T.make_image(seed=s, size=(32, 32)) for s in (72, 73)]
    mask = make_mask()
    call = dict(num_inference_steps=3, output_type="latent", controlnet_conditioning_scale=[0.7, 0.4], strength=0.8)
    call |= dict(image=init, mask_image=mask, control_image=control)
    for p in (ref, pipe):
        p.set_ip_adapter_scale(0.5)
    want = ref("a car", ip_adapter_image=images[1], generator=torch.Generator().manual_seed(4), **call).images
    got = pipe("a car", ip_adapter_image=[images[1]], generator=torch.Generator().manual_seed(4), **call).images
    assert_parity(got, want, 1e-3)
