"""Engine-backed stand-ins for the torch modules a :class:`~ipa_rt.Pipeline` calls.

Each stand-in answers the calls ipa_rt's pipeline makes of the diffusers / transformers module it replaces
(same arguments, same outputs, same ``config``), so ``Pipeline.from_engine`` runs the very code path of the
torch backend — prompt encoding, image conditions, the static denoising loop, decoding — with the networks
executed by ONNX Runtime or TensorRT. A zero-size parameter carries the engine's dtype and device for code
that asks a module for them (``next(module.parameters()).dtype``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from torch import Tensor, nn

from ..adapters.variants import VariantSpec
from ..errors import ConfigError
from ..runtime.image_state import ImageContext


class EngineModule(nn.Module):
    """Base of the stand-ins: an engine, a config, and the dtype/device anchor."""

    def __init__(self, engine, config: Any, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.engine, self.config = engine, config
        self.anchor = nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def _timesteps(self, timestep: Tensor | float, rows: int) -> Tensor:
        return torch.as_tensor(timestep, device=self.device).to(torch.float32).reshape(-1).expand(rows)

    def to(self, *args: Any, **kwargs: Any) -> EngineModule:  # engines live where they were loaded
        device = kwargs.get("device", args[0] if args and not isinstance(args[0], torch.dtype) else None)
        if device is not None and torch.device(device) != self.device:
            raise ConfigError(
                f"engine-backed {type(self).__name__} runs on {self.device}; load it with "
                f"Pipeline.from_engine(..., device={str(device)!r}) instead of moving it"
            )
        return self


@dataclass
class EncoderOutput:
    """What ipa_rt reads of transformers' CLIP outputs: ``out[0]``, ``out.image_embeds`` and
    ``out.hidden_states[-2]`` (the penultimate layer: the only hidden state an engine exports)."""

    first: Tensor
    penultimate: Tensor

    def __getitem__(self, index: int) -> Tensor:
        if index != 0:
            raise IndexError("an engine's encoder output exposes out[0] and hidden_states[-2] only")
        return self.first

    @property
    def image_embeds(self) -> Tensor:
        return self.first

    @property
    def hidden_states(self) -> tuple[Tensor, None]:
        return (self.penultimate, None)


class EngineTextEncoder(EngineModule):
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Any) -> EncoderOutput:
        if attention_mask is not None:
            raise ConfigError("this text encoder engine was exported without attention_mask (use_attention_mask)")
        return EncoderOutput(*self.engine({"input_ids": input_ids.to(self.device, torch.int64)}))


class EngineImageEncoder(EngineModule):
    def forward(self, pixel_values: Tensor, **_: Any) -> EncoderOutput:
        return EncoderOutput(*self.engine({"pixel_values": pixel_values}))


class EngineVAE(EngineModule):
    """``decode(z, return_dict=False)[0]`` and ``encode(x)``: ``.latent_dist`` (the posterior from exported moments),
    or ``.latents`` for a tiny autoencoder (TAESD)."""

    def __init__(self, decoder, encoder, config: Any, dtype: torch.dtype, device: torch.device, tiny: bool) -> None:
        super().__init__(decoder, config, dtype, device)
        self.encoder_engine, self.tiny = encoder, tiny

    def decode(self, z: Tensor, return_dict: bool = False) -> tuple[Tensor]:
        return (self.engine({"latents": z})[0],)

    def encode(self, x: Tensor, return_dict: bool = True) -> AutoencoderKLOutput | AutoencoderTinyOutput:
        (out,) = self.encoder_engine({"images": x})
        if self.tiny:
            return AutoencoderTinyOutput(latents=out)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(out))


@dataclass
class EngineEntry:
    """One adapter as the manifest records it: its variant (from the one table) and image tokens."""

    spec: VariantSpec
    tokens: int
    origin: str

    @property
    def tokens_per_image(self) -> int:
        return self.tokens


class EngineAdapters:
    """The adapter side of an engine pipeline: projection engines, the ``[adapters, layers]`` scale tensor
    (an engine input), and static image-token buffers the UNet engine reads (the pipeline's
    :class:`~ipa_rt.adapters.stack.IPAdapterStack` interface, minus what an engine does in-graph)."""

    supports_masks = False  # regional masks are not an engine input yet

    def __init__(
        self,
        entries: Sequence[EngineEntry],
        projections: Sequence[Any],
        layer_names: list[str],
        width: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.entries, self.projections, self.layer_names = list(entries), list(projections), layer_names
        self.width, self.device, self.dtype = width, device, dtype
        self.scale = torch.ones(len(entries), len(layer_names), device=device)
        self.scale_eff = torch.ones_like(self.scale)
        self.context = ImageContext(scale=self.scale, scale_eff=self.scale_eff)
        self.active = torch.zeros((), device=device)  # 1 while an image prompt is prepared, else 0 (text only)
        # (adapter, rows) -> the one token buffer the UNet engine reads for that row count, image call or not, so a
        # graph captured during a text-only call reads the tokens of a later image call (zeros until then)
        self._tokens: dict[tuple[int, int], Tensor] = {}
        self.head_dims: list[int] = []  # no per-layer kernel choice: attention runs inside the engine

    @property
    def num_adapters(self) -> int:
        return len(self.entries)

    def install(self, unet: Any) -> None:  # the engine's UNet already has decoupled attention
        pass

    def restore(self, unet: Any) -> None:
        pass

    def set_attention(self, fused: Sequence[bool]) -> None:
        pass

    def to(self, device: torch.device | str) -> EngineAdapters:
        if torch.device(device) != self.device:
            raise ConfigError(f"engine adapters run on {self.device}; load the engine on {device} instead")
        return self

    @torch.no_grad()
    def project(self, embeds: Sequence[Tensor], clip_states: Sequence[Tensor | None]) -> list[Tensor]:
        """Image tokens ``[B, n_img, T, C]`` per adapter through each adapter's projection engine."""
        out = []
        for engine, emb in zip(self.projections, embeds, strict=True):
            b, n = emb.shape[:2]
            (tokens,) = engine({"image_embeds": emb.reshape((b * n, *emb.shape[2:]))})
            out.append(tokens.reshape((b, n, *tokens.shape[1:])))
        return out

    def token_buffer(self, adapter: int, rows: int) -> Tensor:
        key = (adapter, rows)
        if key not in self._tokens:
            shape = (rows, self.entries[adapter].tokens, self.width)
            self._tokens[key] = torch.zeros(shape, device=self.device, dtype=self.dtype)
        return self._tokens[key]

    def drop_buffers(self) -> None:
        self._tokens.clear()
        self.context.drop_buffers()
        self.prepare(None)

    @torch.no_grad()
    def prepare(self, tokens, masks=None, image_scale=None, key=None, kv=None, queries=None) -> None:
        """Copy this request's image tokens into the static buffers the UNet engine reads (text only: the buffers
        keep what they hold and ``active`` zeroes the scale, which selects exact zeros in-graph). Image keys/values
        are computed in-graph: ``kv`` is ignored and None returned (the reference cache keeps the tokens); regional
        masks are not an engine input (``masks``, ``image_scale``, ``queries`` unused)."""
        self.context.clear(key)  # the context holds no keys/values: only which reference the buffers hold
        if tokens is None:
            self.active.zero_()
            return None
        flat = [t.reshape(t.shape[0], -1, t.shape[-1]) for t in tokens]
        for a, (t, entry) in enumerate(zip(flat, self.entries, strict=True)):
            if t.shape[1] != entry.tokens:
                raise ConfigError(
                    f"IP-Adapter {a}: {t.shape[1]} image tokens ({t.shape[1] // entry.tokens} images); the engine was "
                    f"built for {entry.tokens} (one image per adapter): combine several images with "
                    "ip_adapter_combine='average' (or 'norm_average', 'add', 'subtract')"
                )
            self.token_buffer(a, t.shape[0]).copy_(t)
        self.active.fill_(1.0)
        return None

    def feeds(self, rows: int) -> dict[str, Tensor]:
        """The UNet engine's image inputs for ``rows`` text rows: the same token buffers whatever the call, and the
        ``[rows, A, L]`` scale (times ``active``: zero scale is exactly text-only, ``where`` rather than ``0 * x``):
        the pipeline's ``[A, L]`` on every row, or a batched call's own row per request."""
        out = {f"ip_tokens_{a}": self.token_buffer(a, rows) for a in range(len(self.entries))}
        scale = self.context.scale_eff * self.active
        out["ip_scale"] = (scale.expand(rows, *scale.shape) if scale.ndim == 2 else scale).contiguous()
        return out


