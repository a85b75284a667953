"""T2I-Adapters next to the IP-Adapters: structure features from a condition image, added inside the UNet's down
blocks (``down_intrablock_additional_residuals``).

Follows diffusers' ``StableDiffusion(XL)AdapterPipeline`` (``_preprocess_adapter_image``, ``MultiAdapter``; features
repeated for the images per prompt and the guidance batch). The features stay unweighted in static buffers and the
weights are a ``[adapters]`` device tensor times a ``[steps]`` gate applied inside the (graph-captured) step, so a new
scale or factor reruns, rebuilds and recaptures nothing (docs/guides/controlnet.md, T2I-Adapter).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from ..errors import ConfigError, ImageInputError, IncompatibleAdapterError
from ..runtime.graphs import StaticBuffers
from .controlnet import load_folders, per_model

# adapter_type -> its features as (channels, pixel stride), from config channels and downscale_factor: the one
# table of T2I-Adapter variants (diffusers' FullAdapter, FullAdapterXL and LightAdapter)
LAYOUTS: dict[str, Callable[[list[int], int], list[tuple[int, int]]]] = {
    "full_adapter": lambda ch, df: [(c, df * 2**k) for k, c in enumerate(ch)],
    "light_adapter": lambda ch, df: [(c, df * 2**k) for k, c in enumerate([*ch, ch[-1]])],
    "full_adapter_xl": lambda ch, df: [(c, df * (2 if k >= 2 else 1)) for k, c in enumerate(ch)],
}


def feature_layout(config: Any) -> list[tuple[int, int]]:
    """``(channels, stride)`` of each feature a T2I-Adapter with this config produces."""
    kind = config["adapter_type"]
    if kind not in LAYOUTS:
        raise IncompatibleAdapterError(f"T2I-Adapter type {kind!r} is unknown; expected one of {sorted(LAYOUTS)}")
    return LAYOUTS[kind](list(config["channels"]), int(config["downscale_factor"]))


def unet_slots(config: Any, vae_scale_factor: int) -> list[tuple[int, int]]:
    """``(channels, stride)`` where the UNet adds intrablock residual ``j``: each down block's output (cross-attention
    blocks before their downsampler, plain blocks after it), then the mid block's input."""
    kinds, chans = list(config["down_block_types"]), list(config["block_out_channels"])
    slots = []
    for i, (kind, c) in enumerate(zip(kinds, chans, strict=True)):
        stride = vae_scale_factor * 2**i
        if "CrossAttn" not in kind and i < len(kinds) - 1:
            stride *= 2
        slots.append((c, stride))
    slots.append((chans[-1], vae_scale_factor * 2 ** (len(kinds) - 1)))
    return slots


def check_layout(index: int, config: Any, unet_config: Any, vae_scale_factor: int) -> int:
    """The adapter's features must land on the UNet's residual slots in order; returns the feature count."""
    have = feature_layout(config)
    slots = unet_slots(unet_config, vae_scale_factor)
    if len(have) not in (len(slots) - 1, len(slots)) or have != slots[: len(have)]:
        raise IncompatibleAdapterError(
            f"t2i_adapter[{index}] gives features (channels, stride) {have}, but the base UNet takes {slots[:-1]} "
            f"(and {slots[-1]} at its mid block); expected a T2I-Adapter trained for this base model "
            "(SD1.5 adapters on SD1.5, SDXL ones on SDXL)"
        )
    return len(have)


def load_t2i_adapters(sources: Any, unet, vae_scale_factor: int, dtype: torch.dtype, **hub_kwargs: Any) -> list:
    """diffusers ``T2IAdapter`` folders or hub ids (one or a list), checked against the base UNet."""
    from diffusers import T2IAdapter

    adapters = load_folders(sources, T2IAdapter, "t2i_adapter", dtype, **hub_kwargs)
    counts = [check_layout(i, a.config, unet.config, vae_scale_factor) for i, a in enumerate(adapters)]
    if len(set(counts)) > 1:  # their features are summed slot by slot, as diffusers' MultiAdapter does
        raise IncompatibleAdapterError(f"the T2I-Adapters give {counts} features; expected the same count for all")
    return adapters


def preprocess_adapter_image(image: Any, height: int, width: int, index: int) -> Tensor:
    """diffusers' ``_preprocess_adapter_image``: PIL images resized (Lanczos) to ``width x height`` and scaled to
    [0, 1] as ``[B, C, H, W]`` (grayscale gives one channel); tensors are taken as they are."""
    if isinstance(image, Tensor):
        return image
    images = [image] if isinstance(image, PIL.Image.Image) else image
    if isinstance(images, list) and images and all(isinstance(i, PIL.Image.Image) for i in images):
        arrays = [np.array(i.resize((width, height), resample=PIL.Image.Resampling.LANCZOS)) for i in images]
        arrays = [a[None, ..., None] if a.ndim == 2 else a[None] for a in arrays]
        if any(a.shape != arrays[0].shape for a in arrays):
            raise ImageInputError(f"adapter image {index}: the images have different channel counts")
        x = np.concatenate(arrays, axis=0).astype(np.float32) / 255.0
        return torch.from_numpy(x.transpose(0, 3, 1, 2))
    if isinstance(images, list) and images and all(isinstance(i, Tensor) and i.ndim in (3, 4) for i in images):
        return torch.stack(images) if images[0].ndim == 3 else torch.cat(images)
    raise ImageInputError(
        f"adapter image {index} is a {type(image).__name__}; expected a PIL image, a list of them, or a tensor"
    )


