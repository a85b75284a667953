"""``pipe.batch([...])``: several requests, each with its own prompt, references, scale, seed and guidance, in one
UNet batch. Row i of a batched call must equal request i run alone through ``pipe(...)`` (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    BATCH_RTOL,
    CALL,
    KERNEL_DEVICE,
    SIZE,
    assert_parity,
    assert_rows_equal_alone,
    gen,
    ipa_pipe,
    mixed_requests,
)

import ipa_rt
from ipa_rt.kernels import fused_available


@pytest.mark.parametrize("attention", ["sdpa", pytest.param("triton", marks=pytest.mark.slow)])
def test_sd15_batched_rows_equal_requests_alone(models, images, attention):
    if attention == "triton" and fused_available(torch.device(KERNEL_DEVICE), torch.float32, 8) is not None:
        pytest.skip("the Triton kernel cannot run here (no CUDA and TRITON_INTERPRET is not 1)")
    adapters = [models.adapter("sd15", "base"), models.adapter("sd15", "plus")]
    pipe = ipa_pipe(models, "sd15", adapters, attention=attention, device=KERNEL_DEVICE)
    requests, call = mixed_requests(images), dict(CALL, num_inference_steps=2)
    if attention == "triton" and KERNEL_DEVICE == "cpu":  # the interpreter is slow: an image and a text-only row,
        requests, call = requests[:2], dict(CALL, num_inference_steps=1, height=16, width=16)  # small and short
    assert_rows_equal_alone(pipe, requests, **call)


@pytest.mark.slow
def test_sdxl_batched_rows_equal_requests_alone(models, images):
    pipe = ipa_pipe(models, "sdxl", [models.adapter("sdxl", "plus")], scheduler="euler_a")  # draws noise per step
    assert_rows_equal_alone(pipe, mixed_requests(images, two_adapters=False)[:3], **CALL)


def test_lcm_batched_rows_have_their_own_guidance_embedding(models, images):
    """An LCM UNet takes guidance as an embedding (no CFG rows): per request, as alone."""
    pipe = ipa_pipe(models, "sd15", [models.adapter("sd15", "base")], base=models.root / "sd15-lcm", scheduler="lcm")
    requests = [
        dict(prompt="a cat", ip_adapter_image=images[0], ip_adapter_scale=0.6, seed=5, guidance_scale=8.0),
        dict(prompt="a dog", ip_adapter_image=images[1], ip_adapter_scale=1.2, seed=6, guidance_scale=1.5),
    ]
    assert_rows_equal_alone(pipe, requests, **dict(CALL, num_inference_steps=4))


def test_img2img_requests_batch_with_their_own_init_images(models, images):
    pipe = ipa_pipe(models, "sd15", [models.adapter("sd15", "base")])
    init = [im.resize((SIZE, SIZE)) for im in images]
    requests = [
        dict(prompt="a cat", image=init[0], ip_adapter_image=images[1], ip_adapter_scale=0.5, seed=7),
        dict(prompt="a dog", image=init[2], seed=8),
    ]
    assert_rows_equal_alone(pipe, requests, **dict(CALL, strength=0.7))


def test_batched_scale_leaves_the_pipeline_scale_alone_and_decodes_per_request(models, images):
    pipe = ipa_pipe(models, "sd15", [models.adapter("sd15", "base")])
    pipe.set_ip_adapter_scale(0.4)
    before = pipe.adapters.scale.clone()
    common = dict(CALL, output_type="pil")
    outs = pipe.batch([
        dict(prompt="a", ip_adapter_image=images[0], ip_adapter_scale=1.5, generator=gen(1), **common),
        dict(prompt="b", ip_adapter_image=images[1], num_images_per_prompt=2, generator=gen(2), **common),
    ])  # fmt: skip
    assert [len(o.images) for o in outs] == [1, 2] and outs[1].images[0].size == (SIZE, SIZE)
    assert torch.equal(pipe.adapters.scale, before)  # a request's scale is its own
    assert pipe.adapters.context.scale is pipe.adapters.scale  # the processors read the pipeline's table again
    again = pipe("b", ip_adapter_image=images[1], num_images_per_prompt=2, generator=gen(2), **CALL).images
    rows = pipe.batch([dict(prompt="b", ip_adapter_image=images[1], num_images_per_prompt=2, generator=gen(2), **CALL)])
    assert_parity(rows[0].images, again, tol=BATCH_RTOL)  # the pipeline's own scale (0.4) when a request names none


@pytest.mark.parametrize(
    ("requests", "error", "match"),
    [
        ([], ipa_rt.ConfigError, "non-empty list"),
        ([{"prompt": "a", "colour": 1}], ipa_rt.ConfigError, r"request \[0\] has unknown argument\(s\) \['colour'\]"),
        ([{"prompt": "a"}, {"prompt": "b", "num_inference_steps": 5}], ipa_rt.ConfigError,
         r"request \[1\] has num_inference_steps=5 but request \[0\] has 3"),
        ([{"prompt": "a"}, {"prompt": "b", "guidance_scale": 1.0}], ipa_rt.ConfigError,
         r"request \[1\] is txt2img with guidance off"),
        ([{"prompt": "a", "cross_attention_kwargs": {"ip_adapter_masks": []}}], ipa_rt.ConfigError,
         "passes cross_attention_kwargs"),
        ([{"prompt": "a", "ip_adapter_image": "IMG", "ip_adapter_scale": [0.5, 0.5]}], ipa_rt.ScaleError,
         r"request \[0\] ip_adapter_scale: .*expected 1"),
        ([{"prompt": "a", "ip_adapter_image": "IMG", "ip_adapter_scale": {"up": {"block_9": 1.0}}}], ipa_rt.ScaleError,
         r"request \[0\] ip_adapter_scale: .*block_9"),
        ([{"prompt": "a", "ip_adapter_image": [["IMG", "IMG"]]}, {"prompt": "b", "ip_adapter_image": "IMG"}],
         ipa_rt.ConfigError, r"request \[1\] gives IP-Adapter 0 embeddings .* same number of reference images"),
        ([{"prompt": "a", "image": "IMG"}, {"prompt": "b"}], ipa_rt.ConfigError, r"request \[1\] is txt2img"),
    ],
)  # fmt: skip
def test_batch_errors_name_the_request_and_argument(models, images, requests, error, match):
    pipe = ipa_pipe(models, "sd15", [models.adapter("sd15", "base")])

    def real(value):
        return [real(v) for v in value] if isinstance(value, list) else (images[0] if value == "IMG" else value)

    requests = [{k: real(v) if k in ("ip_adapter_image", "image") else v for k, v in r.items()} for r in requests]
    requests = [{"num_inference_steps": 3, **r, "height": SIZE, "width": SIZE} for r in requests]
    with pytest.raises(error, match=match):
        pipe.batch(requests)
