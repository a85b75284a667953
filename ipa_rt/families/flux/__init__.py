"""IP-Adapter for Flux.1 and Chroma (XLabs-AI checkpoints): diffusers' pipelines with ipa_rt's adapter runtime.

    from ipa_rt.flux import FluxPipeline          # instead of: from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16)
    pipe.load_ip_adapter("XLabs-AI/flux-ip-adapter", weight_name="ip_adapter.safetensors",
                         image_encoder_pretrained_model_name_or_path="openai/clip-vit-large-patch14")
    pipe.set_ip_adapter_scale(0.6)                # one in-place write into a device tensor

Every class in :data:`PIPELINES` is available here under diffusers' name.
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