class T2IStack:
    """Loaded T2I-Adapters with their live scales and this request's unweighted features (static buffers)."""

    def __init__(self, adapters: Sequence[torch.nn.Module]) -> None:
        self.adapters = list(adapters)
        self.scale = torch.ones(len(self.adapters))  # live adapter_conditioning_scale (device tensor once moved)
        self.features: list[list[Tensor]] = []  # [adapter][slot]: [rows, C, h, w], this request's
        self._buffers = StaticBuffers(contiguous=True)  # per feature shapes (flat)

    def to(self, device: torch.device) -> T2IStack:
        for adapter in self.adapters:
            adapter.to(device)
        self.scale = self.scale.to(device)
        self.features = []  # the next request fills buffers on the new device
        self._buffers.clear()
        return self

    def set_scale(self, value: Any) -> None:
        """``adapter_conditioning_scale`` (a number or one per adapter): an in-place device write."""
        scales = per_model(value, len(self.adapters), "adapter_conditioning_scale", "T2I-Adapter")
        self.scale.copy_(torch.tensor(scales))

    def default_size(self, image: Any, height: int | None, width: int | None) -> tuple[int | None, int | None]:
        """diffusers' ``_default_height_width``: the first image's size rounded down to the unshuffle factor."""
        while isinstance(image, list) and image:
            image = image[0]
        factor = int(self.adapters[0].config["downscale_factor"])
        size = image.size[::-1] if isinstance(image, PIL.Image.Image) else None
        if isinstance(image, Tensor):
            size = tuple(image.shape[-2:])
        if size is None:
            return height, width
        height = height if height is not None else size[0] // factor * factor
        width = width if width is not None else size[1] // factor * factor
        return height, width

    @torch.no_grad()
    def prepare(self, image: Any, height: int, width: int, copies: int, per_prompt: int, cfg: bool, device) -> None:
        """Run every adapter once on its image and keep the features expanded to the model batch."""
        count = len(self.adapters)
        if image is None:
            raise ImageInputError(f"{count} T2I-Adapter(s) are loaded: pass their condition image(s)")
        if count > 1 and (not isinstance(image, list) or len(image) != count):
            raise ImageInputError(f"the T2I-Adapter image must be a list of {count} images (one per adapter)")
        images = image if count > 1 else [image]
        features = []
        for a, (adapter, img) in enumerate(zip(self.adapters, images, strict=True)):
            x = preprocess_adapter_image(img, height, width, a).to(device=device, dtype=adapter.dtype)
            want, total = adapter.config["in_channels"], max(s for _, s in feature_layout(adapter.config))
            if x.ndim != 4 or x.shape[1] != want:
                raise ImageInputError(
                    f"adapter image {a} has shape {list(x.shape)}; T2I-Adapter {a} expects [B, {want}, H, W] "
                    f"({'grayscale' if want == 1 else 'RGB'})"
                )
            if x.shape[-2] % total or x.shape[-1] % total:
                raise ImageInputError(
                    f"adapter image {a} is {x.shape[-2]}x{x.shape[-1]}; T2I-Adapter {a} needs a height and width "
                    f"divisible by {total}"
                )
            rows = []
            for f in adapter(x):
                f = f.repeat(copies if f.shape[0] == 1 else per_prompt, 1, 1, 1)  # diffusers repeats per prompt
                if f.shape[0] != copies:
                    raise ImageInputError(
                        f"adapter image {a} has {f.shape[0] // per_prompt} images; expected 1 or one per prompt"
                    )
                rows.append(torch.cat([f, f]) if cfg else f)
            features.append(rows)
        flat, n = self._buffers.write([f for fs in features for f in fs]), len(features[0])
        self.features = [flat[a * n : (a + 1) * n] for a in range(count)]  # every adapter has the UNet's slots

    def keep_gate(self, factor: Any, steps: int, device) -> Tensor:
        """``[steps]``: 1 for the first ``int(steps * adapter_conditioning_factor)`` steps, as diffusers gates them."""
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 <= factor <= 1.0:
            raise ConfigError(f"adapter_conditioning_factor is {factor!r}; expected a number in [0, 1]")
        keep = torch.zeros(steps, dtype=torch.float32)
        keep[: int(steps * factor)] = 1.0
        return keep.to(device)

    def residuals(self, keep: Tensor, step: Tensor) -> list[Tensor]:
        """This step's ``down_intrablock_additional_residuals``: weighted features summed over adapters in order."""
        weights = self.scale * keep.index_select(0, step)
        out = []
        for slot in range(len(self.features[0])):
            acc = None
            for a, fs in enumerate(self.features):
                term = fs[slot] * weights[a].to(fs[slot].dtype)
                acc = term if acc is None else acc + term
            out.append(acc)
        return out
