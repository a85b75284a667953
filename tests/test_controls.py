"""Live controls: presets, per-step ranges, scale changes — diffusers parity and "never rebuild"."""

from __future__ import annotations

import pytest
import torch
from conftest import CALL, FAMILY_CASES, assert_parity, diffusers_pipe, fixed_latents, ipa_pipe

import ipa_rt
from ipa_rt.adapters.scale import PRESETS


@pytest.mark.parametrize(
    "preset",
    [
        "style",
        pytest.param("composition", marks=pytest.mark.slow),
        pytest.param("style_and_composition", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("family", FAMILY_CASES)
def test_presets_match_the_equivalent_dict(models, images, family, preset):
    ref = diffusers_pipe(models, family, ["base.safetensors"])
    ref.set_ip_adapter_scale(PRESETS[family][preset])
    ours = ipa_pipe(models, family, models.adapter(family, "base"))
    ours.set_ip_adapter_scale(preset)
    a = ref("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **CALL).images
    b = ours("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **CALL).images
    assert_parity(b, a)
    assert ipa_rt.scale_preset(preset, family, 0.5) != PRESETS[family][preset]


@pytest.mark.parametrize("scheduler", ["ddim", None])  # tensor program and eager loop
@pytest.mark.parametrize("family", FAMILY_CASES)
def test_step_range_matches_diffusers_with_a_scale_callback(models, images, family, scheduler):
    """Adapter 0 acts on steps [0.25, 0.75) of 4, adapter 1 on all: diffusers reproduces it by switching
    scales in callback_on_step_end; ipa_rt does it with its per-step gate tensor."""
    steps, ranges = 4, [(0.25, 0.75), (0.0, 1.0)]
    ref = diffusers_pipe(models, family, ["base.safetensors", "plus.safetensors"])
    adapters = [models.adapter(family, "base"), models.adapter(family, "plus")]
    ours = ipa_pipe(models, family, adapters, scheduler=scheduler)
    if scheduler:
        ref.scheduler = type(ours.scheduler).from_config(ours.scheduler.config)

    def active(i, n):  # n: model evaluations in the schedule (PNDM makes steps + 1)
        return [0.8 if lo <= i / n < hi else 0.0 for lo, hi in ranges[:1]] + [0.6]

    def callback(pipe, i, t, kwargs):
        pipe.set_ip_adapter_scale(active(i + 1, pipe._num_timesteps))
        return kwargs

    ref.set_ip_adapter_scale(active(0, steps))
    imgs = [images[0], images[1]]
    call = {**CALL, "num_inference_steps": steps}
    a = ref("a cat", ip_adapter_image=imgs, latents=fixed_latents(), callback_on_step_end=callback, **call).images
    ours.set_ip_adapter_scale([0.8, 0.6])
    ours.set_ip_adapter_step_range(ranges)
    b = ours("a cat", ip_adapter_image=imgs, latents=fixed_latents(), **call).images
    assert_parity(b, a)


def test_controls_never_rebuild(models, images):
    """Scale, step range, guidance and a new reference image (same token count) reuse every buffer."""
    pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "plus"), scheduler="ddim")
    call = {**CALL, "num_inference_steps": 4}
    first = pipe("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **call).images
    procs = dict(pipe.unet.attn_processors)
    (state,) = pipe.loop.states.values()
    buffers = (state.latents.data_ptr(), state.text.data_ptr(), state.gate.data_ptr())
    outs = []
    for change in (
        lambda: pipe.set_ip_adapter_scale(1.7),
        lambda: pipe.set_ip_adapter_step_range((0.5, 1.0)),
        lambda: pipe.set_ip_adapter_scale("style"),
    ):
        change()
        outs.append(pipe("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **call).images)
    outs.append(pipe("a cat", ip_adapter_image=images[1], latents=fixed_latents(), guidance_scale=3.0, **call).images)
    assert len(pipe.loop.states) == 1  # one signature, one set of static buffers
    (again,) = pipe.loop.states.values()
    assert again is state and (state.latents.data_ptr(), state.text.data_ptr(), state.gate.data_ptr()) == buffers
    assert all(procs[k] is v for k, v in pipe.unet.attn_processors.items())
    assert pipe.loop.captures == (1 if pipe.device.type == "cuda" else 0)
    for out in outs:  # every control really changed the result
        assert not torch.equal(out, first)


def test_bad_step_ranges(models):
    pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "base"))
    with pytest.raises(ipa_rt.ScaleError, match=r"step range \[0\] is \(0.8, 0.2\); expected 0 <= start < end <= 1"):
        pipe.set_ip_adapter_step_range((0.8, 0.2))
    with pytest.raises(ipa_rt.ScaleError, match=r"list of 2 entries; expected 1"):
        pipe.set_ip_adapter_step_range([(0.0, 1.0), (0.0, 0.5)])
    with pytest.raises(ipa_rt.ScaleError, match=r"preset 'sketch' is unknown"):
        pipe.set_ip_adapter_scale("sketch")


@pytest.mark.slow
def test_static_buffers_survive_shape_changes(models, images, tmp_path):
    """What a captured CUDA graph relies on: when a request shape comes back after another one, every tensor the
    step reads (image keys/values, masks, per-image scales, control images, T2I features) is the very buffer the
    first request of that shape filled, rewritten in place with the new request's values."""
    from test_masks import masks

    from ipa_rt import testing as T

    net = T.write_controlnet(tmp_path / "cn", models.base("sd15"))
    adapter = T.write_t2i_adapter(tmp_path / "t2i", models.base("sd15"))
    pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "plus"), controlnet=net, t2i_adapter=adapter)
    ctx, small, large = pipe.adapters.context, T.make_image(seed=1, size=(32, 32)), T.make_image(seed=2, size=(48, 48))

    def request(refs, structure, scale, mask=None):
        extra = {"cross_attention_kwargs": {"ip_adapter_masks": [mask]}} if mask is not None else {}
        pipe.set_ip_adapter_scale(scale)
        size = structure.size[0]
        pipe(
            "x",
            ip_adapter_image=[refs],
            image=structure,
            adapter_image=structure,
            **dict(CALL, height=size, width=size),
            **extra,
        )
        return (
            [t for kv in ctx.kv for t in kv],
            list(ctx.masks.values()),
            ctx.seg_mult,
            pipe.control.images,
            pipe.t2i.features,
        )

    def same(a, b):
        return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))

    kv1, _, _, cn1, t2i1 = request(images[0], small, 0.5)
    first = [t.clone() for t in kv1]
    request([images[1], images[2]], large, 0.5)  # other token count, other size
    kv2, _, _, cn2, t2i2 = request(images[1], small, 0.5)
    assert same(kv1, kv2) and same(cn1, cn2) and same(t2i1[0], t2i2[0])
    assert any(not torch.equal(a, b) for a, b in zip(first, kv2, strict=True))  # rewritten in place
    m1 = masks()
    _, masks1, mult1, _, _ = request([images[0], images[1]], small, [[0.7, 0.4]], m1)
    request(images[0], small, 0.5)
    _, masks2, mult2, _, _ = request([images[0], images[1]], small, [[0.2, 0.9]], m1.flip(-1))
    assert same(masks1, masks2) and mult1 is mult2 and mult2[0, 0].item() == pytest.approx(0.2)
