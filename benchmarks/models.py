"""Benchmark models: full-size SD1.5 / SDXL architectures from ``configs/`` with seeded random weights,
written in the real diffusers / h94 formats (speed does not depend on weight values)."""

from __future__ import annotations

import json
from pathlib import Path

from ipa_rt import testing as T

CONFIGS = Path(__file__).resolve().parent / "configs"


def _load(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def full_size_configs(family: str) -> dict[str, dict]:
    """Component configs of the real architecture (UNet, VAE, text encoders, ViT-H image encoder)."""
    if family == "sdxl":
        cfg = {"unet": _load("sdxl_unet"), "vae": _load("sdxl_vae"), "text": _load("clip_l_text")}
        cfg["text_2"] = _load("clip_bigg_text")
    else:
        cfg = {"unet": _load("sd15_unet"), "vae": _load("sd15_vae"), "text": _load("clip_l_text")}
    cfg["encoder"] = _load("vit_h_image_encoder")
    cfg["image_size"] = cfg["encoder"]["image_size"]
    return cfg


def write_models(root: Path, family: str = "sd15", full: bool = True, variant: str = "base") -> dict[str, Path]:
    """Base model, IP-Adapter (+ image_encoder/) and a reference image under ``root``."""
    return T.write_example(root, family=family, variant=variant, configs=full_size_configs(family) if full else None)
