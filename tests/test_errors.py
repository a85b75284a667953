"""Bad input: one ipa_rt exception type each, naming the file or argument, what was found and expected."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import CALL, fixed_latents, ipa_pipe

import ipa_rt
from ipa_rt import testing as T
from ipa_rt.cache import atomic_write_bytes


def load(models, adapter, family="sd15", **kw):
    return ipa_rt.Pipeline.from_pretrained(models.base(family), ip_adapter=adapter, **kw)


def test_missing_adapter_file(models, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ipa_rt.CheckpointError, match=r"nope\.safetensors.*does not exist.*expected"):
        load(models, missing)


def test_not_a_checkpoint(models, tmp_path):
    bad = tmp_path / "notes.bin"
    bad.write_text("this is a text file, not weights")
    with pytest.raises(ipa_rt.CheckpointError, match=r"notes\.bin.*not a PyTorch checkpoint"):
        load(models, bad)


def test_truncated_safetensors(models, tmp_path):
    good = models.adapter("sd15", "base", "safetensors").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ipa_rt.CheckpointError, match=r"cut\.safetensors.*truncated or corrupt"):
        load(models, bad)


class Payload:  # an arbitrary object: weights_only loading must refuse it
    pass


def test_bin_with_arbitrary_objects(models, tmp_path):
    bad = tmp_path / "evil.bin"
    torch.save({"image_proj": {"proj.weight": Payload()}, "ip_adapter": {}}, bad)
    with pytest.raises(ipa_rt.CheckpointError, match=r"evil\.bin.*refuses to unpickle.*expected a dict of tensors"):
        load(models, bad)


def test_bin_with_non_tensor_values(models, tmp_path):
    bad = tmp_path / "strings.bin"
    torch.save({"image_proj": {"proj.weight": "hello"}, "ip_adapter": {"1.to_k_ip.weight": torch.ones(1)}}, bad)
    with pytest.raises(ipa_rt.CheckpointError, match=r"strings\.bin.*'image_proj\.proj\.weight' is a str.*tensor"):
        load(models, bad)


def test_bin_without_h94_parts(models, tmp_path):
    bad = tmp_path / "other.bin"
    torch.save({"state_dict": {"w": torch.ones(1)}}, bad)
    with pytest.raises(ipa_rt.CheckpointError, match=r"other\.bin.*no image_proj and no ip_adapter.*h94 layout"):
        load(models, bad)


def test_unknown_image_proj_layout(models, tmp_path):
    bad = tmp_path / "odd.bin"
    torch.save(
        {"image_proj": {"mystery.weight": torch.ones(2)}, "ip_adapter": {"1.to_k_ip.weight": torch.ones(1)}}, bad
    )
    with pytest.raises(ipa_rt.CheckpointError, match=r"odd\.bin.*matches no known IP-Adapter layout"):
        load(models, bad)


def test_sdxl_adapter_on_sd15_base(models):
    with pytest.raises(
        ipa_rt.IncompatibleAdapterError, match=r"plus\.safetensors.*width 64.*cross_attention_dim is 32"
    ):
        load(models, models.adapter("sdxl", "plus"))


def test_layer_count_mismatch(models, tmp_path):
    state = T.adapter_state_dict("base", models.base("sd15"))
    del state["ip_adapter"]["1.to_k_ip.weight"]
    path = T.save_adapter(state, tmp_path / "fewer.safetensors")
    with pytest.raises(ipa_rt.IncompatibleAdapterError, match=r"fewer\.safetensors.*for \d+ cross-attention.*has \d+"):
        load(models, path)


def test_layer_shape_mismatch(models, tmp_path):
    state = T.adapter_state_dict("base", models.base("sd15"))
    state["ip_adapter"]["3.to_v_ip.weight"] = torch.zeros(7, 32)
    path = T.save_adapter(state, tmp_path / "shape.bin")
    with pytest.raises(ipa_rt.IncompatibleAdapterError, match=r"shape\.bin.*'3\.to_v_ip\.weight' has shape \[7, 32\]"):
        load(models, path)


def test_encoder_does_not_fit_adapter(models, tmp_path):
    folder = tmp_path / "adapters"
    shutil.copy(models.adapter("sd15", "base"), folder.mkdir() or folder / "base.safetensors")
    T.write_image_encoder(folder / "image_encoder", projection_dim=40)
    with pytest.raises(ipa_rt.IncompatibleAdapterError, match=r"projection_dim 40.*base\.safetensors.*expects 24"):
        load(models, folder / "base.safetensors")
    T.write_image_encoder(tmp_path / "wide", hidden_size=48, num_attention_heads=4)
    with pytest.raises(ipa_rt.IncompatibleAdapterError, match=r"hidden_size 48.*plus\.safetensors.*expects 32"):
        load(models, models.adapter("sd15", "plus"), image_encoder=tmp_path / "wide")


def test_missing_image_encoder_folder(models, tmp_path):
    with pytest.raises(ipa_rt.CheckpointError, match=r"image encoder folder '.*nowhere' does not exist"):
        load(models, models.adapter("sd15", "base"), image_encoder=tmp_path / "nowhere")


def test_undecodable_image(models, tmp_path):
    pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "base"))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ipa_rt.ImageInputError, match=r"ip_adapter_image\[0\].*broken\.png.*cannot be decoded"):
        pipe("x", ip_adapter_image=str(bad), **CALL)
    with pytest.raises(ipa_rt.ImageInputError, match=r"ip_adapter_image\[0\].*does not exist"):
        pipe("x", ip_adapter_image=str(tmp_path / "absent.png"), **CALL)


def test_wrong_image_count(models, images):
    pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "base"))
    with pytest.raises(ipa_rt.ImageInputError, match=r"ip_adapter_image has 2 entries; expected 1"):
        pipe("x", ip_adapter_image=[images[0], images[1]], **CALL)


def test_bad_embeds(models):
    pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "base"))
    with pytest.raises(ipa_rt.ImageInputError, match=r"ip_adapter_image_embeds\[0\] is \[3, 24\].*3-D or 4-D"):
        pipe("x", ip_adapter_image_embeds=[torch.zeros(3, 24)], **CALL)


def test_faceid_without_embeds(models, images):
    pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "faceid"))
    with pytest.raises(ipa_rt.ImageInputError, match=r"FaceID\) needs face embeddings.*ip_adapter_image_embeds"):
        pipe("x", ip_adapter_image=images[0], **CALL)


@pytest.mark.parametrize(
    ("scale", "pattern"),
    [
        ({"middle": 1.0}, r"unknown key 'middle'.*'down', 'mid', 'up'"),
        ({"up": {"block_0": 1.0}}, r"\['up'\] has key 'block_0'.*expected one of \['block_1', 'block_2', 'block_3'\]"),
        ({"up": {"block_1": [1.0, 0.0]}}, r"\['up'\]\['block_1'\] has 2 values; expected 3"),
        ({"mid": [1.0, 2.0]}, r"\['mid'\] has 2 values; expected 1"),
        ([0.5, 0.5], r"list of 2 entries; expected 1"),
        ("high", r"scale preset 'high' is unknown"),
        ([True], r"True; expected a finite number"),
        (float("nan"), r"nan; expected a finite number"),
    ],
)
def test_bad_scales(models, scale, pattern):
    pipe = ipa_pipe(models, "sd15", models.adapter("sd15", "base"))
    before = pipe.adapters.scale.clone()
    with pytest.raises(ipa_rt.ScaleError, match=pattern):
        pipe.set_ip_adapter_scale(scale)
    assert torch.equal(pipe.adapters.scale, before)  # nothing half-written


def test_missing_base_and_bad_options(models, tmp_path):
    with pytest.raises(ipa_rt.CheckpointError, match=r"base model '.*nobase' is not a folder"):
        ipa_rt.Pipeline.from_pretrained(tmp_path / "nobase")
    with pytest.raises(ipa_rt.ConfigError, match=r"scheduler 'warp' is unknown"):
        ipa_rt.Pipeline.from_pretrained(models.base("sd15"), scheduler="warp")
    with pytest.raises(ipa_rt.ConfigError, match=r"backend 'tvm' is unknown"):
        ipa_rt.Pipeline.from_pretrained(models.base("sd15"), backend="tvm")
    with pytest.raises(ipa_rt.ConfigError, match=r"backend 'onnxruntime' builds engines from IP-Adapter files"):
        ipa_rt.Pipeline.from_pretrained(models.base("sd15"), backend="onnxruntime")
    with pytest.raises(ipa_rt.ConfigError, match=r"backend='onnxruntime'\) does not take \['attention'\]"):
        ipa_rt.Pipeline.from_pretrained(models.base("sd15"), backend="onnxruntime", attention="sdpa")
    with pytest.raises(ipa_rt.ConfigError, match=r"needs vae as a folder, hub id or 'taesd'; got a object"):
        ipa_rt.Pipeline.from_pretrained(
            models.base("sd15"), models.adapter("sd15", "base"), backend="onnxruntime", vae=object()
        )
    with pytest.raises(
        ipa_rt.ConfigError, match=r"engine_options apply to backend='onnxruntime', 'openvino' or 'tensorrt'"
    ):
        ipa_rt.Pipeline.from_pretrained(models.base("sd15"), engine_options={"height": 64})
    pipe = ipa_pipe(models, "sd15")
    with pytest.raises(ipa_rt.ConfigError, match=r"latents have shape \[1, 4, 16, 16\]; expected \[1, 4, 8, 8\]"):
        pipe("x", latents=fixed_latents(), **{**CALL, "height": 16, "width": 16})


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary left behind


def test_cpu_engine_threads_from_the_environment(monkeypatch):
    from ipa_rt.export.openvino_engine import cpu_threads

    monkeypatch.setenv("IPA_RT_CPU_THREADS", "3")
    assert cpu_threads() == 3
    monkeypatch.setenv("IPA_RT_CPU_THREADS", "two")
    with pytest.raises(ipa_rt.ConfigError, match="IPA_RT_CPU_THREADS='two': expected a positive whole number"):
        cpu_threads()


@pytest.mark.parametrize(
    ("options", "backend", "match"),
    [
        ({"heigth": 64}, "onnxruntime", r"engine_options \['heigth'\] are unknown for Flux-family engines.*height"),
        ({"height": 0}, "openvino", r"engine_options\['height'\] is 0; expected a positive whole number"),
        ({"width": True}, "openvino", r"engine_options\['width'\] is True; expected a positive whole number"),
        ({"precision": "bf16"}, "onnxruntime", r"precision 'bf16' is OpenVINO's; onnxruntime engines .* are fp32"),
        ({"precision": "fp8"}, "openvino", r"precision 'fp8' is unknown for OpenVINO"),
    ],
)
def test_family_engine_options(options, backend, match):
    """A family's engine options are checked before any file is read or written (the build's shapes, precision)."""
    from ipa_rt.export.wrapped import shape_options

    with pytest.raises(ipa_rt.ConfigError, match=match):
        shape_options(options, {"height": 64, "width": 64}, "Flux-family", backend)


def test_family_engine_options_resolved():
    from ipa_rt.export.wrapped import shape_options

    got = shape_options({"width": 48, "rebuild": 1}, {"height": 64, "width": 64}, "Kolors", "onnxruntime")
    assert got == {"shapes": {"height": 64, "width": 48}, "precision": "fp32", "rebuild": True}
