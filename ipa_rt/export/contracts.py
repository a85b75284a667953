"""One export contract per network (the TensorRT demo's pattern): a traceable wrapper module, named inputs and
outputs, example inputs, and the batch axis with its min/opt/max range (the optimisation profile).

Live controls stay inputs (the image tokens, the ``[rows, adapters, layers]`` scale), so a new scale or reference
never needs a new export or engine; spatial sizes and token counts are static per build (what CUDA-graph replay
needs anyway), the batch axis dynamic (docs/design.md, engines: each network's inputs).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..controls.t2i import feature_layout
from ..errors import ConfigError
from ..models import pooled_text_width

EXAMPLE_BATCH = 2  # torch.export specialises sizes 0 and 1: trace with 2 so the batch axis stays symbolic
MAX_IMAGES = 4  # reference images per adapter and call an engine accepts (the CLIP encoder's batch)


@dataclass
class Contract:
    """What one network exports: module, ordered input names and example tensors, output names, and which
    inputs carry the batch axis (dim 0) with its ``(min, opt, max)`` range."""

    name: str
    module: nn.Module
    inputs: dict[str, Tensor]  # ordered: the forward's positional arguments
    outputs: tuple[str, ...]
    batched: tuple[str, ...] = ()  # inputs whose dim 0 is the dynamic batch
    batch: tuple[int, int, int] = (1, 1, 1)
    meta: dict = field(default_factory=dict)  # shapes and facts for the manifest
    per_row: dict[str, int] = field(default_factory=dict)  # batched inputs with k rows per batch row (video: frames)

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Per input ``(min, opt, max)`` shapes: the one TensorRT optimisation profile of this network."""
        out = {}
        for name, x in self.inputs.items():
            shape = tuple(x.shape)
            if name in self.batched:
                k = self.per_row.get(name, 1)
                out[name] = tuple((k * b, *shape[1:]) for b in self.batch)
            else:
                out[name] = (shape, shape, shape)
        return out


def _batch(opt: int, most: int) -> tuple[int, int, int]:
    most = max(most, EXAMPLE_BATCH)
    return (1, min(opt, most), most)


class UNetIP(nn.Module):
    """UNet + decoupled cross-attention with image tokens and scales as inputs (K/V computed in-graph)."""

    def __init__(self, pipe, extra: tuple[str, ...], adapters: int, residuals: int, intrablock: int) -> None:
        super().__init__()
        self.unet, self.stack, self.extra, self.adapters = pipe.unet, pipe.adapters, extra, adapters
        self.residuals = residuals  # ControlNet down residuals + 1 mid (0: no ControlNet inputs)
        self.intrablock = intrablock  # T2I-Adapter features (0: no T2I-Adapter inputs)

    def forward(self, sample: Tensor, timestep: Tensor, text: Tensor, *rest: Tensor) -> Tensor:
        extra = dict(zip(self.extra, rest[: len(self.extra)], strict=True))
        if "text_embeds" in extra:  # diffusers concatenates it with the fp32 time embedding (torch promotes to fp32;
            extra["text_embeds"] = extra["text_embeds"].float()  # the exporter would leave a mixed-type Concat)
        rest = rest[len(self.extra) :]
        control, rest = rest[: self.residuals], rest[self.residuals :]
        intrablock, rest = rest[: self.intrablock], rest[self.intrablock :]
        tokens, scale = rest[: self.adapters], rest[-1]
        cond = extra.pop("timestep_cond", None)
        extra_res = {}
        if control:
            extra_res["down_block_additional_residuals"] = list(control[:-1])
            extra_res["mid_block_additional_residual"] = control[-1]
        if intrablock:
            extra_res["down_intrablock_additional_residuals"] = list(intrablock)  # the UNet pops from this list
        bounds = list(itertools.accumulate((t.shape[1] for t in tokens), initial=0))
        self.stack.context.trace(self.stack.image_kv(tokens), list(itertools.pairwise(bounds)), scale)
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=text,
            timestep_cond=cond,
            added_cond_kwargs=extra,
            return_dict=False,
            **extra_res,
        )[0]


class _Call(nn.Module):
    def __init__(self, fn: Callable[..., Tensor], owner: nn.Module) -> None:
        super().__init__()
        self.owner, self.fn = owner, fn

    def forward(self, *args: Tensor) -> Tensor:
        return self.fn(*args)


