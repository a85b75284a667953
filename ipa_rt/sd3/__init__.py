"""IP-Adapter for Stable Diffusion 3.5 (InstantX checkpoints): diffusers' SD3 pipelines with ipa_rt's adapter runtime.

    from ipa_rt.sd3 import StableDiffusion3Pipeline   # instead of: from diffusers import StableDiffusion3Pipeline
    encoder = SiglipVisionModel.from_pretrained("google/siglip-so400m-patch14-384", torch_dtype=torch.bfloat16)
    processor = SiglipImageProcessor.from_pretrained("google/siglip-so400m-patch14-384")
    pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-large",
                                                    image_encoder=encoder, feature_extractor=processor,
                                                    torch_dtype=torch.bfloat16)
    pipe.load_ip_adapter("InstantX/SD3.5-Large-IP-Adapter", weight_name="ip-adapter.bin")
    pipe.set_ip_adapter_scale(0.6)                    # one in-place write into a device tensor

Every class in :data:`~ipa_rt.sd3.pipelines.PIPELINES` is available here under diffusers' name.
"""

from __future__ import annotations

from ..models import lazy_pipeline_classes
from .adapter import SD3BlockAdapter, SD3ImageSide, SD3JointProcessor, SD3StepTokens, sd3_scale
from .pipelines import PIPELINES, SD3AdapterMixin, build_image_side, runtime_class

__all__ = [
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
__all__ += list(PIPELINES)  # diffusers' names (strings only in the literal: the docs' static reader)
__getattr__ = lazy_pipeline_classes(__name__, PIPELINES, runtime_class)
