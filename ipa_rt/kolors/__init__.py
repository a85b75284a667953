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

from .pipelines import PIPELINES, UNetAdapterMixin, load_pretrained, runtime_class

__all__ = ["PIPELINES", "UNetAdapterMixin", "load_pretrained", "runtime_class", *PIPELINES]


def __getattr__(name: str) -> type:
    """The pipeline classes are made on first use (importing diffusers' Kolors pipelines takes a while)."""
    if name in PIPELINES:
        cls = globals()[name] = runtime_class(name)
        return cls
    raise AttributeError(f"module 'ipa_rt.kolors' has no attribute {name!r}")
