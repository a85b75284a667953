"""Tier 1: units — variant table, key mapping, scale expansion, the attention reference, wrap/restore."""

from __future__ import annotations

import pytest
import torch
from conftest import CALL, FAMILIES, count_forwards, diffusers_pipe, fixed_latents, ipa_pipe

from ipa_rt import testing as T
from ipa_rt.adapters.checkpoint import AdapterSource, read_adapter
from ipa_rt.adapters.scale import expand_scale, scale_tables
from ipa_rt.adapters.stack import cross_attention_layers
from ipa_rt.adapters.variants import VARIANTS, build_projection, detect_variant
from ipa_rt.kernels.reference import decoupled_attention_reference


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", T.VARIANT_NAMES)
def test_detection_and_key_mapping_match_diffusers(models, family, variant):
    """Our table builds the same module with the same weights as diffusers' own converter."""
    from diffusers import UNet2DConditionModel

    raw_st = read_adapter(AdapterSource(models.adapter(family, variant, "safetensors")))
    raw_bin = read_adapter(AdapterSource(models.adapter(family, variant, "bin")))
    assert raw_st.image_proj.keys() == raw_bin.image_proj.keys()
    assert raw_st.ip_adapter.keys() == raw_bin.ip_adapter.keys()
    spec = detect_variant(raw_st.image_proj, "x")
    assert spec.name == variant
    ours = build_projection(spec, raw_st.image_proj, "x")
    unet = UNet2DConditionModel.from_pretrained(models.base(family), subfolder="unet")
    ref = unet._convert_ip_adapter_image_proj_to_diffusers(raw_bin.image_proj, low_cpu_mem_usage=False)
    assert type(ours) is type(ref)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert ref_sd.keys() == our_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], our_sd[k]), k


def test_variant_table_is_ordered_like_diffusers():
    assert [s.detect_key for s in VARIANTS] == [
        "proj.weight",
        "proj.3.weight",
        "perceiver_resampler.proj_in.weight",
        "norm.weight",
        None,
    ]


def test_layer_order_matches_h94_key_ids(models):
    """Cross-attention layer i reads ip_adapter key 2i+1, in diffusers' attn_processors order."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(models.base("sdxl"), subfolder="unet")
    names = list(unet.attn_processors)
    layers = cross_attention_layers(unet)
    assert [names.index(n) for n in layers] == [2 * i + 1 for i in range(len(layers))]


SCALE_CASES = [
    0.6,
    {"up": {"block_0": [0.0, 1.0, 0.0]}},
    {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
    {"down": 0.25, "mid": [0.5], "up": {"block_1": 2.0}},
    {"up": {"block_0": [0.7]}},
    {},
]


@pytest.mark.parametrize("scale", SCALE_CASES, ids=range(len(SCALE_CASES)))
def test_scale_expansion_matches_diffusers(models, scale):
    """Each layer's value equals what diffusers' set_ip_adapter_scale writes into that processor."""
    pipe = diffusers_pipe(models, "sdxl", ["base.safetensors"])
    pipe.set_ip_adapter_scale(scale)
    unet = pipe.unet
    layers = cross_attention_layers(unet)
    expected = torch.tensor([[unet.attn_processors[n].scale[0] for n in layers]])
    assert torch.equal(scale_tables(expand_scale(scale, unet, layers, 1))[0], expected)


def test_scale_broadcast_and_list(models):
    pipe = diffusers_pipe(models, "sd15")
    layers = cross_attention_layers(pipe.unet)
    t = scale_tables(expand_scale([0.5, {"mid": 2.0}], pipe.unet, layers, 2))[0]
    assert t.shape == (2, len(layers))
    assert torch.all(t[0] == 0.5)
    assert t[1].tolist() == [2.0 if n.startswith("mid_block") else 0.0 for n in layers]
    assert torch.all(scale_tables(expand_scale(0.3, pipe.unet, layers, 3))[0] == 0.3)


def _attention_case(b, h, n, d, lengths, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q = r(b, h, n, d)
    kv = [(r(b, h, t, d), r(b, h, t, d)) for t in lengths[1:]]
    return q, r(b, h, lengths[0], d), r(b, h, lengths[0], d), kv


def _diffusers_processor_out(q, k, v, kv, scales):
    """diffusers' own math (IPAdapterAttnProcessor2_0's sum of SDPAs) written out for raw tensors."""
    import torch.nn.functional as F

    b, h, _, d = q.shape
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, h * d)
    for (ka, va), s in zip(kv, scales, strict=True):
        if s != 0:
            o = F.scaled_dot_product_attention(q, ka, va).transpose(1, 2).reshape(b, -1, h * d)
            out = out + s * o
    return out


@pytest.mark.parametrize(
    ("d", "lengths"),
    [(40, (77, 4)), (80, (77, 16)), (160, (77, 257)), (64, (154, 4, 16)), (40, (77, 8, 4, 257))],
)
def test_reference_is_diffusers_math(d, lengths):
    q, k, v, kv = _attention_case(2, 2, 63, d, lengths, torch.float32, seed=d + len(lengths))
    scales = [0.7, 0.0, 1.3][: len(kv)]
    out = decoupled_attention_reference(q, k, v, kv, torch.tensor(scales))
    ref = _diffusers_processor_out(q, k, v, kv, scales)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_reference_zero_scale_blocks_overflowing_branch():
    """Scale 0 gives exactly the text-only output even when the image branch is inf/NaN."""
    q, k, v, kv = _attention_case(1, 2, 10, 40, (77, 4), torch.float16, seed=0)
    kv = [(kv[0][0], torch.full_like(kv[0][1], float("inf")))]
    text_only = decoupled_attention_reference(q, k, v, [], torch.zeros(0))
    out = decoupled_attention_reference(q, k, v, kv, torch.zeros(1))
    assert torch.equal(out, text_only)


@pytest.mark.parametrize("family", FAMILIES)
def test_install_restore_leaves_unet_untouched(models, images, family):
    """refiners' inject/eject: after unload, the UNet is exactly the base model again."""
    pipe = ipa_pipe(models, family, [models.adapter(family, "faceid"), models.adapter(family, "plus")])
    unet = pipe.unet
    faceid_wrapped = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert type(faceid_wrapped).__name__ == "LoRALinear"
    pipe.unload_ip_adapter()
    base = diffusers_pipe(models, family).unet
    assert unet.state_dict().keys() == base.state_dict().keys()
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}
    lat = fixed_latents()
    t = torch.tensor(500)
    cond = torch.randn(1, 77, unet.config.cross_attention_dim)
    kw = {}
    if family == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32), "time_ids": torch.ones(1, 6)}
    with torch.no_grad():
        assert torch.equal(unet(lat, t, cond, **kw).sample, base(lat, t, cond, **kw).sample)


