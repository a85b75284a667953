"""The fused Triton kernel on Flux's image branch: all adapters' segments of a double block in one pass.

It is the UNet kernel (``torch.ops.ipa_rt.decoupled_attention``) with an empty text segment, whose loop contributes
exactly zero. Whether it runs is decided once per pipeline (:func:`choose`), never per call; a kernel failure falls
back to SDPA with one warning (docs/guides/flux.md, "The fused kernel").
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ...kernels.ops import MODES, choose  # noqa: F401  (re-exported: the Flux mixin decides with them)

_WARNED: set[str] = set()


@dataclass
class FusedKV:
    """Per double block, every adapter's ``K``/``V`` ``[B, H, T_total, d]`` end to end, and the segment table."""

    kv: list[tuple[Tensor, Tensor]]
    offsets: Tensor  # [A + 1] int32: segment boundaries
    adapters: Tensor  # [A] int32: each segment's adapter (its scale column)


def fuse(kv: list[list[tuple[Tensor, Tensor]]]) -> FusedKV:
    """Lay each block's adapter keys/values end to end (once per call, with the rest of the image side)."""
    lengths = [k.shape[2] for k, _ in kv[0]]
    device = kv[0][0][0].device
    cat = [
        (torch.cat([k for k, _ in row], 2).contiguous(), torch.cat([v for _, v in row], 2).contiguous()) for row in kv
    ]
    offsets = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    return FusedKV(cat, offsets, torch.arange(len(lengths), dtype=torch.int32, device=device))


def fused_branch(q: Tensor, fused: FusedKV, layer: int, scale: Tensor) -> Tensor | None:
    """Σ_a scale[a, layer] · softmax(q K_aᵀ/√d) V_a as ``[B, N, H·d]`` through the kernel (``q``: ``[B, H, N, d]``), or
    None if the kernel fails here (the caller then runs SDPA)."""
    k, v = fused.kv[layer]
    try:
        return torch.ops.ipa_rt.decoupled_attention(
            q, k[:, :, :0], v[:, :, :0], k, v, fused.offsets, fused.adapters, scale[:, layer], None
        )
    except Exception as exc:  # a compile or launch failure on this GPU: SDPA from now on, said once
        reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"[:300]
        if reason not in _WARNED:
            _WARNED.add(reason)
            warnings.warn(f"fused attention kernel failed on Flux's image branch ({reason}); SDPA runs", stacklevel=2)
        return None
