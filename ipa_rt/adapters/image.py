"""Image-prompt inputs → per-adapter encoder outputs, with diffusers' preprocessing and unconditional rules.

As ``prepare_ip_adapter_image_embeds`` does: images are preprocessed by the base model's ``feature_extractor`` (or a
``CLIPImageProcessor`` sized from the encoder), and each variant reads its encoder output with its unconditional rule
(docs/reference/variants.md: pooled embeds and zeros, or penultimate hidden states and the encoder on zero pixels).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..errors import ImageInputError
from .variants import EMBEDS, HIDDEN


def load_image(image: Any, argument: str) -> Image.Image | np.ndarray | Tensor:
    """Open a path as an RGB PIL image; pass PIL images, arrays and tensors through after a shape check."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageInputError(f"{argument}: image file '{path}' does not exist; expected a PNG/JPEG/WebP file")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ImageInputError(
                f"{argument}: '{path}' cannot be decoded as an image ({exc}); expected a PNG, JPEG or WebP file"
            ) from exc
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (np.ndarray, Tensor)):
        if image.ndim not in (3, 4):
            raise ImageInputError(
                f"{argument}: array of shape {list(image.shape)}; expected HWC / CHW (or a batch of them)"
            )
        return image
    raise ImageInputError(f"{argument}: got {type(image).__name__}; expected a PIL image, array, tensor or file path")


def default_feature_extractor(image_encoder) -> Any:
    """diffusers' fallback when the base model ships none: CLIP defaults at the encoder's resolution."""
    from transformers import CLIPImageProcessor

    size = image_encoder.config.image_size
    return CLIPImageProcessor(size=size, crop_size=size)


class EncoderRunner:
    """Runs the CLIP image encoder for one output kind; on CUDA from a static input buffer, replaying a CUDA
    graph per input shape (the encoder's shapes are fixed by its resolution, so that is one graph per image
    count). On the CPU it simply calls the encoder."""

    def __init__(self, image_encoder) -> None:
        from ..runtime.graphs import Graphed

        self.encoder = image_encoder
        weights = lambda: [image_encoder]  # noqa: E731
        hidden = lambda px: image_encoder(px, output_hidden_states=True).hidden_states[-2]  # noqa: E731
        self.hidden = Graphed(hidden, weights, "CLIP image encoder (hidden states)")
        self.embeds = Graphed(lambda px: image_encoder(px).image_embeds, weights, "CLIP image encoder (embeds)")

    @property
    def graphed(self) -> list:
        return [self.hidden, self.embeds]

    def __call__(self, output: str, pixels: Tensor) -> Tensor:
        if output == HIDDEN:
            return self.hidden(pixels)
        if output == EMBEDS:
            return self.embeds(pixels)
        raise ValueError(f"encoder output kind {output!r}; expected {EMBEDS!r} or {HIDDEN!r}")


@torch.no_grad()
def encode_images(
    output: str, images: Sequence[Any], runner: EncoderRunner, feature_extractor, device
) -> tuple[Tensor, Tensor]:
    """``(cond, uncond)`` encoder outputs ``[1, n_img, ...]`` for one adapter's images (diffusers' rules).

    ``output`` is ``EMBEDS`` (pooled projection; unconditional = zeros) or ``HIDDEN`` (penultimate hidden
    states; unconditional = the encoder on zero pixels).
    """
    dtype = next(runner.encoder.parameters()).dtype
    if all(isinstance(im, Tensor) for im in images) and len(images) == 1 and images[0].ndim == 4:
        pixels = images[0]  # already preprocessed pixel values, as diffusers accepts
    else:
        try:
            pixels = feature_extractor(list(images), return_tensors="pt").pixel_values
        except (ValueError, TypeError) as exc:
            raise ImageInputError(f"ip_adapter_image: preprocessing failed ({exc}); expected RGB images") from exc
    pixels = pixels.to(device=device, dtype=dtype)
    cond = runner(output, pixels)
    uncond = runner(output, torch.zeros_like(pixels)) if output == HIDDEN else torch.zeros_like(cond)
    return cond[None], uncond[None]
