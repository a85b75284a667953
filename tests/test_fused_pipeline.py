"""Tier 3 for the fused kernel: whole pipelines with attention="triton" against diffusers and SDPA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CALL, KERNEL_DEVICE, assert_parity, diffusers_pipe, fixed_latents, ipa_pipe

import ipa_rt
from ipa_rt.kernels import fused_available

needs_kernel = pytest.mark.skipif(
    fused_available(torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.float32, 64) is not None,
    reason="the Triton kernel cannot run here (no CUDA and TRITON_INTERPRET is not 1, or triton missing)",
)
FAST = {**CALL, "num_inference_steps": 2}


@pytest.mark.slow
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
    adapters = [models.adapter(family, v) for v in variants]
    ours = ipa_pipe(models, family, adapters, attention="triton", device=KERNEL_DEVICE)
    assert all(p.fused for p in ours.adapters.processors)
    ours.set_ip_adapter_scale(scale)
    out = ours("a cat", ip_adapter_image=imgs, latents=fixed_latents(), **FAST).images.cpu()
    assert_parity(out, ref)
    ours.set_ip_adapter_scale(0.0)  # scale 0 through the kernel: exactly the text-only result's path
    zero = ours("a cat", ip_adapter_image=imgs, latents=fixed_latents(), **FAST).images.cpu()
    no_adapter = diffusers_pipe(models, family)("a cat", latents=fixed_latents(), **FAST).images
    assert_parity(zero, no_adapter)


def test_auto_is_sdpa_on_cpu(models):
    pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "base"))
    assert pipe.device.type == "cpu" and not any(p.fused for p in pipe.adapters.processors)


def test_kill_switch_forces_sdpa(models, monkeypatch):
    monkeypatch.setenv("IPA_RT_DISABLE_TRITON", "1")
    with pytest.warns(UserWarning, match="falls back to SDPA.*IPA_RT_DISABLE_TRITON"):
        pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "base"), attention="triton")
    assert not any(p.fused for p in pipe.adapters.processors)


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

    from ipa_rt.adapters.attention import DecoupledCrossAttnProcessor
    from ipa_rt.runtime.image_state import ImageContext

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


@needs_kernel
@pytest.mark.parametrize(
    ("failure", "message"),
    [("raise", r"falls back to SDPA for the \d+ layer\(s\) of head dim \d+: RuntimeError: ptxas"),
     ("wrong", r"falls back to SDPA .* differs from the reference")],
)  # fmt: skip
def test_kernel_failing_its_build_self_test_falls_back_to_sdpa(models, images, monkeypatch, failure, message):
    """A kernel that does not compile (forced: ptxas raises) or computes wrong values (forced: an offset) on this
    machine is caught when the pipeline is built: its layers run SDPA, one warning per head dim says why, and the
    result is diffusers'."""
    from ipa_rt.kernels import decoupled_kernel as kmod

    real = kmod.launch

    def broken(*args, **kwargs):
        if failure == "raise":
            raise RuntimeError("ptxas fatal: simulated failure")
        return real(*args, **kwargs) + 0.5

    monkeypatch.setattr(kmod, "launch", broken)
    with pytest.warns(UserWarning, match=message):
        ours = ipa_pipe(models, "sd15", [models.adapter("sd15", "base")], attention="triton", device=KERNEL_DEVICE)
    assert not any(p.fused for p in ours.adapters.processors) and ours.kernel_fallbacks
    ref = diffusers_pipe(models, "sd15", ["base.safetensors"])
    out = ours("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **FAST).images.cpu()
    assert_parity(out, ref("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **FAST).images)


@needs_kernel
def test_kernel_failing_during_a_call_falls_back_to_sdpa(models, images, monkeypatch):
    """A kernel that fails at run time (a shape first seen in a request) never fails the call: those layers switch
    to SDPA with one warning and the call returns diffusers' result."""
    from ipa_rt.kernels import decoupled_kernel as kmod

    ours = ipa_pipe(models, "sd15", [models.adapter("sd15", "base")], attention="triton", device=KERNEL_DEVICE)
    assert all(p.fused for p in ours.adapters.processors)
    monkeypatch.setattr(kmod, "launch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("launch failed: 719")))
    with pytest.warns(UserWarning, match="fused attention kernel failed .*launch failed: 719") as caught:
        out = ours("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **FAST).images.cpu()
    assert len([w for w in caught if "kernel failed" in str(w.message)]) == 1
    assert not any(p.fused for p in ours.adapters.processors)
    ref = diffusers_pipe(models, "sd15", ["base.safetensors"])
    assert_parity(out, ref("a cat", ip_adapter_image=images[0], latents=fixed_latents(), **FAST).images)


def test_layer_choice_policy(monkeypatch):
    """What each attention mode picks, with the device checks stubbed: auto fuses fp16/bf16 on CUDA (fp32 keeps
    SDPA), a head dim whose self-test fails falls back alone, sdpa never fuses."""
    from ipa_rt.kernels import decoupled_kernel as kmod
    from ipa_rt.kernels import select

    monkeypatch.setattr(kmod, "kernel_supports", lambda device, dtype, d: None)
    monkeypatch.setattr(
        select, "self_test", lambda s, dtype, device: "ptxas: out of resources" if s.head_dim == 160 else None
    )
    monkeypatch.setenv(select.TUNE_SWITCH, "0")
    layers = [select.LayerShape(d, 8, n, 77, (4,)) for d, n in ((40, 4096), (80, 1024), (160, 256), (160, 64))]
    cuda = torch.device("cuda")
    with pytest.warns(UserWarning, match=r"2 layer\(s\) of head dim 160: ptxas: out of resources"):
        fused, why = select.choose_layers("auto", cuda, torch.float16, layers)
    assert fused == [True, True, False, False] and set(why) == {160}
    assert select.choose_layers("auto", cuda, torch.float32, layers)[0] == [False] * 4
    assert select.choose_layers("auto", torch.device("cpu"), torch.float16, layers)[0] == [False] * 4
    assert select.choose_layers("sdpa", cuda, torch.float16, layers)[0] == [False] * 4
