"""The SD3.5 family's spec (InstantX adapters): its pipelines, the transformer engine's shapes, export contract and
stand-in; the mechanics are :class:`ipa_rt.families.base.Family`'s."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ...console import hushed
from ...errors import ConfigError
from ...models import read_json
from ..base import Export, Family, vae_scale_factor
from .pipelines import SD3AdapterMixin


class SD3Family(Family):
    kind, title, module, mixin, network = "sd3", "SD3.5", "ipa_rt.sd3", SD3AdapterMixin, "transformer"
    # what of the base model the engine depends on (the CLIP tokenizer's length is part of the text input's shape)
    base_parts = ("model_index.json", "transformer", "tokenizer/tokenizer_config.json")
    default_weight = "ip-adapter.safetensors"  # diffusers' SD3 load_ip_adapter's default weight_name
    # Every diffusers pipeline that has SD3IPAdapterMixin (diffusers 0.42), by name: ipa_rt's class of the same name.
    # (StableDiffusion3ModularPipeline has it too, but runs its own blocks, not the methods the mixin replaces.)
    pipelines = (
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3InpaintPipeline",
        "StableDiffusion3ControlNetPipeline",
        "StableDiffusion3ControlNetInpaintingPipeline",
    )

    def load_encoder(self, location: str, dtype: torch.dtype) -> nn.Module:
        from transformers import SiglipVisionModel

        with hushed(bars=True):
            return SiglipVisionModel.from_pretrained(location, dtype=dtype)

    def adapter_arguments(self, ip_adapter: Any, subfolder: Any, weight_name: Any, encoder: Any, dtype: torch.dtype):
        if isinstance(ip_adapter, (list, tuple)) and len(ip_adapter) == 1:  # SD3 takes one adapter (the CLI's list)
            ip_adapter = ip_adapter[0]
        source = os.fspath(ip_adapter) if isinstance(ip_adapter, os.PathLike) else ip_adapter
        kw = {"weight_name": weight_name} if weight_name is not None else {}  # else diffusers' default file name
        return source, {"subfolder": subfolder, **kw}

    def engine_defaults(self, base: str) -> dict[str, int]:
        size = read_json(base, "transformer/config.json", {}).get("sample_size", 128) * vae_scale_factor(base)
        return {"height": size, "width": size, "batch": 1, "max_sequence_length": 256}

    def check_engine(self, base: str, class_name: str, adapters: list) -> None:
        if class_name not in self.pipelines or "ControlNet" in class_name:
            runs = [n for n in self.pipelines if "ControlNet" not in n]
            raise ConfigError(f"SD3.5 engines run in {runs}, not {class_name}; use backend='torch'")
        found = read_json(base, "transformer/config.json", {}).get("_class_name")
        if found != "SD3Transformer2DModel":
            raise ConfigError(f"engines for a {found} are not supported yet; use backend='torch'")
        if len(adapters) != 1:
            raise ConfigError(f"SD3 pipelines take one IP-Adapter (diffusers' SD3IPAdapterMixin); got {len(adapters)}")

    def export(self, base: str, class_name: str, adapters: list, encoder: str | None, shapes: dict) -> Export:
        from diffusers import SD3Transformer2DModel

        from ...export.build import adapter_file
        from .engine import AdapterOnly, image_tokens, sd3_contract

        with hushed(bars=True):
            transformer = SD3Transformer2DModel.from_pretrained(base, subfolder="transformer", dtype=torch.float32)
        AdapterOnly(transformer.eval()).load_ip_adapter(adapter_file(adapters[0]), image_encoder_folder=None)
        # diffusers' prompt embeddings: CLIP's padded tokens, then T5's max_sequence_length
        clip = read_json(base, "tokenizer/tokenizer_config.json", {}).get("model_max_length", 77)
        text = clip + shapes["max_sequence_length"]
        images = image_tokens(base, encoder)
        return Export(sd3_contract(transformer, shapes, text, vae_scale_factor(base), images), encoder)

    def stand_in(self, engine: Any, config: Any, shapes: dict[str, list[int]], manifest: dict) -> Any:
        from .engine import EngineTransformer

        return EngineTransformer(engine, config, shapes, manifest["shapes"])

    def engine_components(self, manifest: dict[str, Any]) -> dict[str, Any]:
        if manifest["image_encoder"] is None:  # the folder's own
            return {}
        from transformers import SiglipVisionModel

        return {"image_encoder": SiglipVisionModel.from_pretrained(manifest["image_encoder"]).eval()}

    def install_built(self, pipe: Any, manifest: dict[str, Any]) -> None:
        pipe.load_ip_adapter(manifest["adapters"][0])


FAMILY = SD3Family()
