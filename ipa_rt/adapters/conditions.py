"""Image-prompt conditions per adapter: encoding (cached by content), negative images, combine modes, embeds I/O.

Follows diffusers' ``prepare_ip_adapter_image_embeds``: per adapter ``[B, n_img, ...]`` encoder outputs, negative
first when guidance is on. Off by default: a negative image (ComfyUI's ``image_negative``) instead of zeros / zero
pixels; combine modes for several images of one adapter (ComfyUI's ``combine_embeds``, :func:`combine`), where the
unconditional side keeps its first entry, so its rule is unchanged; the reference cache of encoder outputs keyed by
content hash, which also holds ``request.prepare_image_side``'s tokens and keys/values (docs/guides/modes.md: the
combine modes, what is cached between calls).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import CheckpointError, ConfigError, ImageInputError
from ..runtime.lru import REFERENCE_CACHE_ENTRIES, LRUCache, reference_cache_bytes
from .image import EncoderRunner, encode_images, load_image
from .variants import FACE_ID, HIDDEN

COMBINE_MODES = ("concat", "average", "norm_average", "add", "subtract")


def content_hash(image: Any) -> str:
    """sha256 of an image's pixels (PIL, array or tensor), independent of file names and objects."""
    h = hashlib.sha256()
    if isinstance(image, Image.Image):
        h.update(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
    elif isinstance(image, np.ndarray):
        h.update(f"{image.dtype}{image.shape}".encode())
        h.update(np.ascontiguousarray(image).tobytes())
    else:
        t = image.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def combine(x: Tensor, mode: str) -> Tensor:
    """Collapse the image axis (dim 1) of ``[B, n_img, ...]`` encoder outputs by ``mode``."""
    if mode == "concat" or x.shape[1] == 1:
        return x
    if mode == "average":
        return x.mean(dim=1, keepdim=True)
    if mode == "norm_average":
        return (x / torch.norm(x, dim=1, keepdim=True)).mean(dim=1, keepdim=True)
    if mode == "add":
        return x.sum(dim=1, keepdim=True)
    return x[:, :1] - x[:, 1:].mean(dim=1, keepdim=True)  # subtract


class ImageConditioner:
    """Turns the call's image arguments into per-adapter encoder outputs for a pipeline. ``cache`` is the pipeline's
    reference cache (a new one, bounded by ``$IPA_RT_REFERENCE_CACHE_MB``, unless given)."""

    def __init__(self, pipe, cache: LRUCache | None = None) -> None:
        self.pipe = pipe
        if cache is None:
            cache = LRUCache("reference", reference_cache_bytes(), REFERENCE_CACHE_ENTRIES)
        self.cache = cache
        self.runner = EncoderRunner(pipe.image_encoder) if pipe.image_encoder is not None else None

    def _images(self, images: Any, count: int, name: str) -> list[list | None] | None:
        if images is None:
            return None
        images = images if isinstance(images, list) else [images]
        if len(images) != count:
            raise ImageInputError(
                f"{name} has {len(images)} entries; expected {count} (one per IP-Adapter; several images for "
                "one adapter go in a nested list)"
            )
        return [
            [load_image(im, f"{name}[{i}]") for im in (x if isinstance(x, list) else [x])] if x is not None else None
            for i, x in enumerate(images)
        ]

    def encode(self, output: str, images: list, negative: list | None, index: int) -> tuple[Tensor, Tensor, tuple]:
        """``(cond, uncond, cache key)`` for one adapter's images, from the cache when seen before."""
        pipe = self.pipe
        if pipe.image_encoder is None:
            raise ConfigError(
                "an image prompt was given but no image encoder is loaded: pass image_encoder=<CLIP vision folder> "
                "to from_pretrained (no image_encoder/ was found beside the adapter file)"
            )
        key = ("encoder", output, tuple(map(content_hash, images)), tuple(map(content_hash, negative or [])))
        self.bind_cache()
        cached = self.cache.get(key)
        if cached is not None:
            return (*cached, key)
        cond, uncond = encode_images(output, images, self.runner, pipe.feature_extractor, pipe.device)
        if negative is not None:  # a negative image prompt replaces the unconditional rule
            neg, _ = encode_images(output, negative, self.runner, pipe.feature_extractor, pipe.device)
            if neg.shape[1] not in (1, cond.shape[1]):
                raise ImageInputError(
                    f"negative_ip_adapter_image[{index}] has {neg.shape[1]} images; expected 1 or {cond.shape[1]}"
                )
            uncond = neg.expand_as(cond).contiguous() if neg.shape[1] == 1 else neg
        self.cache.put(key, (cond, uncond))
        return cond, uncond, key

    def bind_cache(self) -> None:
        """Cached references belong to the adapters and the image encoder that made them (another set drops them)."""
        self.cache.bind(self.pipe.adapters, self.pipe.image_encoder)

    def __call__(
        self, images: Any, embeds: Any, negative: Any, combine_mode: str, copies: int, cfg: bool
    ) -> tuple[list[Tensor], list[Tensor | None], tuple] | None:
        """Per adapter ``[B, n_img, ...]`` embeds (and FaceID-Plus CLIP states), CFG-batched, plus a cache key
        that is equal for two calls exactly when their image side is the same."""
        if images is None and embeds is None:
            if negative is not None:
                raise ImageInputError("negative_ip_adapter_image was given without ip_adapter_image")
            return None
        adapters = self.pipe.adapters
        if adapters is None:
            raise ConfigError("ip_adapter_image / ip_adapter_image_embeds were given but no IP-Adapter is loaded")
        if combine_mode not in COMBINE_MODES:
            raise ConfigError(f"ip_adapter_combine is {combine_mode!r}; expected one of {COMBINE_MODES}")
        entries = adapters.entries
        count = len(entries)
        images = self._images(images, count, "ip_adapter_image")
        negative = self._images(negative, count, "negative_ip_adapter_image")
        if embeds is not None and (not isinstance(embeds, (list, tuple)) or len(embeds) != count):
            got = f" of {len(embeds)}" if isinstance(embeds, (list, tuple)) else ""
            raise ImageInputError(
                f"ip_adapter_image_embeds must be a list of {count} tensors (one per IP-Adapter); "
                f"got {type(embeds).__name__}{got}"
            )
        device = self.pipe.device

        def batch(p: Tensor | None, n: Tensor | None) -> Tensor | None:
            if p is None:
                return None
            p = torch.cat([p] * copies)
            return (torch.cat([torch.cat([n] * copies), p]) if cfg else p).to(device)

        embeds_out, clips, keys = [], [], []
        for a, entry in enumerate(entries):
            spec = entry.spec
            if embeds is not None:
                e = embeds[a]
                if not isinstance(e, Tensor) or e.ndim not in (3, 4) or (cfg and e.shape[0] % 2):
                    shape = list(e.shape) if isinstance(e, Tensor) else type(e).__name__
                    raise ImageInputError(
                        f"ip_adapter_image_embeds[{a}] is {shape}; expected a 3-D or 4-D tensor [batch, images, ...]"
                        + (" with negative embeddings first (even batch), as guidance is on" if cfg else "")
                    )
                n, p = e.chunk(2) if cfg else (None, e)
                key: tuple = ("embeds", content_hash(e))
            else:
                if spec.encoder_output == FACE_ID:
                    raise ImageInputError(
                        f"IP-Adapter {a} ({spec.description}) needs face embeddings: pass "
                        "ip_adapter_image_embeds (e.g. InsightFace normed_embedding, [2, 1, 1, 512] with CFG)"
                    )
                if images[a] is None:
                    raise ImageInputError(f"ip_adapter_image[{a}] is None; expected an image for this adapter")
                p, n, key = self.encode(spec.encoder_output, images[a], negative[a] if negative else None, a)
                p, n = combine(p, combine_mode), (n if combine_mode == "concat" else n[:, :1])
            cp = cn = None
            if spec.needs_clip_states:
                if images is None or images[a] is None:
                    raise ImageInputError(
                        f"IP-Adapter {a} ({spec.description}) also needs the face image for CLIP: "
                        f"pass it in ip_adapter_image[{a}]"
                    )
                cp, cn, clip_key = self.encode(HIDDEN, images[a], negative[a] if negative else None, a)
                key = (key, clip_key)
            embeds_out.append(batch(p, n))
            clips.append(batch(cp, cn))
            keys.append(key)
        return embeds_out, clips, (tuple(keys), combine_mode, copies, cfg)


def save_ip_adapter_embeds(path: str | os.PathLike, embeds: list[Tensor]) -> Path:
    """Write per-adapter image embeddings (diffusers' ``ip_adapter_image_embeds`` list) to ``.safetensors``,
    atomically."""
    from safetensors.torch import save

    from ..cache import atomic_write_bytes

    if not isinstance(embeds, (list, tuple)) or not all(isinstance(e, Tensor) for e in embeds):
        raise ConfigError("embeds must be a list of tensors (one per IP-Adapter)")
    data = save({f"adapter_{i}": e.detach().cpu().contiguous() for i, e in enumerate(embeds)}, {"format": "ipa_rt"})
    atomic_write_bytes(path, data)
    return Path(path)


def load_ip_adapter_embeds(path: str | os.PathLike, device: str | torch.device = "cpu") -> list[Tensor]:
    """Read embeddings written by :func:`save_ip_adapter_embeds`, ready for ``ip_adapter_image_embeds``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"embeddings file '{path}' does not exist; expected a .safetensors written by ipa_rt")
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"embeddings file '{path}' is not a readable safetensors file: {exc}") from exc
    names = sorted(tensors, key=lambda k: int(k.split("_")[-1]) if k.startswith("adapter_") else -1)
    if not names or not all(k.startswith("adapter_") for k in names):
        raise CheckpointError(f"embeddings file '{path}' has keys {names[:4]}; expected adapter_0, adapter_1, ...")
    return [tensors[k] for k in names]


class ReferenceCacheMixin:
    """For ipa_rt's mixins on diffusers' pipelines (Flux/Chroma, SD3.5): a content-keyed cache of image-encoder
    outputs in front of diffusers' ``encode_image``, so a reference image this encoder already encoded is not encoded
    again; bound to the encoder and feature extractor, bounded by ``IPA_RT_REFERENCE_CACHE_MB``."""

    _ipa_cache: LRUCache | None = None

    @property
    def reference_cache(self) -> LRUCache:
        if self._ipa_cache is None:
            self._ipa_cache = LRUCache("reference", reference_cache_bytes(), REFERENCE_CACHE_ENTRIES)
        return self._ipa_cache

    def cached_encode(self, image: Any, where: tuple, encode: Any) -> Tensor:
        """``encode(images)`` for ``image`` (one, or a list: paths are opened), or what it gave before for the same
        pixels; ``where`` (device, dtype) is part of the key."""
        cache = self.reference_cache
        cache.bind(self.image_encoder, self.feature_extractor)
        many = isinstance(image, (list, tuple))
        items = [load_image(im, "ip_adapter_image") for im in (image if many else [image])]
        key = ("embeds", *where, tuple(content_hash(im) for im in items))
        embeds = cache.get(key)
        if embeds is None:
            embeds = encode(items if many else items[0])
            cache.put(key, embeds)
        return embeds

    def cache_stats(self) -> dict[str, Any]:
        return {"reference": self.reference_cache.stats()}

    def clear_caches(self) -> None:
        self.reference_cache.clear()
