"""The CPU ipa_rt runs on: the instruction-set features that decide which engine precisions it can run and which is
fastest, its machine class (AMX, AVX512_BF16, AVX2), and the fast recipe measured for that class (:data:`RECIPES`).
Without VNNI, int8 products are summed in pairs into saturating 16-bit lanes, so an int8 engine built for such a CPU
keeps its weights to half the int8 range (:func:`int8_saturates`). docs/guides/cpu.md: the classes, their measured
recipes, the overflow fix.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

# the flags that decide the matmul kernels; /proc/cpuinfo's spelling
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni")
CLASSES = ("AMX", "AVX512_BF16", "AVX-512", "AVX2")
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# oneDNN's documented cap on the instruction sets its kernels use (``ONEDNN_MAX_CPU_ISA``; OpenVINO's and PyTorch's
# oneDNN kernels honour it): the flags above the cap count as absent, so ipa_rt's choices follow the kernels that
# run, and one machine can run another class's kernel paths (AVX2 on an AVX-512 CPU: int8 without VNNI)
_AVX2 = frozenset({"avx2"})
_AVX512 = _AVX2 | {"avx512f"}
_VNNI = _AVX512 | {"avx512_vnni"}
_BF16 = _VNNI | {"avx512_bf16"}
ISA_CAPS = {
    "SSE41": frozenset(),
    "AVX": frozenset(),
    "AVX2": _AVX2,
    "AVX2_VNNI": _AVX2 | {"avx_vnni"},
    "AVX2_VNNI_2": _AVX2 | {"avx_vnni"},
    "AVX512_CORE": _AVX512,
    "AVX512_CORE_VNNI": _VNNI,
    "AVX512_CORE_BF16": _BF16,
    "AVX10_1_512": _BF16,
    "AVX512_CORE_FP16": _BF16,
}
CAP_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # oneDNN reads the first that is set


@dataclass(frozen=True)
class CpuFeatures:
    """A CPU's model name and the :data:`FLAGS` its kernels may use (``cap``: the oneDNN cap that removed some)."""

    model: str
    flags: frozenset[str]
    cap: str | None = None

    @property
    def machine_class(self) -> str:
        """One of :data:`CLASSES`: what the benchmark's targets and the fast recipe are chosen per."""
        if "amx_bf16" in self.flags:
            return "AMX"
        if "avx512_bf16" in self.flags:
            return "AVX512_BF16"
        return "AVX-512" if "avx512f" in self.flags else "AVX2"

    @property
    def int8_dot(self) -> bool:
        """int8 dot products accumulated in 32 bits (VNNI or AMX): no intermediate saturation."""
        return bool(self.flags & {"avx512_vnni", "avx_vnni", "amx_int8"})

    @property
    def described(self) -> str:
        """The model name, and the cap when one applies (benchmark results say which kernels ran)."""
        return f"{self.model} (oneDNN capped at {self.cap})" if self.cap else self.model


def parse_cpuinfo(text: str, cap: str | None = None) -> CpuFeatures:
    """:class:`CpuFeatures` from ``/proc/cpuinfo``'s text, less what ``cap`` (an :data:`ISA_CAPS` name, any case)
    leaves out; a cap oneDNN does not know, or one at or above AMX, removes nothing (oneDNN ignores those too)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())  # the first processor's entry
    flags = frozenset(f for f in FLAGS if f in fields.get("flags", "").split())
    allowed = ISA_CAPS.get((cap or "").upper())
    if allowed is not None and flags - allowed:
        flags, cap = flags & allowed, cap.upper()
    else:
        cap = None
    return CpuFeatures(fields.get("model name") or platform.processor() or platform.machine(), flags, cap)


@functools.cache
def cpu_features() -> CpuFeatures:
    """This machine's CPU, from ``/proc/cpuinfo`` (Linux) under oneDNN's cap (:data:`CAP_ENV`); elsewhere the model
    name only and no flags, which makes every choice below the conservative one (the overflow fix on, no bf16
    recipe)."""
    path = Path("/proc/cpuinfo")
    cap = next((os.environ[k] for k in CAP_ENV if os.environ.get(k)), None)
    return parse_cpuinfo(path.read_text() if path.exists() else "", cap)


def int8_saturates() -> bool:
    """Whether int8 engines built here must keep weights to half the int8 range (no VNNI/AMX: see the module)."""
    return not cpu_features().int8_dot


@dataclass(frozen=True)
class Recipe:
    """The fastest OpenVINO precision measured for a machine class, and where it was measured."""

    precision: str
    measured: str


RECIPES = {
    "AMX": Recipe("bf16", "bf16 + TAESD 3.71 s, int8 + TAESD 3.82 s (2026-11-24-cpu)"),
    "AVX512_BF16": Recipe("int8", "int8 + TAESD 7.50 s, bf16 + TAESD 11.1 s (2026-12-03-cpu)"),
    "AVX-512": Recipe("int8", "no bf16 arithmetic: as AVX2"),
    "AVX2": Recipe("int8", "int8 + TAESD 25.2 s, fp32 42.3 s (issue #34, AMD Zen 3)"),
}


def fast_recipe() -> Recipe:
    """The recipe ``precision="auto"`` resolves to on this machine."""
    return RECIPES[cpu_features().machine_class]
