"""The example workflows filled in for tiny random models written here, ready to queue with curl
(``python -m ipa_rt.comfyui example COMFYUI_DIR OUT``): what the tests queue, for anyone to queue by hand."""

from __future__ import annotations

import json
from pathlib import Path

WORKFLOWS = Path(__file__).parent / "workflows"
# the tiny models' names in ComfyUI's model folders (models/<folder>/<name>), as the model-folders loader lists them
IN_FOLDERS = {
    "checkpoint": ("checkpoints", "ipa_rt-tiny-sd15.safetensors"),  # one file, the original (LDM) layout
    "diffusers": ("diffusers", "ipa_rt-tiny-sd15"),  # the same model as a folder: the file's configs and tokenizer
    "ip_adapter": ("ipadapter", "ipa_rt-tiny-ip-adapter_sd15.safetensors"),
    "clip_vision": ("clip_vision", "ipa_rt-tiny-clip-vision-h.safetensors"),  # one file, transformers' key names
    "lora": ("loras", "ipa_rt-tiny-lora_sd15.safetensors"),
}
# workflows that start from ComfyUI's own loaders (Load Checkpoint, Load CLIP Vision), which take full-size text
# encoders, VAEs and ViT-L/H/bigG encoders only: no prompt on the tiny models is written for them
# (tests/test_comfyui.py writes files those loaders take: full-size CLIP, VAE and ViT-L, narrow UNets)
REAL_MODELS_ONLY = ("ipa_rt_engine_from_model", "ipa_rt_engine_from_model_sdxl")
SIZE = 64  # tiny models: engines are built for 64 x 64 pixels
LATENT = SIZE // 2  # the tiny VAE's scale factor is 2 (ComfyUI's EmptyLatentImage assumes 8)


def fill(name: str, base: str, adapters: list[str], encoder: str, **loader) -> dict:
    """Workflow ``name`` (API format) on the given model files, at the tiny size and 4 steps."""
    graph = json.loads((WORKFLOWS / f"{name}.api.json").read_text())
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "IpaRtLoadPipeline":
            adapter_lines = "\n".join(adapters[: inputs["ip_adapter"].count("\n") + 1])
            inputs.update(
                base=base, ip_adapter=adapter_lines, image_encoder=encoder, engine_height=SIZE, engine_width=SIZE
            )
            inputs.update(loader)  # the caller's overrides last
        if node["class_type"] == "IpaRtLoadFromFolders":
            inputs.update({k: file for k, (_, file) in IN_FOLDERS.items()}, engine_height=SIZE, engine_width=SIZE)
            inputs.update({k: v for k, v in loader.items() if k in inputs})
        if node["class_type"] == "IpaRtSampler":
            inputs.update(width=SIZE, height=SIZE)
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=LATENT * 8, height=LATENT * 8)
        if node["class_type"] in ("IpaRtSampler", "KSampler"):
            inputs.update(steps=4)
    return graph


def write_examples(comfyui: str | Path, out: str | Path) -> list[Path]:
    """Tiny models under ``out/models`` and in ComfyUI's model folders (:data:`IN_FOLDERS`), the reference images
    and mask in ComfyUI's ``input/``, and one ``out/<workflow>.prompt.json`` (``{"prompt": graph}``) per example
    workflow; returns those files."""
    import numpy as np
    from PIL import Image

    from .. import testing

    comfyui, out = Path(comfyui), Path(out)
    models = out / "models"
    base = testing.write_base_model(models / "model-sd15")
    encoder = testing.write_image_encoder(models / "IP-Adapter" / "models" / "image_encoder")
    plain = testing.write_adapter(models / "IP-Adapter" / "models" / "ip-adapter_sd15.safetensors", "base", base)
    plus = testing.write_adapter(models / "IP-Adapter" / "models" / "ip-adapter-plus_sd15.bin", "plus", base, seed=4)
    write_model_folders(comfyui / "models", base, plain)
    inputs = comfyui / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    testing.make_image(0).save(inputs / "reference.png")
    testing.make_image(5, (40, 56)).save(inputs / "reference_2.png")
    mask = np.zeros((SIZE, SIZE, 3), np.uint8)
    mask[:, : SIZE // 2] = 255
    Image.fromarray(mask).save(inputs / "mask.png")
    files = []
    for api in sorted(WORKFLOWS.glob("*.api.json")):
        name = api.name.removesuffix(".api.json")
        if name in REAL_MODELS_ONLY:
            continue
        graph = fill(name, str(base), [str(plain), str(plus)], str(encoder))
        path = out / f"{name}.prompt.json"
        path.write_text(json.dumps({"prompt": graph}, indent=1) + "\n")
        files.append(path)
    return files


def write_model_folders(models: Path, base: Path, adapter: Path) -> None:
    """The tiny SD1.5 model as ComfyUI users keep their files (:data:`IN_FOLDERS`): a single-file checkpoint, the
    diffusers folder, the adapter, a one-file image encoder (ViT-H's 16 heads and GELU, at tiny width) and a
    LoRA."""
    import shutil
    import tempfile

    from .. import testing
    from ..testing.ldm import write_single_file

    def target(key: str) -> Path:
        folder, name = IN_FOLDERS[key]
        (models / folder).mkdir(parents=True, exist_ok=True)
        return models / folder / name

    write_single_file(base, target("checkpoint"))
    shutil.copytree(base, target("diffusers"), dirs_exist_ok=True)
    shutil.copyfile(adapter, target("ip_adapter"))
    with tempfile.TemporaryDirectory() as scratch:
        encoder = testing.write_image_encoder(Path(scratch) / "encoder", num_attention_heads=16, hidden_act="gelu")
        shutil.copyfile(encoder / "model.safetensors", target("clip_vision"))
    testing.write_lora(target("lora"), base)
