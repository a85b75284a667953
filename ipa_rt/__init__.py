"""ipa_rt: an inference runtime for IP-Adapter on Stable Diffusion UNets that matches diffusers' output.

The public names load on first use (PEP 562), so ``import ipa_rt.comfyui`` or the CLI's parser cost no
diffusers import."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

if TYPE_CHECKING:  # the same names, for type checkers and the API reference (mkdocstrings reads statically)
    from .adapters.checkpoint import AdapterSource
    from .adapters.conditions import load_ip_adapter_embeds, save_ip_adapter_embeds
    from .adapters.scale import PRESETS, scale_preset
    from .errors import (
        CheckpointError,
        ConfigError,
        EngineError,
        ImageInputError,
        IncompatibleAdapterError,
        IpaRtError,
        ScaleError,
    )
    from .pipeline import Pipeline, PipelineOutput, from_diffusers
    from .video.pipeline import AnimateDiffPipeline, VideoPipelineOutput

# public name -> module that defines it
_EXPORTS = {
    "PRESETS": "adapters.scale",
    "scale_preset": "adapters.scale",
    "AdapterSource": "adapters.checkpoint",
    "load_ip_adapter_embeds": "adapters.conditions",
    "save_ip_adapter_embeds": "adapters.conditions",
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "EngineError": "errors",
    "ImageInputError": "errors",
    "IncompatibleAdapterError": "errors",
    "IpaRtError": "errors",
    "ScaleError": "errors",
    "Pipeline": "pipeline",
    "PipelineOutput": "pipeline",
    "from_diffusers": "pipeline",
    "AnimateDiffPipeline": "video.pipeline",
    "VideoPipelineOutput": "video.pipeline",
}

__all__ = [
    "PRESETS",
    "AdapterSource",
    "AnimateDiffPipeline",
    "CheckpointError",
    "ConfigError",
    "EngineError",
    "ImageInputError",
    "IncompatibleAdapterError",
    "IpaRtError",
    "Pipeline",
    "PipelineOutput",
    "ScaleError",
    "VideoPipelineOutput",
    "__version__",
    "from_diffusers",
    "load_ip_adapter_embeds",
    "save_ip_adapter_embeds",
    "scale_preset",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ipa_rt' has no attribute {name!r}")
    from .console import hushed

    # diffusers' pipelines import transformers' CLIP image processors, which warn that torchvision is missing and
    # fall back to PIL: the PIL path is the one ipa_rt uses, so that note is for no one here
    with hushed("transformers"):
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
