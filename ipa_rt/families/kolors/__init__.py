"""IP-Adapter for Kolors (Kwai-Kolors/Kolors-IP-Adapter-Plus): diffusers' pipelines with ipa_rt's adapter runtime.

Every class in :data:`PIPELINES` is available here under diffusers' name (docs/guides/kolors.md: how to switch).
"""

from __future__ import annotations

from .pipelines import UNetAdapterMixin
from .spec import FAMILY

PIPELINES, runtime_class = FAMILY.pipelines, FAMILY.runtime_class
__all__ = ["FAMILY", "PIPELINES", "UNetAdapterMixin", "runtime_class"]
__all__ += list(PIPELINES)  # diffusers' names, made on first use
__getattr__ = FAMILY.module_getattr
