"""ControlNets next to the IP-Adapters: structure from a control image, content and style from the image prompt.

Follows diffusers' ``StableDiffusion(XL)ControlNetPipeline`` step for step (residuals summed in order as
``MultiControlNetModel`` does, fed as ``down_block_additional_residuals`` / ``mid_block_additional_residual``; guess
mode pads the unconditional half with zeros). The conditioning scales and guidance ranges are device tensors read
inside the (graph-captured) step, so changing them never rebuilds or recaptures anything (docs/guides/controlnet.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from torch import Tensor

from ..errors import CheckpointError, ConfigError, ImageInputError, IncompatibleAdapterError
from ..runtime.graphs import StaticBuffers


def load_folders(sources: Any, cls: type, arg: str, dtype: torch.dtype, **hub_kwargs: Any) -> list:
    """diffusers ``cls`` models from folders or hub ids (one or a list; loaded instances pass through), in
    ``dtype`` and eval mode; ``arg`` names the argument in errors."""
    items = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, cls):
            model = item
        else:
            path = os.fspath(item)
            if os.path.exists(path) and not os.path.isfile(os.path.join(path, "config.json")):
                raise CheckpointError(f"{arg}[{i}] '{path}' has no config.json; expected a {cls.__name__} folder")
            try:
                model = cls.from_pretrained(path, torch_dtype=dtype, **hub_kwargs)
            except (OSError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"{arg}[{i}] '{path}' cannot be loaded as a {cls.__name__}: {exc}") from exc
        out.append((model if model.dtype == dtype else model.to(dtype=dtype)).eval())
    return out


def load_controlnets(sources: Any, unet, dtype: torch.dtype, **hub_kwargs: Any) -> list:
    """diffusers ``ControlNetModel`` folders or hub ids (one or a list), checked against the base UNet."""
    from diffusers import ControlNetModel

    nets = load_folders(sources, ControlNetModel, "controlnet", dtype, **hub_kwargs)
    for i, net in enumerate(nets):
        for key in ("cross_attention_dim", "block_out_channels", "addition_embed_type"):
            have, want = net.config.get(key), unet.config.get(key)
            if key == "block_out_channels":
                have, want = tuple(have), tuple(want)
            if have != want:
                raise IncompatibleAdapterError(
                    f"controlnet[{i}] has {key} {have}, but the base UNet has {want}; expected a ControlNet trained "
                    "for this base model (SD1.5 ControlNets on SD1.5, SDXL ones on SDXL)"
                )
    return nets


def per_model(value: Any, count: int, name: str, kind: str = "ControlNet") -> list[float]:
    """``value`` (a number, or one per model of ``kind``) as ``count`` floats; ``name`` names it in errors."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ConfigError(f"{name} has {len(values)} entries; expected {count} (one per {kind})")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{name} entry {v!r} is not a number")
    return [float(v) for v in values]


