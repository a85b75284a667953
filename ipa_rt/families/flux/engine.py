"""Flux transformer engines: ONNX Runtime and OpenVINO (TensorRT through the same contract, untested here).

The contract's inputs are the pipeline's tensors (:data:`INPUTS`), each adapter's image tokens ``ip_tokens_<a>``
``[B, n_img, T, C]`` and ``ip_scale`` ``[adapters, blocks]``; the image keys/values are computed in-graph.
:class:`EngineTransformer` takes the transformer's place in diffusers' pipeline (same ``forward`` arguments,
``config``, ``dtype``, ``cache_context``) and feeds zero tokens and a zero scale without an image prompt
(docs/guides/flux.md, "Engines": static shapes, adapters built in, what runs in PyTorch).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import Tensor, nn

from ...errors import ConfigError
from ...runtime.lru import IdentityMemo
from ..base import EngineStandIn
from .adapter import FluxImageSide, FluxImageTokens

# The transformer's forward arguments that become engine inputs, in order, per transformer class.
INPUTS = {
    "FluxTransformer2DModel": (
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "guidance",
        "txt_ids",
        "img_ids",
    ),
    # Chroma: no pooled text or guidance embedding; the text+image attention mask as diffusers' Chroma pipelines pass
    # it: float 1/0 in the latents' dtype (which the transformer's SDPA adds to the scores)
    "ChromaTransformer2DModel": (
        "hidden_states",
        "encoder_hidden_states",
        "timestep",
        "txt_ids",
        "img_ids",
        "attention_mask",
    ),
}
NETWORK = "transformer"


def class_inputs(class_name: str | None) -> tuple[str, ...]:
    """:data:`INPUTS` of a transformer class; a ``ConfigError`` for a class Flux engines do not support."""
    if class_name not in INPUTS:
        raise ConfigError(
            f"engines for a {class_name} are not supported yet (Flux engines: {sorted(INPUTS)}); use backend='torch'"
        )
    return INPUTS[class_name]


def input_names(transformer: nn.Module) -> tuple[str, ...]:
    names = class_inputs(type(transformer).__name__)
    return tuple(n for n in names if n != "guidance" or transformer.config.guidance_embeds)


class ExportedTransformer(nn.Module):
    """The traceable network: the transformer with ipa_rt's processors, image tokens and scale as inputs."""

    def __init__(self, transformer: nn.Module, side: FluxImageSide, names: tuple[str, ...]) -> None:
        super().__init__()
        self.transformer, self.side, self.names = transformer, side, names

    def forward(self, *args: Tensor) -> Tensor:
        n, adapters = len(self.names), self.side.num_ip_adapters
        kwargs = dict(zip(self.names, args[:n], strict=True))
        tokens, scale = list(args[n : n + adapters]), args[-1]
        prepared = FluxImageTokens(tokens, self.side.image_kv(tokens), self.side, scale=scale)
        out = self.transformer(**kwargs, joint_attention_kwargs={"ip_hidden_states": prepared}, return_dict=False)
        return out[0]


def example_inputs(pipe: Any, height: int, width: int, batch: int, text_tokens: int, images: int) -> dict[str, Tensor]:
    """Example tensors at the build's static shapes (values only steer tracing, never the graph)."""
    t, cfg = pipe.transformer, pipe.transformer.config
    side: FluxImageSide = t.encoder_hid_proj
    packed = 2 * pipe.vae_scale_factor  # Flux packs 2x2 latent pixels per token
    if height % packed or width % packed:
        raise ConfigError(f"height {height} and width {width} must be multiples of {packed} for this model")
    n = (height // packed) * (width // packed)
    g = torch.Generator().manual_seed(0)
    full = {
        "hidden_states": torch.randn(batch, n, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, cfg.get("pooled_projection_dim", 1), generator=g),
        "timestep": torch.full((batch,), 0.5),
        "guidance": torch.full((batch,), 3.5),
        "txt_ids": torch.zeros(text_tokens, 3),
        "img_ids": torch.zeros(n, 3),
        "attention_mask": torch.ones(batch, text_tokens + n),
    }
    out = {name: full[name] for name in input_names(t)}
    for a, proj in enumerate(side.image_projection_layers):
        tokens = proj.num_image_text_embeds
        out[f"ip_tokens_{a}"] = torch.randn(batch, images, tokens, cfg.joint_attention_dim, generator=g)
    out["ip_scale"] = torch.ones(side.num_ip_adapters, side.num_blocks)
    return out


class EngineTransformer(EngineStandIn):
    """Stands in for the transformer in diffusers' Flux/Chroma pipeline and runs the engine (see the module
    docstring)."""

    what = "a Flux engine"

    def __init__(
        self, engine: Any, config: Any, names: tuple[str, ...], shapes: dict[str, list[int]], built: dict[str, int]
    ) -> None:
        super().__init__(engine, config, shapes, {k: built[k] for k in ("height", "width", "max_sequence_length")})
        self.names = names
        self.encoder_hid_proj: FluxImageSide | None = None
        self._tokens = IdentityMemo()

    def install_image_side(self, side: FluxImageSide | None) -> None:
        self.claim(side is not None)
        self.encoder_hid_proj = side
        self._tokens.clear()

    def forward(
        self,
        hidden_states: Tensor,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        **inputs: Tensor,
    ) -> Any:
        inputs["hidden_states"] = hidden_states
        embeds = (joint_attention_kwargs or {}).pop("ip_adapter_image_embeds", None)
        if "attention_mask" in self.names:
            mask = inputs.get("attention_mask")
            if mask is not None and not mask.is_floating_point():
                raise ConfigError(
                    "attention_mask: the engine takes the float mask diffusers' Chroma pipelines build; got "
                    f"{mask.dtype} (run the transformer on the torch backend for other masks)"
                )
            inputs["attention_mask"] = torch.ones(self.shapes["attention_mask"]) if mask is None else mask
        feeds = {name: inputs[name] for name in self.names}
        side = self.encoder_hid_proj
        if side is not None and embeds is not None:
            with torch.no_grad():
                items = list(embeds)
                tokens = self._tokens.get(items) or self._tokens.put(items, side.project(items))  # once per call
            feeds |= {f"ip_tokens_{a}": t for a, t in enumerate(tokens)}
            feeds["ip_scale"] = side.scale
        else:  # no image prompt: zero tokens and a zero scale add exactly nothing
            feeds |= {k: torch.zeros(v) for k, v in self.shapes.items() if k.startswith("ip_")}
        (out,) = self.engine(feeds)
        return self.output(out, return_dict, Transformer2DModelOutput)
