"""One export contract per network (the TensorRT demo's pattern): a traceable wrapper module, named inputs
and outputs, and example inputs at the build's shapes.

Live controls stay inputs: the UNet takes the image tokens of every adapter and the ``[adapters, layers]``
scale tensor, so changing the scale or the reference image never needs a new export or engine. Shapes are
static per build (batch, height, width, token counts), which is what CUDA-graph replay needs anyway.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ConfigError


@dataclass
class Contract:
    """What one network exports: module, ordered input names and example tensors, output names."""

    name: str
    module: nn.Module
    inputs: dict[str, Tensor]  # ordered: the forward's positional arguments
    outputs: tuple[str, ...]
    meta: dict = field(default_factory=dict)  # shapes and facts for the manifest


class _UNetIP(nn.Module):
    """UNet + decoupled cross-attention with image tokens and scales as inputs (K/V computed in-graph)."""

    def __init__(self, pipe, added: tuple[str, ...]) -> None:
        super().__init__()
        self.unet, self.stack, self.added = pipe.unet, pipe.adapters, added

    def forward(self, sample: Tensor, timestep: Tensor, text: Tensor, *rest: Tensor) -> Tensor:
        added = dict(zip(self.added, rest[: len(self.added)], strict=True))
        tokens, scale = rest[len(self.added) : -1], rest[-1]
        ctx = self.stack.context
        if tokens:
            ctx.kv, bounds = self.stack.image_kv(tokens), [0]
            for t in tokens:
                bounds.append(bounds[-1] + t.shape[1])
            ctx.segments = list(itertools.pairwise(bounds))
        ctx.scale_eff, ctx.seg_mult, ctx.masks = scale, None, {}
        return self.unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)[0]


class _Call(nn.Module):
    def __init__(self, fn: Callable[..., Tensor], owner: nn.Module) -> None:
        super().__init__()
        self.owner, self.fn = owner, fn

    def forward(self, *args: Tensor) -> Tensor:
        return self.fn(*args)


def unet_contract(pipe, batch: int, height: int, width: int, cfg: bool = True) -> Contract:
    """``noise_pred = unet(sample, timestep, encoder_hidden_states[, text_embeds, time_ids], ip_tokens_*,
    ip_scale)`` at the build's batch (doubled for CFG) and size."""
    if pipe.adapters is None:
        raise ConfigError("export needs a pipeline with IP-Adapters loaded")
    dev, dt = pipe.device, pipe.dtype
    rows = batch * (2 if cfg else 1)
    vsf = pipe.vae_scale_factor
    inputs: dict[str, Tensor] = {
        "sample": torch.randn(rows, pipe.unet.config.in_channels, height // vsf, width // vsf, device=dev, dtype=dt),
        "timestep": torch.full((rows,), 500.0, device=dev),
        "encoder_hidden_states": torch.randn(rows, 77, pipe.unet.config.cross_attention_dim, device=dev, dtype=dt),
    }
    added: tuple[str, ...] = ()
    if pipe.family.pooled_text:
        added = ("text_embeds", "time_ids")
        inputs["text_embeds"] = torch.randn(rows, pipe.text_encoders[-1].config.projection_dim, device=dev, dtype=dt)
        inputs["time_ids"] = torch.tensor([[height, width, 0, 0, height, width]] * rows, device=dev, dtype=dt)
    tokens = []
    for a, entry in enumerate(pipe.adapters.entries):
        count = entry.tokens_per_image or pipe.image_encoder_tokens()
        inputs[f"ip_tokens_{a}"] = torch.randn(rows, count, pipe.unet.config.cross_attention_dim, device=dev, dtype=dt)
        tokens.append(count)
    inputs["ip_scale"] = pipe.adapters.scale.clone()
    meta = {
        "batch": batch,
        "height": height,
        "width": width,
        "cfg": cfg,
        "tokens": tokens,
        "layers": len(pipe.adapters.layer_names),
        "variants": [e.spec.name for e in pipe.adapters.entries],
    }
    return Contract("unet", _UNetIP(pipe, added).eval(), inputs, ("noise_pred",), meta)


def image_projection_contract(pipe, index: int) -> Contract:
    """``ip_tokens = projection(image_embeds)`` for adapter ``index`` (FaceID-Plus needs its CLIP states:
    not exportable as one input yet)."""
    entry = pipe.adapters.entries[index]
    if entry.spec.needs_clip_states:
        raise ConfigError(f"adapter {index} ({entry.spec.description}) has two image inputs; export not supported")
    dev, dt = pipe.device, pipe.dtype
    if entry.spec.encoder_output == "hidden_states":
        cfg = pipe.image_encoder.config
        shape = (2, (cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size)
    else:
        dim = entry.spec.encoder_dim(entry.projection) or entry.spec.face_id_dim(entry.projection)
        shape = (2, dim)
    example = {"image_embeds": torch.randn(*shape, device=dev, dtype=dt)}
    return Contract(
        f"image_projection_{index}",
        _Call(entry.projection, entry.projection).eval(),
        example,
        ("ip_tokens",),
        {"variant": entry.spec.name},
    )


def image_encoder_contract(pipe) -> Contract:
    """``(image_embeds, penultimate_hidden_states) = clip(pixel_values)``."""
    enc = pipe.image_encoder
    cfg = enc.config

    def run(px: Tensor) -> tuple[Tensor, Tensor]:
        out = enc(px, output_hidden_states=True)
        return out.image_embeds, out.hidden_states[-2]

    px = torch.randn(1, 3, cfg.image_size, cfg.image_size, device=pipe.device, dtype=pipe.dtype)
    return Contract("image_encoder", _Call(run, enc).eval(), {"pixel_values": px}, ("image_embeds", "hidden_states"))


def text_encoder_contract(pipe, index: int) -> Contract:
    """``(last_hidden_state or pooled, penultimate) = text_encoder_i(input_ids)``."""
    enc = pipe.text_encoders[index]

    def run(ids: Tensor) -> tuple[Tensor, Tensor]:
        out = enc(ids, output_hidden_states=True)
        return out[0], out.hidden_states[-2]

    ids = torch.randint(0, enc.config.vocab_size, (1, 77), device=pipe.device)
    return Contract(f"text_encoder_{index}", _Call(run, enc).eval(), {"input_ids": ids}, ("output", "hidden_states"))


def vae_decoder_contract(pipe, batch: int, height: int, width: int) -> Contract:
    vae, vsf = pipe.vae, pipe.vae_scale_factor
    z = torch.randn(
        batch,
        vae.config.latent_channels,
        height // vsf,
        width // vsf,
        device=pipe.device,
        dtype=next(vae.parameters()).dtype,
    )
    return Contract(
        "vae_decoder", _Call(lambda x: vae.decode(x, return_dict=False)[0], vae).eval(), {"latents": z}, ("images",)
    )


def vae_encoder_contract(pipe, batch: int, height: int, width: int) -> Contract:
    """The posterior mean (sampling with the user's generator stays outside the engine)."""
    vae = pipe.vae
    px = torch.randn(batch, 3, height, width, device=pipe.device, dtype=next(vae.parameters()).dtype)
    return Contract(
        "vae_encoder", _Call(lambda x: vae.encode(x).latent_dist.mean, vae).eval(), {"images": px}, ("latent_mean",)
    )


def all_contracts(pipe, batch: int, height: int, width: int, cfg: bool = True) -> list[Contract]:
    """Every network of a pipeline: UNet, projections, CLIP encoder, text encoders, VAE decoder and encoder."""
    out = [unet_contract(pipe, batch, height, width, cfg)]
    out += [
        image_projection_contract(pipe, a) for a, e in enumerate(pipe.adapters.entries) if not e.spec.needs_clip_states
    ]
    if pipe.image_encoder is not None:
        out.append(image_encoder_contract(pipe))
    out += [text_encoder_contract(pipe, i) for i in range(len(pipe.text_encoders))]
    out += [vae_decoder_contract(pipe, batch, height, width), vae_encoder_contract(pipe, batch, height, width)]
    return out