class EngineUNet(EngineModule):
    """``unet(sample, t, encoder_hidden_states=..., timestep_cond=..., added_cond_kwargs=...)`` with the image
    tokens and scales fed from :class:`EngineAdapters`."""

    def __init__(self, engine, config, dtype, device, adapters: EngineAdapters, blocks: dict) -> None:
        super().__init__(engine, config, dtype, device)
        self.adapters = adapters
        self.attention_blocks = blocks  # what set_ip_adapter_scale's per-block dicts expand against

    def prepare(self, rows: int) -> None:
        """Ready the engine for calls of ``rows`` rows (an OpenVINO engine compiles per shape at first use)."""
        self.engine.prepare(rows)

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float,
        encoder_hidden_states: Tensor,
        timestep_cond: Tensor | None = None,
        added_cond_kwargs: dict[str, Tensor] | None = None,
        return_dict: bool = False,
        **kwargs: Any,
    ) -> tuple[Tensor]:
        t = self._timesteps(timestep, sample.shape[0])
        feeds = {"sample": sample, "timestep": t, "encoder_hidden_states": encoder_hidden_states}
        if timestep_cond is not None:
            feeds["timestep_cond"] = timestep_cond
        feeds.update(added_cond_kwargs or {})
        feeds.update(self.adapters.feeds(encoder_hidden_states.shape[0]))  # video: one token row per frame
        down, mid = kwargs.get("down_block_additional_residuals"), kwargs.get("mid_block_additional_residual")
        if down is not None:
            feeds.update({f"down_residual_{i}": x for i, x in enumerate(down)}, mid_residual=mid)
        intrablock = kwargs.get("down_intrablock_additional_residuals")
        if intrablock is not None:
            feeds.update({f"intrablock_{j}": x for j, x in enumerate(intrablock)})
        return (self.engine(feeds)[0],)


