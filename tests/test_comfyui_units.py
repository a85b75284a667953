"""The ComfyUI node pack's pure parts (unit tier, no ComfyUI needed): weight types, the installer, the light
import, image conversion and input errors. The real application is driven in tests/test_comfyui.py."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from ipa_rt import ConfigError, ImageInputError, ScaleError, scale_preset
from ipa_rt.comfyui.__main__ import FOLDER, install, main
from ipa_rt.comfyui.pipelines import LoadSpec, comfy_to_pil, load_pipeline
from ipa_rt.comfyui.weights import LEFT_OUT, WEIGHT_TYPES, blocks_in_key_order, scale_config

SD15 = {"down": {0: 2, 1: 2, 2: 2}, "up": {1: 3, 2: 3, 3: 3}, "mid": {0: 1}}  # SD1.5's 16 attention modules
SDXL = {"down": {1: 2, 2: 2}, "up": {0: 3, 1: 3}, "mid": {0: 1}}  # SDXL's 11 (several transformer layers each)


def _flat(config, blocks) -> list[float]:
    return [
        config.get("mid", 0.0) if side == "mid" else config.get(side, {}).get(f"block_{b}", [0.0] * 9)[a]
        for side, b, a in blocks_in_key_order(blocks)
    ]


def test_key_order_is_down_up_mid():
    order = blocks_in_key_order(SD15)
    assert len(order) == 16 and order[0] == ("down", 0, 0) and order[6] == ("up", 1, 0) and order[-1] == ("mid", 0, 0)
    assert len(blocks_in_key_order(SDXL)) == 11


@pytest.mark.parametrize("blocks", [SD15, SDXL], ids=["sd15", "sdxl"])
def test_ramps_follow_their_definition(blocks):
    n = len(blocks_in_key_order(blocks))
    ease_in = _flat(scale_config("ease in", 0.8, blocks, "sd15"), blocks)
    assert ease_in == pytest.approx([0.8 * (0.05 + 0.95 * (1 - t / n)) for t in range(n)])
    ease_out = _flat(scale_config("ease out", 0.8, blocks, "sd15"), blocks)
    assert ease_out == pytest.approx([0.8 * (0.05 + 0.95 * t / n) for t in range(n)])
    middle = _flat(scale_config("strong middle", 1.0, blocks, "sd15"), blocks)
    assert middle == pytest.approx([0.2] * (n - 1) + [1.0])
    weak_in = _flat(scale_config("weak input", 1.0, blocks, "sd15"), blocks)
    downs = sum(blocks["down"].values())
    assert weak_in == pytest.approx([0.2] * downs + [1.0] * (n - downs))


def test_presets_are_ipa_rt_presets_and_left_out_types_are_refused():
    assert scale_config("linear", 0.7, SD15, "sd15") == 0.7
    assert scale_config("style transfer", 0.5, SD15, "sd15") == scale_preset("style", "sd15", 0.5)
    assert scale_config("composition", 1.0, SDXL, "sdxl") == scale_preset("composition", "sdxl")
    for name in LEFT_OUT:
        with pytest.raises(ScaleError, match="only in ComfyUI_IPAdapter_plus"):
            scale_config(name, 1.0, SD15, "sd15")
    with pytest.raises(ScaleError, match="weight_type is 'sideways'"):
        scale_config("sideways", 1.0, SD15, "sd15")
    assert len(set(WEIGHT_TYPES)) == len(WEIGHT_TYPES) == 12


def test_installer_writes_the_shim_and_refuses_other_folders(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"COMFYUI_DIR: .* expected a ComfyUI folder"):
        install(tmp_path)
    assert not (tmp_path / "custom_nodes").exists()  # nothing written for a wrong folder
    assert main(["install", str(tmp_path)]) == 2 and "error: COMFYUI_DIR" in capsys.readouterr().err
    assert main(["example", str(tmp_path), str(tmp_path / "out")]) == 2 and not (tmp_path / "out").exists()
    (tmp_path / "main.py").write_text("")
    (tmp_path / "comfy_api").mkdir()
    shim = install(tmp_path) / "__init__.py"
    assert shim.parent.name == FOLDER and "from ipa_rt.comfyui import comfy_entrypoint" in shim.read_text()
    assert [p.name for p in shim.parent.iterdir()] == ["__init__.py"]  # no temporary file left beside it


def test_loading_the_pack_imports_nothing_heavy():
    heavy = "('torch', 'diffusers', 'transformers')"
    code = f"import sys, ipa_rt.comfyui; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_comfy_images_convert_exactly():
    pixels = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    images = comfy_to_pil(pixels.float() / 255, "image")
    assert [torch.from_numpy(np.array(im)).equal(p) for im, p in zip(images, pixels, strict=True)] == [True] * 2
    with pytest.raises(ImageInputError, match="image: \\[5, 7\\]; expected a ComfyUI IMAGE"):
        comfy_to_pil(torch.zeros(5, 7), "image")


def test_loader_errors_name_the_input(tmp_path):
    with pytest.raises(ConfigError, match="base: empty"):
        load_pipeline(LoadSpec())
    with pytest.raises(ConfigError, match=r"engine_folder: .* holds no manifest.json"):
        load_pipeline(LoadSpec(engine_folder=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"ip_adapter\[0\]: '/nope/a\.safetensors' does not exist"):
        load_pipeline(LoadSpec(base=str(tmp_path), ip_adapters=("/nope/a.safetensors",)))
    with pytest.raises(ConfigError, match=r"config: '/nope/sd15' does not exist"):  # the model-folders loader's
        load_pipeline(LoadSpec(base=str(tmp_path), config="/nope/sd15"))


def test_masks_follow_diffusers_mask_processor():
    """The Sampler's and the MODEL's masks: diffusers' IPAdapterMaskProcessor at the output size, one per image."""
    from diffusers.image_processor import IPAdapterMaskProcessor
    from PIL import Image

    from ipa_rt.comfyui.pipelines import mask_tensors

    assert mask_tensors([None, None], [1, 2], 64, 64) is None
    mask = torch.zeros(1, 16, 24)
    mask[:, :, :12] = 1.0
    out = mask_tensors([mask, None], [3, 1], 32, 48)
    assert out[1] is None and out[0].shape == (1, 3, 32, 48)
    want = IPAdapterMaskProcessor().preprocess([Image.fromarray((mask[0].numpy() * 255).astype(np.uint8))], 32, 48)
    assert all(torch.equal(out[0][0, i], want[0, 0]) for i in range(3))
    assert out[0][0, 0, :, :23].min() == 1 and out[0][0, 0, :, 25:].max() == 0  # left half kept, right half not


