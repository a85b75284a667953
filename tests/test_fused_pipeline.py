"""Tier 3 for the fused kernel: whole pipelines with attention="triton" against diffusers and SDPA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CALL, assert_parity, diffusers_pipe, fixed_latents, ipa_pipe

import ipa_rt
from ipa_rt.kernels import fused_available

needs_kernel = pytest.mark.skipif(
    fused_available(torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.float32, 64) is not None,
    reason="the Triton kernel cannot run here (no CUDA and TRITON_INTERPRET is not 1, or triton missing)",
)
FAST = {**CALL, "num_inference_steps": 2}


@needs_kernel
@pytest.mark.parametrize(
    ("family", "variants", "scale"),
    [("sd15", ["base", "full"], [0.6, 1.2]), ("sdxl", ["plus"], {"up": {"block_0": [0.0, 1.0, 0.0]}})],
)
def test_triton_pipeline_matches_diffusers(models, images, family, variants, scale):
    imgs = [images[0], [images[1], images[2]]][: len(variants)]
    ref_pipe = diffusers_pipe(models, family, [f"{v}.safetensors" for v in variants])
    ref_pipe.set_ip_adapter_scale(scale if len(variants) > 1 else [scale])
    ref = ref_pipe("a cat", ip_adapter_image=imgs, latents=fixed_latents(), **FAST).images
    ours = ipa_pipe(models, family, [models.adapter(family, v) for v in variants], attention="triton")
    assert all(p.fused for p in ours.adapters._processors)
    ours.set_ip_adapter_scale(scale)
    out = ours("a cat", ip_adapter_image=imgs, latents=fixed_latents(), **FAST).images
    assert_parity(out, ref)
    ours.set_ip_adapter_scale(0.0)  # scale 0 through the kernel: exactly the text-only result's path
    zero = ours("a cat", ip_adapter_image=imgs, latents=fixed_latents(), **FAST).images
    no_adapter = diffusers_pipe(models, family)("a cat", latents=fixed_latents(), **FAST).images
    assert_parity(zero, no_adapter)


def test_auto_is_sdpa_on_cpu(models):
    pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "base"))
    expected = torch.cuda.is_available()
    assert all(p.fused == expected for p in pipe.adapters._processors)


def test_kill_switch_forces_sdpa(models, monkeypatch):
    monkeypatch.setenv("IPA_RT_DISABLE_TRITON", "1")
    with pytest.warns(UserWarning, match="falls back to SDPA.*IPA_RT_DISABLE_TRITON"):
        pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "base"), attention="triton")
    assert not any(p.fused for p in pipe.adapters._processors)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal without the interpreter")
def test_triton_on_cpu_without_interpreter_is_refused(models, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ipa_rt.ConfigError, match=r"attention='triton' cannot run here.*TRITON_INTERPRET=1"):
        ipa_pipe(models, "sd15", models.adapter("sd15", "base"), attention="triton")
    with pytest.raises(ipa_rt.ConfigError, match=r"attention 'flash' is unknown"):
        ipa_pipe(models, "sd15", models.adapter("sd15", "base"), attention="flash")


def test_layer_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    """The fused layer exports as standard ONNX ops (MatMul/Softmax/Where...) with the scale as an input."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from diffusers.models.attention_processor import Attention

    from ipa_rt.attention import DecoupledCrossAttnProcessor, ImageContext

    class Layer(torch.nn.Module):
        """One SD1.5-shaped cross-attention layer (head dim 40) with image K/V and scales as inputs."""

        def __init__(self):
            super().__init__()
            self.attn = Attention(query_dim=80, cross_attention_dim=32, heads=2, dim_head=40)
            self.ctx = ImageContext(scale=torch.ones(2, 1), segments=[(0, 4), (4, 20)])
            self.attn.set_processor(DecoupledCrossAttnProcessor(0, self.ctx, fused=True))

        def forward(self, x, text, k_img, v_img, scale):
            self.ctx.scale, self.ctx.kv = scale, [(k_img, v_img)]
            return self.attn(x, encoder_hidden_states=text)

    g = torch.Generator().manual_seed(0)
    layer = Layer().eval()
    x, text = torch.randn(2, 64, 80, generator=g), torch.randn(2, 77, 32, generator=g)
    k, v = torch.randn(2, 2, 20, 40, generator=g), torch.randn(2, 2, 20, 40, generator=g)
    scale = torch.tensor([[0.5], [1.2]])
    path = tmp_path / "layer.onnx"
    names = ["x", "text", "k_img", "v_img", "scale"]
    torch.onnx.export(layer, (x, text, k, v, scale), str(path), input_names=names, output_names=["out"], dynamo=True)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMul", "Softmax"} <= ops and not any(o.startswith("decoupled") for o in ops)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for s in (scale, torch.tensor([[0.0], [2.0]])):  # the scale is an input: no re-export to change it
        feeds = dict(zip(names, [t.numpy() for t in (x, text, k, v, s)], strict=True))
        got = session.run(None, feeds)[0]
        layer.ctx.segments = [(0, 4), (4, 20)]
        with torch.no_grad():
            layer.attn.processor.fused = False
            want = layer(x, text, k, v, s).numpy()
            layer.attn.processor.fused = True
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
