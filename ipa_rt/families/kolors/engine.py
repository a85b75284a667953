"""Kolors UNet engines: ONNX Runtime and OpenVINO (TensorRT through the same contract, untested here).

The contract is the SD1.5/SDXL UNet's (:class:`ipa_rt.export.contracts.UNetIP`) with Kolors' text projection (ChatGLM
4096 → 2048) inside the graph, so the engine takes ChatGLM's states as diffusers passes them; :class:`EngineUNet`
stands in for the UNet in diffusers' ``KolorsPipeline`` (docs/guides/kolors.md, "Engines").
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import Tensor, nn

from ...errors import ConfigError
from ...export.contracts import Contract, UNetIP
from ...runtime.lru import IdentityMemo
from ..base import EngineStandIn

NETWORK = "unet"


@contextlib.contextmanager
def text_projection_in_graph(unet: nn.Module):
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
    module = UNetIP(SimpleNamespace(unet=unet, adapters=stack), ("text_embeds", "time_ids"), len(stack.entries), 0, 0)
    batch = (1, 2 * shapes["batch"], 2 * shapes["batch"])
    return Contract(NETWORK, module.eval(), inputs, ("noise_pred",), tuple(inputs), batch)


class EngineUNet(EngineStandIn):
    """Stands in for the UNet in diffusers' Kolors pipeline and runs the engine. ``structure`` is the UNet's module
    tree on the meta device (no weights): what the adapter loader checks shapes against and InstantStyle scale dicts
    are expanded over."""

    what = "a Kolors engine"

    def __init__(self, engine: Any, config: Any, shapes: dict[str, list[int]], built: dict[str, int]) -> None:
        super().__init__(engine, config, shapes, {k: built[k] for k in ("height", "width")})
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
        return self.output(out, return_dict, UNet2DConditionOutput)
