"""``ipa_rt Engine from MODEL``: ComfyUI's own ``MODEL`` (Load Checkpoint, with the LoRAs ComfyUI applied to it) and
``CLIP_VISION`` (Load CLIP Vision) as an ipa_rt pipeline, engines or torch, with IP-Adapter live.

The weights are taken as ``comfy.sd.save_checkpoint`` takes them (patches forced in, LoRAs baked in) and written once
to a file named by their sha256 under ``$IPA_RT_CACHE/comfyui-weights`` (the :data:`KEEP` most recent of each kind
kept); ipa_rt loads it as any single file (:mod:`ipa_rt.single_file`), so the patched weights name the engines. CLIP
and VAE stay ComfyUI's. ComfyUI is imported inside the functions that need it (docs/guides/comfyui.md, an engine from
ComfyUI's own MODEL).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

FOLDER = "comfyui-weights"  # under ipa_rt's cache root, beside the engines
KEEP_ENV = "IPA_RT_COMFYUI_WEIGHTS_KEEP"
KEEP = 4  # files of one kind (unet-sd15, unet-sdxl, clip_vision) kept: each UNet file is 2-10 GB
FRESH_S = 600  # a file used this recently is never pruned: another ComfyUI on this cache may be loading it
# ComfyUI's model config classes -> ipa_rt family; their subclasses too (SSD-1B, Segmind Vega and KOALA are SDXLs
# with fewer transformer layers, which the single-file loader reads from the weights' shapes)
FAMILIES = {"SD15": "sd15", "SDXL": "sdxl"}


def weights_folder() -> Path:
    from ..cache import cache_root

    return cache_root() / FOLDER


def content_file(state: dict[str, torch.Tensor], stem: str, folder: Path | None = None) -> Path:
    """``state`` as ``<stem>-<sha256 of its keys, dtypes, shapes and bytes>.safetensors`` (written once: the same
    weights give the same file, which is then not written again)."""
    digest = hashlib.sha256()
    tensors = {}
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        tensors[key] = t
        digest.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    folder = folder or weights_folder()
    path = folder / f"{stem}-{digest.hexdigest()[:32]}.safetensors"
    if path.is_file():
        os.utime(path)  # used now: what pruning keeps
    else:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        save_file(tensors, str(partial))
        os.replace(partial, path)  # complete or absent: a file of this name always holds these weights
    prune(folder, stem)
    return path


def prune(folder: Path, stem: str) -> list[Path]:
    """Remove ``stem``'s files beyond the ``$IPA_RT_COMFYUI_WEIGHTS_KEEP`` (default :data:`KEEP`) most recently
    used, except any used in the last :data:`FRESH_S` seconds; returns what was removed."""
    try:
        keep = int(os.environ.get(KEEP_ENV, KEEP))
    except ValueError as exc:
        raise ConfigError(f"{KEEP_ENV}={os.environ[KEEP_ENV]!r}; expected a whole number of files to keep") from exc
    files = sorted(folder.glob(f"{stem}-*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    now, removed = time.time(), []
    for old in files[max(keep, 1) :]:
        if now - old.stat().st_mtime > FRESH_S:
            old.unlink(missing_ok=True)
            removed.append(old)
    return removed


def model_family(model: Any) -> str:
    """``sd15`` or ``sdxl`` from ComfyUI's own detection of the checkpoint (its model config class)."""
    import comfy.supported_models

    config = getattr(model.model, "model_config", None)
    family = next((f for c, f in FAMILIES.items() if isinstance(config, getattr(comfy.supported_models, c))), None)
    if family is None:
        raise ConfigError(
            f"model: a ComfyUI {type(config).__name__} model; ipa_rt Engine from MODEL takes SD1.5 and SDXL "
            "checkpoints (ComfyUI's SD15 and SDXL models and their kin: SSD-1B, Segmind Vega, KOALA)"
        )
    channels = model.model.model_config.unet_config.get("in_channels", 4)
    if channels != 4:  # ComfyUI feeds an inpainting UNet its mask and image through its own model class
        raise ConfigError(
            f"model: a UNet with {channels} input channels (an inpainting or instruct model); ipa_rt Engine from "
            "MODEL takes text-to-image SD1.5 and SDXL checkpoints (4 latent channels)"
        )
    return family


def unet_file(model: Any) -> Path:
    """ComfyUI's diffusion model with its weight patches (LoRAs) applied, as its checkpoint saving writes it."""
    import comfy.model_management

    if getattr(model.model.model_config, "scaled_fp8", None) is not None:
        raise ConfigError("model: a scaled-fp8 checkpoint; ipa_rt takes fp32, fp16 and bf16 weights")
    comfy.model_management.load_models_gpu([model], force_patch_weights=True)
    try:
        state = model.model.state_dict_for_saving(None, None, None)
        state.pop("v_pred", None)  # the prediction type travels with ComfyUI's MODEL (its model_sampling)
        return content_file(state, f"unet-{model_family(model)}")
    finally:
        release(model)


def release(model: Any) -> None:
    """Unload ``model`` as ComfyUI's memory manager does (patches restored, weights to the offload device): the
    engine MODEL takes its place in the graph, so its device copy would only hold memory the engine needs. Used
    elsewhere in the graph, ComfyUI loads it again."""
    import comfy.model_management

    loaded = comfy.model_management.current_loaded_models
    for i, entry in enumerate(loaded):
        if entry.model is model:
            entry.model_unload()
            loaded.pop(i)
            return


def clip_vision_file(clip_vision: Any) -> Path:
    """Load CLIP Vision's weights (transformers' key names, as ComfyUI holds them) as one file."""
    get_sd = getattr(clip_vision, "get_sd", None)
    if get_sd is None:
        raise ConfigError(f"clip_vision: a {type(clip_vision).__name__}; expected the CLIP_VISION of Load CLIP Vision")
    return content_file(get_sd(), "clip_vision")


def engine_from_model(
    model: Any,
    clip_vision: Any,
    adapters: tuple[str, ...],
    backend: str,
    precision: str,
    height: int,
    width: int,
    device: str,
) -> tuple[Any, Any]:
    """``(MODEL, pipeline)``: the ipa_rt MODEL whose UNet is ``model``'s patched weights (engines on ``backend``, or
    torch) with ``adapters`` (full paths) and ``clip_vision`` as the image encoder, and its pipeline (for ipa_rt
    Encode Reference Image: diffusers' CLIPImageProcessor on the CLIP_VISION's weights)."""
    from .model import make_model
    from .pipelines import LoadSpec, load_pipeline

    model_family(model)
    spec = LoadSpec(
        base=str(unet_file(model)),
        ip_adapters=adapters,
        image_encoder=str(clip_vision_file(clip_vision)),
        backend=backend,
        precision=precision,
        height=height,
        width=width,
        device=device,
    )
    pipe = load_pipeline(spec)
    return make_model(pipe, source=model), pipe