class ControlStack:
    """Loaded ControlNets with their live scales, per-request control images and per-step keep gate."""

    def __init__(self, nets: Sequence[torch.nn.Module], vae_scale_factor: int) -> None:
        self.nets = list(nets)
        self.scale = torch.ones(len(self.nets))  # live conditioning scales (device tensor once moved)
        self.images: list[Tensor] = []  # this request's static buffers, one per ControlNet
        self._buffers = StaticBuffers(contiguous=True)  # per control image shapes
        self.guess_mode = False
        self.processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_convert_rgb=True, do_normalize=False)

    def to(self, device: torch.device) -> ControlStack:
        for net in self.nets:
            net.to(device)
        self.scale = self.scale.to(device)
        self.images = []  # the next request fills buffers on the new device
        self._buffers.clear()
        return self

    def set_scale(self, value: Any) -> None:
        """``controlnet_conditioning_scale`` (a number or one per ControlNet): an in-place device write."""
        self.scale.copy_(torch.tensor(per_model(value, len(self.nets), "controlnet_conditioning_scale")))

    @property
    def global_pool(self) -> bool:
        return bool(self.nets[0].config.global_pool_conditions)

    def prepare_images(
        self, image: Any, height: int | None, width: int | None, copies: int, per_prompt: int, cfg: bool, device,
        guess_mode: bool = False,
    ) -> tuple[int, int]:  # fmt: skip
        """diffusers' ``prepare_image`` for each ControlNet (into reused buffers), and this request's guess mode
        (global-pool ControlNets always guess); returns the height and width the control images settle on (what the
        latents follow)."""
        self.guess_mode = bool(guess_mode) or self.global_pool
        count = len(self.nets)
        if image is None:
            raise ImageInputError(f"{count} ControlNet(s) are loaded: pass their control image(s) as image=")
        images = image if count > 1 else [image]
        if count > 1 and (not isinstance(image, list) or len(image) != count):
            raise ImageInputError(f"image must be a list of {count} control images (one per ControlNet)")
        dtype = self.nets[0].dtype
        prepared = []
        for i, img in enumerate(images):
            try:
                x = self.processor.preprocess(img, height=height, width=width).to(dtype=torch.float32)
            except (ValueError, TypeError) as exc:
                raise ImageInputError(
                    f"control image {i}: preprocessing failed ({exc}); expected an RGB image"
                ) from exc
            x = x.repeat_interleave(copies if x.shape[0] == 1 else per_prompt, dim=0).to(device=device, dtype=dtype)
            if cfg and not self.guess_mode:
                x = torch.cat([x] * 2)
            prepared.append(x)
        if any(p.shape[-2:] != prepared[0].shape[-2:] for p in prepared):
            raise ImageInputError("control images must share one size")
        self.images = self._buffers.write(prepared)
        return int(prepared[0].shape[-2]), int(prepared[0].shape[-1])

    def keep_gate(self, start: Any, end: Any, steps: int, device) -> Tensor:
        """``[controlnets, steps]``: diffusers' ``controlnet_keep`` (1 where step i is inside [start, end])."""
        starts = per_model(start, len(self.nets), "control_guidance_start")
        ends = per_model(end, len(self.nets), "control_guidance_end")
        for s, e in zip(starts, ends, strict=True):
            if not 0.0 <= s < e <= 1.0:
                raise ConfigError(f"control guidance start {s} / end {e}; expected 0 <= start < end <= 1")
        rows = [
            [1.0 - float(i / steps < s or (i + 1) / steps > e) for i in range(steps)]
            for s, e in zip(starts, ends, strict=True)
        ]
        return torch.tensor(rows, dtype=torch.float32, device=device)

    def residuals(
        self, model_in: Tensor, t: Tensor, text: Tensor, added: dict, keep: Tensor, step: Tensor, cfg: bool
    ) -> dict[str, Any]:
        """The UNet's extra kwargs for this step: every ControlNet's residuals, scaled, summed in order."""
        if model_in.ndim == 5:  # AnimateDiff [B, C, F, h, w]: every frame is an image to the ControlNets
            model_in = model_in.transpose(1, 2).flatten(0, 1)
        guess = self.guess_mode and cfg
        if guess:  # the conditional half only; zeros for the unconditional half
            half = model_in.shape[0] // 2
            model_in, text = model_in[half:], text.chunk(2)[1]
            added = {k: v.chunk(2)[1] for k, v in added.items()}
        scales = self.scale * keep.index_select(1, step)[:, 0]
        down, mid = None, None
        for c, (net, image) in enumerate(zip(self.nets, self.images, strict=True)):
            d, m = net(
                model_in,
                t,
                encoder_hidden_states=text,
                controlnet_cond=image,
                conditioning_scale=scales[c],
                guess_mode=self.guess_mode,
                added_cond_kwargs=added or None,
                return_dict=False,
            )
            if down is None:
                down, mid = list(d), m
            else:
                down = [a + b for a, b in zip(down, d, strict=True)]
                mid = mid + m
        if guess:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
