"""The Flux family's spec (Flux.1 and Chroma, XLabs-AI adapters): its pipelines, the transformer engine's shapes,
export contract and stand-in; the mechanics are :class:`ipa_rt.families.base.Family`'s."""

from __future__ import annotations

import os
from typing import Any

import torch

from ...models import read_json
from ..base import Export, Family, default_size
from .engine import NETWORK, EngineTransformer, ExportedTransformer, class_inputs, example_inputs, input_names
from .pipelines import FluxAdapterMixin

DEFAULT_SAMPLE_SIZE = 128  # diffusers' Flux and Chroma pipelines: latent size of the default image (1024² for FLUX.1)


class FluxFamily(Family):
    kind, title, module, mixin, network = "flux", "Flux-family", "ipa_rt.flux", FluxAdapterMixin, NETWORK
    base_parts = ("model_index.json", "transformer")
    # Every diffusers pipeline that has FluxIPAdapterMixin (diffusers 0.42), by name: ipa_rt's class of the same name.
    pipelines = (
        "FluxPipeline",
        "FluxImg2ImgPipeline",
        "FluxInpaintPipeline",
        "FluxControlNetPipeline",
        "FluxKontextPipeline",
        "FluxKontextInpaintPipeline",
        "ChromaPipeline",
        "ChromaImg2ImgPipeline",
        "ChromaInpaintPipeline",
    )

    def load_encoder(self, location: str, dtype: torch.dtype) -> None:
        return None  # load_ip_adapter finds it (XLabs' adapters: image_encoder/ beside the file, or a hub id)

    def adapter_arguments(self, ip_adapter: Any, subfolder: Any, weight_name: Any, encoder: Any, dtype: torch.dtype):
        location = os.fspath(encoder or "image_encoder")
        kw = dict(image_encoder_pretrained_model_name_or_path=location, image_encoder_dtype=dtype)
        return ip_adapter, {"subfolder": subfolder, "weight_name": weight_name, **kw}

    def encoder_source(self, image_encoder: Any) -> str | None:
        return super().encoder_source(image_encoder) or "image_encoder"  # load_ip_adapter's rule

    def engine_defaults(self, base: str) -> dict[str, int]:
        size = default_size(base, DEFAULT_SAMPLE_SIZE)
        return {"height": size, "width": size, "batch": 1, "max_sequence_length": 512, "images": 1}

    def check_engine(self, base: str, class_name: str, adapters: list) -> None:
        class_inputs(read_json(base, "transformer/config.json", {}).get("_class_name"))  # refuses other classes

    def export(self, base: str, class_name: str, adapters: list, encoder: str | None, shapes: dict) -> Export:
        from ...export.contracts import Contract

        pipe = self.load_torch(class_name, base, adapters, encoder)
        names = input_names(pipe.transformer)
        sizes = (shapes["height"], shapes["width"], shapes["batch"], shapes["max_sequence_length"], shapes["images"])
        module = ExportedTransformer(pipe.transformer, pipe.transformer.encoder_hid_proj, names).eval()
        contract = Contract(
            NETWORK, module, example_inputs(pipe, *sizes), ("noise_pred",), batch=(shapes["batch"],) * 3
        )
        found = pipe.image_encoder.config.name_or_path if pipe.image_encoder is not None else None
        return Export(contract, found, {"inputs": list(names)})

    def stand_in(self, engine: Any, config: Any, shapes: dict[str, list[int]], manifest: dict) -> EngineTransformer:
        return EngineTransformer(engine, config, tuple(manifest["inputs"]), shapes, manifest["shapes"])

    def install_built(self, pipe: Any, manifest: dict[str, Any]) -> None:
        encoder = {"image_encoder_pretrained_model_name_or_path": manifest["image_encoder"]}
        pipe.load_ip_adapter(manifest["adapters"], weight_name=None, image_encoder_dtype=torch.float32, **encoder)


FAMILY = FluxFamily()
