"""Triton kernels of ipa_rt, registered as ``torch.library`` custom ops (fake impls for compile/export).

The op is registered when :mod:`.ops` is first imported (the names below, or the fused-layer choice), not when
:mod:`.reference` is: the processors read the math's reference without loading Triton."""

from __future__ import annotations

from typing import Any

__all__ = ["decoupled_attention", "fused_available"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import ops

        return getattr(ops, name)
    raise AttributeError(f"module 'ipa_rt.kernels' has no attribute {name!r}")
