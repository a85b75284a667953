"""IP-Adapter for Kolors (Kwai-Kolors/Kolors-IP-Adapter-Plus): diffusers' pipelines with ipa_rt's adapter runtime.

    from ipa_rt.kolors import KolorsPipeline      # instead of: from diffusers import KolorsPipeline
    pipe = KolorsPipeline.from_pretrained("Kwai-Kolors/Kolors-diffusers", variant="fp16", dtype=torch.float16)
    pipe.load_ip_adapter(
        "Kwai-Kolors/Kolors-IP-Adapter-Plus", subfolder="", weight_name="ip_adapter_plus_general.safetensors"
    )
    pipe.set_ip_adapter_scale(0.5)                # one in-place write into a device tensor

Every class in :data:`~ipa_rt.kolors.pipelines.PIPELINES` is available here under diffusers' name.
"""

from __future__ import annotations

from ..models import lazy_pipeline_classes
from .pipelines import PIPELINES, UNetAdapterMixin, load_pretrained, runtime_class

__all__ = ["PIPELINES", "UNetAdapterMixin", "load_pretrained", "runtime_class"]
__all__ += list(PIPELINES)  # diffusers' names (strings only in the literal: the docs' static reader)
__getattr__ = lazy_pipeline_classes(__name__, PIPELINES, runtime_class)