class EngineControlNet(EngineModule):
    """``controlnet(sample, t, encoder_hidden_states=..., controlnet_cond=..., conditioning_scale=..., guess_mode=...,
    added_cond_kwargs=...)`` -> ``(down residuals, mid residual)``, with diffusers' per-residual scales (guess
    mode's ramp from 0.1 to 1) computed here and fed to the engine as an input."""

    def __init__(self, engine, config, dtype, device, residuals: int) -> None:
        super().__init__(engine, config, dtype, device)
        self.residuals = residuals

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float,
        encoder_hidden_states: Tensor,
        controlnet_cond: Tensor,
        conditioning_scale: Tensor | float = 1.0,
        guess_mode: bool = False,
        added_cond_kwargs: dict[str, Tensor] | None = None,
        return_dict: bool = False,
        **_: Any,
    ) -> tuple[list[Tensor], Tensor]:
        scale = torch.as_tensor(conditioning_scale, device=self.device, dtype=torch.float32)
        if guess_mode and not self.config.global_pool_conditions:
            scales = torch.logspace(-1, 0, self.residuals, device=self.device) * scale
        else:
            scales = scale.expand(self.residuals)
        feeds = {
            "sample": sample,
            "timestep": self._timesteps(timestep, sample.shape[0]),
            "encoder_hidden_states": encoder_hidden_states,
            "controlnet_cond": controlnet_cond,
            "conditioning_scales": scales.contiguous(),
            **{k: v for k, v in (added_cond_kwargs or {}).items() if k in ("text_embeds", "time_ids")},
        }
        out = self.engine(feeds)
        return out[:-1], out[-1]


class EngineT2IAdapter(EngineModule):
    """``adapter(image)`` -> the list of unweighted features (``config`` is the T2IAdapter's: its layout)."""

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.engine({"image": x}))
