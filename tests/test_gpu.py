"""GPU-only checks (marked ``gpu``; skipped without CUDA): graph replay, no recapture, no host sync."""

from __future__ import annotations

import pytest
import torch
from conftest import CALL, fixed_latents, ipa_pipe, rel_l2

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
FP16_RTOL = 5e-3  # fp16 graph vs fp16 eager: same kernels, so only launch-order / workspace differences


def cuda_pipe(models, **kw):
    return ipa_pipe(models, "sd15", models.adapter("sd15", "plus"), device="cuda", dtype=torch.float16, **kw)


def test_graph_replay_equals_eager(models, images):
    pipe = cuda_pipe(models, scheduler="dpm++2m")
    call = {**CALL, "num_inference_steps": 4}
    lat = fixed_latents().cuda().half()
    graphed = pipe("a cat", ip_adapter_image=images[0], latents=lat.clone(), **call).images
    pipe.loop.use_graphs = False
    pipe.loop.states.clear()
    eager = pipe("a cat", ip_adapter_image=images[0], latents=lat.clone(), **call).images
    assert torch.isfinite(graphed).all()
    assert rel_l2(graphed.float(), eager.float()) <= FP16_RTOL


def test_no_recapture_and_no_sync_across_controls(models, images):
    pipe = cuda_pipe(models, scheduler="lcm")
    call = {**CALL, "num_inference_steps": 4, "guidance_scale": 1.0}
    pipe("a cat", ip_adapter_image=images[0], latents=fixed_latents().cuda().half(), **call)
    assert pipe.loop.captures == 1
    (state,) = pipe.loop.states.values()
    for change in (lambda: pipe.set_ip_adapter_scale(0.3), lambda: pipe.set_ip_adapter_step_range((0.25, 1.0))):
        change()
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside the loop raises
        try:
            for _ in range(state.steps):
                state.graph.replay()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        pipe("a cat", ip_adapter_image=images[1], latents=fixed_latents().cuda().half(), **call)
    assert pipe.loop.captures == 1


def test_graphed_encoder_and_decoder_equal_eager(models, images):
    pipe = cuda_pipe(models)
    z = fixed_latents().cuda().half()
    graphed = pipe._decoder(z)
    assert len(pipe._decoder.graphs) == 1
    eager = pipe.vae.decode(z, return_dict=False)[0]
    assert rel_l2(graphed.float(), eager.float()) <= FP16_RTOL
    px = torch.randn(1, 3, 32, 32, device="cuda", dtype=torch.float16)
    runner = pipe.conditioner.runner
    assert (
        rel_l2(
            runner("hidden_states", px).float(), runner.encoder(px, output_hidden_states=True).hidden_states[-2].float()
        )
        <= FP16_RTOL
    )
