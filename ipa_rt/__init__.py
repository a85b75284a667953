"""ipa_rt: an inference runtime for IP-Adapter on Stable Diffusion UNets that matches diffusers' output."""

from ._version import __version__
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
