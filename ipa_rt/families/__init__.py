"""The model families ipa_rt serves inside diffusers' own pipeline classes (Flux.1/Chroma, Kolors, SD3.5): which
family runs a folder's declared pipeline class, or an engine folder's kind (``ipa_rt.Pipeline.from_pretrained``,
``from_engine`` and ``ipa_rt build`` route such folders here; SD1.5/SDXL run on ipa_rt's own pipeline). A family is a
spec (:class:`~ipa_rt.families.base.Family`), a pipeline mixin, an image side and an export contract."""

from __future__ import annotations

from typing import Any


def families() -> tuple[Any, ...]:
    """Every family's spec."""
    from .flux import FAMILY as FLUX
    from .kolors import FAMILY as KOLORS
    from .sd3 import FAMILY as SD3

    return FLUX, KOLORS, SD3


def family_of(class_name: str | None) -> Any:
    """The family serving a declared pipeline class, else None."""
    return next((f for f in families() if class_name in f.pipelines), None)


def family_of_engine(kind: str | None) -> Any:
    """The family whose engines are of ``kind`` (a manifest's), else None (SD1.5/SDXL engines)."""
    return next((f for f in families() if f.kind == kind), None)
