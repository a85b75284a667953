"""Triton kernels of ipa_rt, registered as ``torch.library`` custom ops (fake impls for compile/export)."""

from .ops import decoupled_attention, fused_available

__all__ = ["decoupled_attention", "fused_available"]
