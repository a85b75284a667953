"""IP-Adapter for Stable Diffusion 3.5 (InstantX checkpoints): diffusers' SD3 pipelines with ipa_rt's adapter runtime.

    from ipa_rt.sd3 import StableDiffusion3Pipeline   # instead of: from diffusers import StableDiffusion3Pipeline
    encoder = SiglipVisionModel.from_pretrained("google/siglip-so400m-patch14-384", torch_dtype=torch.bfloat16)
    processor = SiglipImageProcessor.from_pretrained("google/siglip-so400m-patch14-384")
    pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-large",
                                                    image_encoder=encoder, feature_extractor=processor,
                                                    torch_dtype=torch.bfloat16)
    pipe.load_ip_adapter("InstantX/SD3.5-Large-IP-Adapter", weight_name="ip-adapter.bin")
    pipe.set_ip_adapter_scale(0.6)                    # one in-place write into a device tensor

Every class in :data:`PIPELINES` is available here under diffusers' name.
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
