"""IP-Adapter for Stable Diffusion 3.5 (InstantX checkpoints): diffusers' SD3 pipelines with ipa_rt's adapter runtime.

Every class in :data:`PIPELINES` is available here under diffusers' name (docs/guides/sd3.md: how to switch).
"""

from __future__ import annotations

from .adapter import SD3BlockAdapter, SD3ImageSide, SD3JointProcessor, SD3StepTokens, sd3_scale
from .pipelines import SD3AdapterMixin, build_image_side
from .spec import FAMILY

PIPELINES, runtime_class = FAMILY.pipelines, FAMILY.runtime_class
__all__ = [
    "FAMILY",
    "PIPELINES",
    "SD3AdapterMixin",
    "SD3BlockAdapter",
    "SD3ImageSide",
    "SD3JointProcessor",
    "SD3StepTokens",
    "build_image_side",
    "runtime_class",
    "sd3_scale",
]
__all__ += list(PIPELINES)  # diffusers' names, made on first use
__getattr__ = FAMILY.module_getattr
