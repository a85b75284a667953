"""IP-Adapter for Kolors (Kwai-Kolors/Kolors-IP-Adapter-Plus): diffusers' pipelines with ipa_rt's adapter runtime.

    from ipa_rt.kolors import KolorsPipeline      # instead of: from diffusers import KolorsPipeline
    pipe = KolorsPipeline.from_pretrained("Kwai-Kolors/Kolors-diffusers", variant="fp16", dtype=torch.float16)
    pipe.load_ip_adapter(
        "Kwai-Kolors/Kolors-IP-Adapter-Plus", subfolder="", weight_name="ip_adapter_plus_general.safetensors"
    )
    pipe.set_ip_adapter_scale(0.5)                # one in-place write into a device tensor

Every class in :data:`PIPELINES` is available here under diffusers' name.
"""

from __future__ import annotations

from .pipelines import UNetAdapterMixin
from .spec import FAMILY

PIPELINES, runtime_class = FAMILY.pipelines, FAMILY.runtime_class
__all__ = ["FAMILY", "PIPELINES", "UNetAdapterMixin", "runtime_class"]
__all__ += list(PIPELINES)  # diffusers' names, made on first use
__getattr__ = FAMILY.module_getattr
