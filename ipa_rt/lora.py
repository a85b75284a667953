"""LoRA fusing at load: diffusers' own loader (diffusers and kohya formats) + ``fuse_lora``, then unloaded.

The LoRA weights end up inside the UNet / text-encoder weights, so LCM-LoRA 4-step or a style LoRA costs
nothing per step. diffusers does the format conversion and the fusing, so the fused weights are exactly
``load_lora_weights`` + ``fuse_lora``'s. Needs ``peft`` (diffusers' LoRA backend).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError
from .models import BaseModel


def _sources(lora: Any) -> list[tuple[str, float]]:
    items = lora if isinstance(lora, (list, tuple)) and not _is_pair(lora) else [lora]
    out = []
    for item in items:
        path, weight = item if _is_pair(item) else (item, 1.0)
        if not isinstance(path, (str, os.PathLike)):  # a pair's weight is a number already (_is_pair)
            raise ConfigError(f"lora entry {item!r}; expected a path or a (path, weight) pair")
        out.append((os.fspath(path), float(weight)))
    return out


def _is_pair(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], (int, float)) and not isinstance(x[1], bool)


def _diffusers_pipeline(model: BaseModel) -> Any:
    """A diffusers pipeline object around the already loaded modules (nothing is copied)."""
    import diffusers

    shared = {
        "vae": model.vae,
        "text_encoder": model.text_encoders[0],
        "tokenizer": model.tokenizers[0],
        "unet": model.unet,
        "scheduler": model.scheduler,
    }
    if model.family.name == "sdxl":
        return diffusers.StableDiffusionXLPipeline(
            **shared, text_encoder_2=model.text_encoders[1], tokenizer_2=model.tokenizers[1]
        )
    return diffusers.StableDiffusionPipeline(
        **shared, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def fuse_loras(model: BaseModel, lora: Any) -> list[tuple[str, float]]:
    """Fuse ``lora`` (a path, a list of paths, or (path, weight) pairs) into ``model``'s weights in place."""
    sources = _sources(lora)
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise ConfigError("lora= needs peft (diffusers' LoRA backend): pip install 'ipa_rt[faceid]' or peft") from exc
    pipe = _diffusers_pipeline(model)
    names = []
    for i, (path, _) in enumerate(sources):
        p = Path(path)
        parts = path.split("/")
        if p.exists():
            where, kwargs = str(p.parent if p.is_file() else p), ({"weight_name": p.name} if p.is_file() else {})
        elif len(parts) >= 2 and not path.startswith(("/", ".", "~")):  # hub: owner/repo[/file]
            where, kwargs = "/".join(parts[:2]), ({"weight_name": "/".join(parts[2:])} if len(parts) > 2 else {})
        else:
            raise CheckpointError(f"LoRA file '{path}' does not exist; expected a .safetensors (diffusers or kohya)")
        name = f"ipa_rt_lora_{i}"
        try:
            pipe.load_lora_weights(where, adapter_name=name, **kwargs)
        except Exception as exc:  # diffusers/hub raise many types for a file they cannot use
            raise CheckpointError(f"LoRA file '{path}' cannot be loaded by diffusers' LoRA loader: {exc}") from exc
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[w for _, w in sources])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()  # the LoRA modules go, the fused weights stay
    return sources