def unet_contract(pipe, batch: int, height: int, width: int, frames: int = 0) -> Contract:
    """``noise_pred = unet(sample, timestep, encoder_hidden_states[, timestep_cond][, text_embeds, time_ids]
    [, down_residual_0.., mid_residual][, intrablock_0..], ip_tokens_0.., ip_scale)``; rows range over
    1..2·batch (guidance doubles them). ControlNet residuals and T2I-Adapter features arrive already scaled.
    ``frames`` (AnimateDiff's motion UNet): ``sample`` is ``[rows, C, frames, h, w]`` and the text and image tokens
    come per frame (``rows * frames``), as the video pipeline repeats them."""
    if pipe.adapters is None:
        raise ConfigError("export needs a pipeline with IP-Adapters loaded")
    if height % 8 or width % 8:
        raise ConfigError(f"height and width must be divisible by 8; got {height}x{width}")
    dev, dt, cfg = pipe.device, pipe.dtype, pipe.unet.config
    rows, vsf = EXAMPLE_BATCH, pipe.vae_scale_factor
    per = max(frames, 1)  # text and image-token rows per sample row
    latent = (cfg.in_channels, *((frames,) if frames else ()), height // vsf, width // vsf)
    inputs: dict[str, Tensor] = {
        "sample": torch.randn(rows, *latent, device=dev, dtype=dt),
        "timestep": torch.full((rows,), 500.0, device=dev),
        "encoder_hidden_states": torch.randn(rows * per, 77, cfg.cross_attention_dim, device=dev, dtype=dt),
    }
    extra: tuple[str, ...] = ()
    if cfg.time_cond_proj_dim is not None:  # LCM-distilled UNets take guidance as an embedding
        extra += ("timestep_cond",)
        inputs["timestep_cond"] = torch.randn(rows, cfg.time_cond_proj_dim, device=dev, dtype=dt)
    if pipe.family.pooled_text:
        extra += ("text_embeds", "time_ids")
        inputs["text_embeds"] = torch.randn(rows, pooled_text_width(cfg), device=dev, dtype=dt)
        inputs["time_ids"] = torch.tensor([[height, width, 0, 0, height, width]] * rows, device=dev, dtype=dt)
    residuals = _residual_shapes(pipe, rows, height, width) if pipe.control is not None else []
    for i, shape in enumerate(residuals):
        name = "mid_residual" if i == len(residuals) - 1 else f"down_residual_{i}"
        inputs[name] = torch.randn(*shape, device=dev, dtype=dt)
    features = feature_layout(pipe.t2i.adapters[0].config) if pipe.t2i is not None else []
    for j, (channels, stride) in enumerate(features):
        inputs[f"intrablock_{j}"] = torch.randn(rows, channels, height // stride, width // stride, device=dev, dtype=dt)
    tokens = []
    for a, entry in enumerate(pipe.adapters.entries):
        count = entry.tokens_per_image or pipe.image_encoder_tokens()
        inputs[f"ip_tokens_{a}"] = torch.randn(rows * per, count, cfg.cross_attention_dim, device=dev, dtype=dt)
        tokens.append(count)
    inputs["ip_scale"] = pipe.adapters.scale.expand(rows * per, -1, -1).clone()  # a scale per text row
    batched = tuple(inputs)
    meta = {"height": height, "width": width, "tokens": tokens, "layers": len(pipe.adapters.layer_names)}
    module = UNetIP(pipe, extra, len(tokens), len(residuals), len(features)).eval()
    per_frame = ("encoder_hidden_states", "ip_scale")
    per_row = {k: per for k in inputs if k in per_frame or k.startswith("ip_tokens_")} if frames else {}
    batches = _batch(2 * batch, 2 * batch)
    return Contract("unet", module, inputs, ("noise_pred",), batched, batches, meta, per_row)


def _residual_shapes(pipe, rows: int, height: int, width: int) -> list[tuple[int, ...]]:
    """Shapes of a ControlNet's down residuals and mid residual at this size (one dry run of the first net)."""
    net = pipe.control.nets[0]
    vsf, cfg = pipe.vae_scale_factor, pipe.unet.config
    added = {}
    if pipe.family.pooled_text:
        added = {"text_embeds": torch.zeros(1, pooled_text_width(cfg)), "time_ids": torch.zeros(1, 6)}
    with torch.no_grad():
        down, mid = net(
            torch.zeros(1, cfg.in_channels, height // vsf, width // vsf),
            torch.zeros(1),
            encoder_hidden_states=torch.zeros(1, 77, cfg.cross_attention_dim),
            controlnet_cond=torch.zeros(1, net.config.conditioning_channels, height, width),
            added_cond_kwargs=added or None,
            return_dict=False,
        )
    return [(rows, *x.shape[1:]) for x in (*down, mid)]


def residual_names(unet_inputs: dict[str, Tensor]) -> list[str]:
    """The UNet contract's ControlNet residual inputs (down ones, then the mid one)."""
    return [k for k in unet_inputs if k.startswith("down_residual_") or k == "mid_residual"]


class _ControlNet(nn.Module):
    """A ControlNet with its per-residual scales as an input (``[down + 1]``: the conditioning scale, times
    diffusers' guess-mode ramp when asked), so scale, guidance range and guess mode stay live."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, sample, timestep, text, cond, scales, *added: Tensor) -> tuple[Tensor, ...]:
        kwargs = {"added_cond_kwargs": dict(zip(("text_embeds", "time_ids"), added, strict=True))} if added else {}
        down, mid = self.net(
            sample, timestep, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False, **kwargs
        )
        return tuple(x * scales[i].to(x.dtype) for i, x in enumerate((*down, mid)))


def controlnet_contract(pipe, index: int, batch: int, height: int, width: int, unet: dict[str, Tensor]) -> Contract:
    """``(down_residual_0.., mid_residual) = controlnet_i(sample, timestep, encoder_hidden_states,
    controlnet_cond, conditioning_scales[, text_embeds, time_ids])``."""
    net = pipe.control.nets[index]  # ``unet``: the UNet contract's example inputs (same rows and sizes)
    rows = EXAMPLE_BATCH
    count = len(residual_names(unet))
    dev, dt = pipe.device, pipe.dtype
    latent = unet["sample"]  # a 9-channel inpainting UNet's ControlNets still see the 4 latent channels
    inputs = {
        "sample": torch.randn(rows, net.config.in_channels, *latent.shape[2:], device=dev, dtype=dt),
        "timestep": unet["timestep"],
        "encoder_hidden_states": unet["encoder_hidden_states"],
        "controlnet_cond": torch.rand(rows, net.config.conditioning_channels, height, width, device=dev, dtype=dt),
        "conditioning_scales": torch.rand(count, device=dev),
    }
    if pipe.family.pooled_text:
        inputs["text_embeds"], inputs["time_ids"] = unet["text_embeds"], unet["time_ids"]
    outputs = (*(f"down_residual_{i}" for i in range(count - 1)), "mid_residual")
    batched = tuple(k for k in inputs if k != "conditioning_scales")
    module = _ControlNet(net).eval()
    return Contract(f"controlnet_{index}", module, inputs, outputs, batched, _batch(2 * batch, 2 * batch))


def t2i_adapter_contract(pipe, index: int, batch: int, height: int, width: int) -> Contract:
    """``(feature_0..) = t2i_adapter_i(image)``: unweighted features, once per request (the weights are applied
    per step outside, from the live scale tensor)."""
    adapter = pipe.t2i.adapters[index]
    image = torch.rand(
        EXAMPLE_BATCH, adapter.config["in_channels"], height, width, device=pipe.device, dtype=pipe.dtype
    )
    outputs = tuple(f"feature_{j}" for j in range(len(feature_layout(adapter.config))))
    module = _Call(lambda x: tuple(adapter(x)), adapter).eval()
    return Contract(f"t2i_adapter_{index}", module, {"image": image}, outputs, ("image",), _batch(1, batch))


def image_projection_contract(pipe, index: int, batch: int) -> Contract:
    """``ip_tokens = projection(image_embeds)`` for adapter ``index`` (FaceID-Plus needs its CLIP states too:
    not exportable as one input yet)."""
    entry = pipe.adapters.entries[index]
    if entry.spec.needs_clip_states:
        raise ConfigError(
            f"IP-Adapter {index} ({entry.spec.description}) has two image inputs (face embedding and CLIP states); "
            "engines do not support it yet: use backend='torch'"
        )
    dev, dt = pipe.device, pipe.dtype
    if entry.spec.encoder_output == "hidden_states":
        shape = (EXAMPLE_BATCH, pipe.image_encoder_tokens(), pipe.image_encoder.config.hidden_size)
    else:
        dim = entry.spec.encoder_dim(entry.projection) or entry.spec.face_id_dim(entry.projection)
        shape = (EXAMPLE_BATCH, dim)
    example = {"image_embeds": torch.randn(*shape, device=dev, dtype=dt)}
    module = _Call(entry.projection, entry.projection).eval()
    most = 2 * batch * MAX_IMAGES  # guidance rows x images
    return Contract(f"image_projection_{index}", module, example, ("ip_tokens",), ("image_embeds",), _batch(2, most))


def image_encoder_contract(pipe) -> Contract:
    """``(image_embeds, penultimate hidden states) = clip(pixel_values)``: the two outputs adapters read."""
    enc = pipe.image_encoder
    cfg = enc.config

    def run(px: Tensor) -> tuple[Tensor, Tensor]:
        out = enc(px, output_hidden_states=True)
        return out.image_embeds, out.hidden_states[-2]

    px = torch.randn(EXAMPLE_BATCH, 3, cfg.image_size, cfg.image_size, device=pipe.device, dtype=pipe.dtype)
    module, outputs = _Call(run, enc).eval(), ("image_embeds", "hidden_states")
    return Contract("image_encoder", module, {"pixel_values": px}, outputs, ("pixel_values",), _batch(1, MAX_IMAGES))


def text_encoder_contract(pipe, index: int, batch: int) -> Contract:
    """``(output[0], penultimate hidden states) = text_encoder_i(input_ids)``: the last hidden state (or the
    projected pooled embedding of SDXL's second encoder) and what SDXL reads."""
    enc = pipe.text_encoders[index]

    def run(ids: Tensor) -> tuple[Tensor, Tensor]:
        out = enc(ids, output_hidden_states=True)
        return out[0], out.hidden_states[-2]

    ids = torch.randint(0, enc.config.vocab_size, (EXAMPLE_BATCH, 77), device=pipe.device)
    module, outputs = _Call(run, enc).eval(), ("output", "hidden_states")
    return Contract(f"text_encoder_{index}", module, {"input_ids": ids}, outputs, ("input_ids",), _batch(batch, batch))


def vae_decoder_contract(pipe, batch: int, height: int, width: int) -> Contract:
    vae, vsf = pipe.vae, pipe.vae_scale_factor
    module = _Call(lambda x: vae.decode(x, return_dict=False)[0], vae).eval()
    shape = (EXAMPLE_BATCH, vae.config.latent_channels, height // vsf, width // vsf)
    latents = torch.randn(*shape, device=pipe.device, dtype=next(vae.parameters()).dtype)
    return Contract("vae_decoder", module, {"latents": latents}, ("images",), ("latents",), _batch(batch, batch))


def vae_encoder_contract(pipe, batch: int, height: int, width: int) -> Contract:
    """The posterior's moments (mean and log-variance): sampling with the user's generator stays outside. A tiny
    autoencoder (TAESD) has no posterior: its latents."""
    vae = pipe.vae
    dtype = next(vae.parameters()).dtype
    px = torch.randn(EXAMPLE_BATCH, 3, height, width, device=pipe.device, dtype=dtype)
    if is_tiny(vae):
        module, outputs = _Call(lambda x: vae.encode(x).latents, vae).eval(), ("latents",)
    else:
        module, outputs = _Call(lambda x: vae.encode(x).latent_dist.parameters, vae).eval(), ("moments",)
    return Contract("vae_encoder", module, {"images": px}, outputs, ("images",), _batch(batch, batch))


def is_tiny(vae) -> bool:
    """A TAESD-style autoencoder (diffusers' ``AutoencoderTiny``): latents out of ``encode``, no posterior."""
    return type(vae).__name__ == "AutoencoderTiny"


def all_contracts(pipe, batch: int, height: int, width: int, frames: int = 0) -> list[Contract]:
    """Every network of a pipeline: UNet, ControlNets, T2I-Adapters, projections, CLIP encoder, text encoders,
    VAE decoder and encoder. ``frames`` (video): the motion UNet for clips of that many frames, and VAEs that take
    a clip's frames at once (decode and encode chunks of up to ``batch * frames``)."""
    out = [unet_contract(pipe, batch, height, width, frames)]
    vae_batch = batch * max(frames, 1)
    if pipe.control is not None:
        nets = range(len(pipe.control.nets))
        out += [controlnet_contract(pipe, i, batch, height, width, out[0].inputs) for i in nets]
    if pipe.t2i is not None:
        out += [t2i_adapter_contract(pipe, i, batch, height, width) for i in range(len(pipe.t2i.adapters))]
    out += [image_projection_contract(pipe, a, batch) for a in range(pipe.adapters.num_adapters)]
    if pipe.image_encoder is not None:
        out.append(image_encoder_contract(pipe))
    out += [text_encoder_contract(pipe, i, batch) for i in range(len(pipe.text_encoders))]
    if pipe.vae is not None:  # a UNet-only base has none (nor text encoders): its engines are the UNet's side only
        out += [vae_decoder_contract(pipe, vae_batch, height, width)]
        out += [vae_encoder_contract(pipe, vae_batch, height, width)]
    return out
