"""Launch configurations of the fused kernel, shared by the kernel (:mod:`.decoupled_kernel`) and its tuner
(:mod:`.tuning`): the configuration type, the head-dim split, the pruned candidates and defaults, and the table of
configurations chosen by tuning, which the kernel reads. Imports point one way: the tuner imports the kernel (to
time it) and both import this module; the kernel never imports its tuner.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration: query rows and keys per block, warps, software-pipelining stages."""

    block_m: int
    block_n: int
    warps: int
    stages: int

    def __str__(self) -> str:
        return f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} warps={self.warps} stages={self.stages}"


def split_head_dim(d: int) -> tuple[int, int]:
    """Head dim as two power-of-two tiles ``(D0, D1)`` (``D1 = 0``: one tile), each at least 16 (``tl.dot``'s
    minimum): 40 -> 32+16, 64 -> 64, 80 -> 64+16, 160 -> 128+32. Padding 40/80/160 to one power of two would
    waste 37.5% of the tensor-core work; split, 80 and 160 waste none and 40 wastes 17%."""
    d0 = max(16, 1 << (d.bit_length() - 1))
    rest = d - d0
    return d0, (max(16, 1 << (rest - 1).bit_length()) if rest > 0 else 0)


C = KernelConfig

_TUNED: dict[tuple, KernelConfig] = {}


def candidates(dtype: str, head_dim: int) -> list[KernelConfig]:
    """The configurations tuning may pick for a dtype name (``"float16"``, ``"bfloat16"``, ``"float32"``) and a
    head dim, default first. Pruned from the 24-configuration space by compiling it ahead of time for sm_80 and sm_90
    (``python -m ipa_rt.kernels.aot``): only configurations that spill no registers and fit shared memory on both
    for the split head dims of SD1.5 (40 = 32+16, 80 = 64+16, 160 = 128+32) and SDXL (64) remain."""
    d0, d1 = split_head_dim(head_dim)
    width = d0 + d1
    if dtype == "float32":  # exact fp32 FMA, no tensor cores (parity checks): small tiles stay in registers
        return [C(32, 32, 4, 2), C(32, 16, 4, 2)] if width <= 128 else [C(16, 16, 4, 2)]
    if width <= 64:
        return [C(128, 64, 8, 2), C(128, 32, 4, 2), C(64, 64, 4, 3), C(128, 32, 8, 3)]
    if width <= 128:
        return [C(128, 32, 8, 2), C(64, 64, 4, 2), C(128, 64, 8, 2), C(64, 32, 4, 3)]
    return [C(64, 32, 4, 2), C(128, 32, 8, 2), C(64, 32, 8, 3), C(128, 16, 8, 2)]


def default_config(key: tuple) -> KernelConfig:
    return candidates(key[0], key[1])[0]


def config_for(key: tuple) -> KernelConfig:
    """The tuned configuration for a shape key (:func:`~ipa_rt.kernels.decoupled_kernel.shape_key`), else the
    head dim's default."""
    found = _TUNED.get(key)
    return found if found is not None else default_config(key)


def remember(chosen: dict[tuple, KernelConfig]) -> None:
    """Record tuning's choices, which :func:`config_for` (and so every launch) returns from then on."""
    _TUNED.update(chosen)