def test_scale_change_is_one_tensor_write(models, images):
    """set_ip_adapter_scale rebuilds nothing: same processors, same tensor storage, new values."""
    pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "base"))
    procs = dict(pipe.unet.attn_processors)
    ptr = pipe.adapters.scale.data_ptr()
    a = pipe("x", ip_adapter_image=images[0], latents=fixed_latents(), **CALL).images
    pipe.set_ip_adapter_scale({"up": {"block_1": [0.0, 2.0, 0.0]}})
    assert pipe.adapters.scale.data_ptr() == ptr
    assert all(procs[k] is v for k, v in pipe.unet.attn_processors.items())
    b = pipe("x", ip_adapter_image=images[0], latents=fixed_latents(), **CALL).images
    assert not torch.equal(a, b)


def test_image_side_work_runs_once_per_call(models, images):
    """Encoder, projection and image K/V are computed once per call, not once per step."""
    pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "plus"))
    counts = count_forwards(
        encoder=pipe.image_encoder,
        projection=pipe.adapters.projections[0],
        to_k_ip=pipe.adapters.to_k_ip[0][0],
        unet=pipe.unet,
    )
    pipe("x", ip_adapter_image=images[0], latents=fixed_latents(), **{**CALL, "num_inference_steps": 5})
    assert counts["unet"] >= 5
    assert counts == {"encoder": 2, "projection": 1, "to_k_ip": 1, "unet": counts["unet"]}  # cond + zero-pixel uncond


def test_fixture_formats_are_the_real_ones(models):
    """The .bin is a nested h94 dict; the .safetensors has flat image_proj./ip_adapter. keys."""
    from safetensors import safe_open

    nested = torch.load(models.adapter("sd15", "base", "bin"), weights_only=True)
    assert set(nested) == {"image_proj", "ip_adapter"}
    with safe_open(str(models.adapter("sd15", "base", "safetensors")), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"image_proj", "ip_adapter"}
    assert (models.base("sd15") / "tokenizer" / "vocab.json").exists()
    assert (models.base("sd15") / "tokenizer" / "merges.txt").exists()


class _Table(torch.nn.Module):
    """Small weights, a large buffer (as SD3's position table) and a constant made in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("table", torch.randn(1024, 4))  # onnx keeps < 1 KB inline

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.sum()  # both large tensors meet the input, so the exporter cannot fold them away
        return self.lin(x) + (self.table * s).sum(0) + (torch.arange(8192, dtype=x.dtype) * s).sum()


@pytest.mark.parametrize("limit", ["buffers", "graph"])
def test_onnx_export_takes_external_data_past_the_limit(tmp_path, monkeypatch, limit):
    """Weights go to ``<name>.data`` when the module's parameters *and buffers* pass the threshold, or when the graph
    as exported does (constants the exporter makes): an SD3.5-width transformer whose parameters alone were under
    2 GB failed to serialise before."""
    pytest.importorskip("onnx")
    from ipa_rt.export import onnx_export
    from ipa_rt.export.contracts import Contract

    module = _Table().eval()
    weights = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    threshold = weights - 1 if limit == "buffers" else weights + 1  # "graph": only the written file passes it
    monkeypatch.setattr(onnx_export, "LARGE_BYTES", threshold)
    contract = Contract("table", module, {"x": torch.randn(2, 4)}, ("y",))
    path = onnx_export.export_onnx(contract, tmp_path / "table.onnx")
    import onnx
    import onnxruntime

    graph = onnx.load(str(path), load_external_data=False).graph
    external = {t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert (tmp_path / "table.onnx.data").is_file() and "table" in external

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 4)
    (y,) = session.run(None, {"x": x.numpy()})
    assert torch.allclose(torch.from_numpy(y), module(x), atol=1e-6)
