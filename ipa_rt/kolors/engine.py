"""Kolors UNet engines: ONNX Runtime and OpenVINO (TensorRT through the same contract, untested here).

The export contract is the SD1.5/SDXL UNet's (:class:`ipa_rt.export.contracts._UNetIP`: each adapter's image tokens
and the ``[rows, adapters, layers]`` scale are inputs, the image keys/values computed in the graph) with Kolors' text
projection (ChatGLM 4096 → 2048) inside the graph, so the engine takes ChatGLM's states as diffusers' pipeline passes
them. :class:`EngineUNet` stands in for the UNet in diffusers' ``KolorsPipeline``; the adapters' projections run in
PyTorch once per call and feed the engine. The build mechanics are :mod:`ipa_rt.export.wrapped`'s.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from .. import console
from ..checkpoint import adapter_sources
from ..errors import ConfigError
from ..export import wrapped
from ..export.contracts import Contract, _UNetIP
from ..export.wrapped import EngineStandIn
from ..lru import IdentityMemo
from ..models import _read_json

NETWORK = "unet"
BASE_PARTS = ("model_index.json", "unet")


@contextlib.contextmanager
def _text_projection_in_graph(unet: nn.Module):
    """While exporting: the UNet as without an adapter (``encoder_hid_proj`` = Kolors' text projection), its
    processors still ipa_rt's, which read the image side from the context the contract fills."""
    saved = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
    unet.encoder_hid_proj, unet.config.encoder_hid_dim_type = unet.text_encoder_hid_proj, "text_proj"
    try:
        yield
    finally:
        unet.encoder_hid_proj, unet.config.encoder_hid_dim_type = saved


def unet_contract(pipe: Any, shapes: dict[str, int]) -> Contract:
    """``noise_pred = unet(sample, timestep, encoder_hidden_states, text_embeds, time_ids, ip_tokens_0.., ip_scale)``
    at the build's size; rows range over 1..2·batch (CFG doubles them)."""
    unet, stack, cfg = pipe.unet, pipe.adapters, pipe.unet.config
    rows, vsf, text = 2, pipe.vae_scale_factor, shapes["max_sequence_length"]
    if shapes["height"] % 8 or shapes["width"] % 8:
        raise ConfigError(f"height and width must be divisible by 8; got {shapes['height']}x{shapes['width']}")
    g = torch.Generator().manual_seed(0)
    latent = (cfg.in_channels, shapes["height"] // vsf, shapes["width"] // vsf)
    pooled = unet.add_embedding.linear_1.in_features - 6 * cfg.addition_time_embed_dim
    inputs: dict[str, Tensor] = {
        "sample": torch.randn(rows, *latent, generator=g),
        "timestep": torch.full((rows,), 500.0),
        "encoder_hidden_states": torch.randn(rows, text, cfg.encoder_hid_dim, generator=g),
        "text_embeds": torch.randn(rows, pooled, generator=g),
        "time_ids": torch.tensor([[shapes["height"], shapes["width"], 0, 0, shapes["height"], shapes["width"]]] * rows),
    }
    for a, entry in enumerate(stack.entries):
        count = entry.tokens_per_image * shapes["images"]
        inputs[f"ip_tokens_{a}"] = torch.randn(rows, count, cfg.cross_attention_dim, generator=g)
    inputs["ip_scale"] = stack.scale.expand(rows, -1, -1).clone()
    module = _UNetIP(SimpleNamespace(unet=unet, adapters=stack), ("text_embeds", "time_ids"), len(stack.entries), 0, 0)
    batch = (1, 2 * shapes["batch"], 2 * shapes["batch"])
    return Contract(NETWORK, module.eval(), inputs, ("noise_pred",), tuple(inputs), batch)


def kolors_engines(
    base: str | os.PathLike,
    ip_adapter: Any,
    image_encoder: Any,
    backend: str,
    engine_options: dict[str, Any] | None = None,
    out: str | os.PathLike | None = None,
    class_name: str = "KolorsPipeline",
    subfolder: Any = None,
    weight_name: Any = None,
) -> Path:
    """Build the UNet engine for ``base`` with ``ip_adapter`` (into ``out``, else the cache) or find it built;
    ``engine_options``: ``height``, ``width`` (1024), ``batch`` (1), ``max_sequence_length`` (256), ``images`` per
    adapter (1), ``precision`` (OpenVINO) and ``rebuild``."""
    from .pipelines import load_pretrained

    wrapped.check_backend(backend, "Kolors")
    if ip_adapter is None:
        raise ConfigError("Kolors engines are built with their IP-Adapter(s): give ip_adapter")
    base = os.fspath(base)
    unet_cfg = _read_json(base, "unet/config.json", {})
    vae = _read_json(base, "vae/config.json", {})
    size = unet_cfg.get("sample_size", 128) * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    defaults = {"height": size, "width": size, "batch": 1, "max_sequence_length": 256, "images": 1}
    options = wrapped.shape_options(engine_options, defaults, "Kolors")
    adapters = adapter_sources(ip_adapter, subfolder, weight_name)
    sources = wrapped.source_records(base, BASE_PARTS, adapters, image_encoder)
    ident = wrapped.identity("kolors", class_name, backend, options, sources, image_encoder)

    def build(folder: Path) -> None:
        pipe = load_pretrained(base, adapters, image_encoder, class_name=class_name)
        contract = unet_contract(pipe, options["shapes"])
        record = {
            "kind": "kolors",
            "identity": ident,
            "sources": sources,
            "shapes": options["shapes"],
            "pipeline": class_name,
            "base": os.path.abspath(base) if os.path.isdir(base) else base,
            "adapters": [sources[f"ip_adapter_{i}"]["path"] for i in range(len(adapters))],
            "image_encoder": pipe.image_encoder.config.name_or_path if pipe.image_encoder is not None else None,
        }
        with _text_projection_in_graph(pipe.unet):
            wrapped.write_engine(folder, contract, backend, options["precision"], record)

    return wrapped.cached_build(ident, out, options["rebuild"], build)


class EngineUNet(EngineStandIn):
    """Stands in for the UNet in diffusers' Kolors pipeline and runs the engine. ``structure`` is the UNet's module
    tree on the meta device (no weights): what the adapter loader checks shapes against and InstantStyle scale dicts
    are expanded over."""

    what = "a Kolors engine"

    def __init__(self, engine: Any, config: Any, shapes: dict[str, list[int]], built: dict[str, int]) -> None:
        super().__init__(engine, config, shapes, {k: built[k] for k in ("height", "width")})
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            self.structure = [UNet2DConditionModel.from_config(dict(config))]  # a list: not a submodule
        width = self.structure[0].add_embedding.linear_1.in_features  # diffusers' pipeline reads it
        self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=width))
        self.encoder_hid_proj: nn.Module | None = None
        self.stack: Any = None
        self._tokens = IdentityMemo()

    def install_adapters(self, stack: Any, side: nn.Module | None) -> None:
        self.claim(stack is not None)
        self.stack, self.encoder_hid_proj = stack, side
        self._tokens.clear()

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        timestep_cond: Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        added_cond_kwargs: dict | None = None,
        return_dict: bool = True,
    ) -> Any:
        rows = sample.shape[0]
        added = dict(added_cond_kwargs or {})
        feeds = {
            "sample": sample,
            "timestep": torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(rows),
            "encoder_hidden_states": encoder_hidden_states,
            "text_embeds": added["text_embeds"],
            "time_ids": added["time_ids"],
        }
        embeds, stack = added.get("image_embeds"), self.stack
        if stack is not None and embeds is not None:
            with torch.no_grad():
                items = list(embeds)  # the Resampler once per call, not per step
                tokens = self._tokens.get(items) or self._tokens.put(items, stack.project(items, [None] * len(items)))
            feeds |= {f"ip_tokens_{a}": t.reshape(rows, -1, t.shape[-1]) for a, t in enumerate(tokens)}
            feeds["ip_scale"] = stack.scale.expand(rows, -1, -1)
        else:  # no image prompt: zero tokens and a zero scale add exactly nothing
            feeds |= {k: torch.zeros([rows, *v[1:]]) for k, v in self.shapes.items() if k.startswith("ip_")}
        (out,) = self.engine(feeds)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return self.output(out, return_dict, UNet2DConditionOutput)


def load_kolors_engine(folder: str | os.PathLike, device: torch.device | str = "cpu") -> Any:
    """The folder's Kolors pipeline class (``ipa_rt.kolors``'s) whose UNet runs the engine in ``folder``."""
    from diffusers.configuration_utils import FrozenDict
    from transformers import CLIPVisionModelWithProjection

    from .pipelines import runtime_class

    manifest, engine = wrapped.open_engine(folder, device, "kolors")
    base = manifest["base"]
    unet = EngineUNet(
        engine, FrozenDict(_read_json(base, "unet/config.json", {})), wrapped.built_shapes(manifest), manifest["shapes"]
    )
    with console.hushed(bars=True):
        pipe = runtime_class(manifest["pipeline"]).from_pretrained(base, unet=unet, dtype=torch.float32).to(device)
        if manifest["image_encoder"] is not None and getattr(pipe, "image_encoder", None) is None:
            encoder = CLIPVisionModelWithProjection.from_pretrained(manifest["image_encoder"]).eval()
            pipe.register_modules(image_encoder=encoder)
    pipe.load_ip_adapter(manifest["adapters"], image_encoder_folder=None)
    return pipe
