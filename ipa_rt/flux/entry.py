"""``ipa_rt.Pipeline.from_pretrained`` / ``from_engine`` for Flux-family folders: PyTorch or engines."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import ConfigError
from .build import flux_engines, load_flux_engine
from .pipelines import load_pretrained


def from_pretrained(
    base: str | os.PathLike,
    ip_adapter: Any = None,
    image_encoder: Any = None,
    *,
    backend: str = "torch",
    engine_options: dict[str, Any] | None = None,
    subfolder: Any = None,
    weight_name: Any = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> Any:
    """A Flux-family pipeline with ``ip_adapter`` loaded: on PyTorch (:func:`.pipelines.load_pretrained`), or with
    its transformer as an engine of ``backend`` built into the cache (or reused) from ``engine_options``."""
    if backend == "torch":
        if engine_options:
            raise ConfigError("engine_options apply to backend='onnxruntime', 'openvino' or 'tensorrt'; it is 'torch'")
        return load_pretrained(
            base, ip_adapter, image_encoder, subfolder=subfolder, weight_name=weight_name, device=device, dtype=dtype,
            **kwargs,
        )  # fmt: skip
    given = sorted(k for k, v in kwargs.items() if v is not None)
    if dtype != torch.float32 or given:
        raise ConfigError(
            f"from_pretrained(backend={backend!r}) of a Flux-family model takes ip_adapter, image_encoder, subfolder, "
            f"weight_name, device and engine_options (the engine's precision: engine_options['precision']); got "
            f"{given or 'dtype=' + str(dtype)}"
        )
    folder = flux_engines(base, ip_adapter, image_encoder, backend, engine_options, None, subfolder, weight_name)
    return load_flux_engine(folder, device)
