"""IP-Adapter for Flux.1 and Chroma (XLabs-AI checkpoints): diffusers' pipelines with ipa_rt's adapter runtime.

Every class in :data:`PIPELINES` is available here under diffusers' name (docs/guides/flux.md: how to switch).
"""

from __future__ import annotations

from .adapter import FluxDecoupledProcessor, FluxImageSide, FluxImageTokens, expand_flux_scale
from .pipelines import FluxAdapterMixin
from .spec import FAMILY

PIPELINES, runtime_class = FAMILY.pipelines, FAMILY.runtime_class
__all__ = [
    "FAMILY",
    "PIPELINES",
    "FluxAdapterMixin",
    "FluxDecoupledProcessor",
    "FluxImageSide",
    "FluxImageTokens",
    "expand_flux_scale",
    "runtime_class",
]
__all__ += list(PIPELINES)  # diffusers' names, made on first use
__getattr__ = FAMILY.module_getattr
