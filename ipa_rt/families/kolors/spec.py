"""The Kolors family's spec (Kolors-IP-Adapter-Plus): its pipelines, the UNet engine's shapes, export contract and
stand-in; the mechanics are :class:`ipa_rt.families.base.Family`'s."""

from __future__ import annotations

from typing import Any

from ...console import hushed
from ...models import read_json
from ..base import Export, Family, default_size
from .pipelines import UNetAdapterMixin


class KolorsFamily(Family):
    kind, title, module, mixin, network = "kolors", "Kolors", "ipa_rt.kolors", UNetAdapterMixin, "unet"
    base_parts = ("model_index.json", "unet")
    # Every diffusers pipeline of the Kolors family with IPAdapterMixin (diffusers 0.42): ipa_rt's class of the name.
    pipelines = ("KolorsPipeline", "KolorsImg2ImgPipeline", "KolorsPAGPipeline")

    def engine_defaults(self, base: str) -> dict[str, int]:
        size = default_size(base, read_json(base, "unet/config.json", {}).get("sample_size", 128))
        return {"height": size, "width": size, "batch": 1, "max_sequence_length": 256, "images": 1}

    def export(self, base: str, class_name: str, adapters: list, encoder: str | None, shapes: dict) -> Export:
        from .engine import text_projection_in_graph, unet_contract

        pipe = self.load_torch(class_name, base, adapters, encoder)
        found = pipe.image_encoder.config.name_or_path if pipe.image_encoder is not None else None
        return Export(unet_contract(pipe, shapes), found, scope=text_projection_in_graph(pipe.unet))

    def stand_in(self, engine: Any, config: Any, shapes: dict[str, list[int]], manifest: dict) -> Any:
        from .engine import EngineUNet

        return EngineUNet(engine, config, shapes, manifest["shapes"])

    def install_built(self, pipe: Any, manifest: dict[str, Any]) -> None:
        if manifest["image_encoder"] is not None and getattr(pipe, "image_encoder", None) is None:
            from transformers import CLIPVisionModelWithProjection

            with hushed(bars=True):
                encoder = CLIPVisionModelWithProjection.from_pretrained(manifest["image_encoder"]).eval()
            pipe.register_modules(image_encoder=encoder)
        pipe.load_ip_adapter(manifest["adapters"], image_encoder_folder=None)


FAMILY = KolorsFamily()