def test_adapter_lines_are_files_or_hub_specs(tmp_path):
    from ipa_rt import AdapterSource
    from ipa_rt.comfyui.pipelines import _adapter_source

    hub = _adapter_source("h94/IP-Adapter:models/ip-adapter_sd15.safetensors", "ip_adapter[0]")
    assert hub == AdapterSource("h94/IP-Adapter", weight_name="ip-adapter_sd15.safetensors", subfolder="models")
    local = tmp_path / "a.bin"
    local.write_bytes(b"")
    assert _adapter_source(str(local), "ip_adapter[0]") == str(local)


def test_engine_from_model_weight_files_are_named_by_content_and_bounded(tmp_path, monkeypatch):
    """ipa_rt Engine from MODEL's weight files: the same weights give the same file (written once, its use
    recorded), other weights another; each kind keeps the most recently used files (``KEEP``, or
    ``$IPA_RT_COMFYUI_WEIGHTS_KEEP``), never one used in the last ``FRESH_S`` seconds, other kinds untouched."""
    import os
    import time

    from ipa_rt.comfyui import from_model as fm

    def state(seed: int) -> dict[str, torch.Tensor]:
        return {"w": torch.full((3,), float(seed)), "b": torch.arange(seed + 1, dtype=torch.float16)}

    first = fm.content_file(state(0), "unet-sd15", tmp_path)
    assert fm.content_file(state(0), "unet-sd15", tmp_path) == first and first.name.startswith("unet-sd15-")
    encoder = fm.content_file(state(0), "clip_vision", tmp_path)
    assert encoder.name.startswith("clip_vision-") and encoder.name.split("-")[1] == first.name.split("-", 2)[2]
    long_ago = time.time() - fm.FRESH_S - 60
    for f in (first, encoder):
        os.utime(f, (long_ago, long_ago))
    made = [fm.content_file(state(s), "unet-sd15", tmp_path) for s in range(1, fm.KEEP + 1)]  # KEEP newer ones
    assert not first.exists() and all(p.exists() for p in made) and encoder.exists()  # other kinds untouched
    for i, f in enumerate(made):  # all old now, the first made the oldest
        os.utime(f, (long_ago + i, long_ago + i))
    monkeypatch.setenv(fm.KEEP_ENV, "2")
    again = fm.content_file(state(1), "unet-sd15", tmp_path)  # reused: now the most recent
    assert again == made[0] and sorted(p.name for p in tmp_path.glob("unet-sd15-*")) == sorted(
        p.name for p in (made[0], made[-1])
    )
    recent = [fm.content_file(state(s), "unet-sd15", tmp_path) for s in (10, 11, 12)]  # used just now: all kept
    assert all(p.exists() for p in recent)
    monkeypatch.setenv(fm.KEEP_ENV, "many")
    with pytest.raises(ConfigError, match=fm.KEEP_ENV):
        fm.prune(tmp_path, "unet-sd15")
