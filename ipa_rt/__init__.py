"""ipa_rt: an inference runtime for IP-Adapter on Stable Diffusion UNets that matches diffusers' output."""

from ._version import __version__
from .console import hushed

# diffusers' pipelines import transformers' CLIP image processors, which warn that torchvision is missing and fall
# back to PIL: the PIL path is the one ipa_rt uses, so that note is for no one here
with hushed("transformers"):
    from .checkpoint import AdapterSource
    from .conditions import load_ip_adapter_embeds, save_ip_adapter_embeds
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
    from .scale import PRESETS, scale_preset
    from .video import AnimateDiffPipeline, VideoPipelineOutput

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
