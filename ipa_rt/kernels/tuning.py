"""Launch configurations of the fused kernel: the pruned candidates, the defaults, and tuning at pipeline build.

Candidates per (dtype class, head dim split) are the configurations that compile on sm_80 and sm_90 with no
register spills and within shared memory (checked in CI by ``tests/test_kernel_aot.py``, which compiles every
one of them ahead of time with Triton's own compiler). A pipeline tunes once, when it is built, for the attention
shapes of its model at its default size (:func:`tune`); a request only looks its configuration up
(:func:`config_for`), never tunes. Results are kept per GPU and Triton version in ``kernel-tuning.json`` in the
cache root (``$IPA_RT_CACHE``, default ``~/.cache/ipa_rt/engines``), so a second process tunes nothing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from pathlib import Path

import torch

from ..cache import cache_root
from ..checkpoint import atomic_write_bytes
from .decoupled_kernel import KernelConfig, split_head_dim

C = KernelConfig

_TUNED: dict[tuple, KernelConfig] = {}
_LOCK = threading.Lock()


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


def cache_file() -> Path:
    return cache_root() / "kernel-tuning.json"


def _machine() -> str:
    import triton

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return f"{props.name}|sm_{props.major}{props.minor}|triton {triton.__version__}"


def _load() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def tune(problems: Iterable[tuple], reps: int = 20) -> dict[tuple, KernelConfig]:
    """Pick the fastest candidate for each problem ``(key, make_inputs, accept)`` (CUDA only) among those whose
    output ``accept`` takes (matches the reference), and remember the choices on disk; problems already tuned on
    this GPU and Triton version (with a configuration still among the candidates) are not run again."""
    from triton.testing import do_bench

    from .decoupled_kernel import launch

    machine = _machine()
    with _LOCK:
        disk = _load()
        known = disk.get(machine, {})
        chosen, new = {}, False
        for key, make, accept in problems:
            name = json.dumps(list(key))
            allowed = candidates(key[0], key[1])
            if name in known and C(*known[name]) in allowed:
                chosen[key] = C(*known[name])
                continue
            args = make()
            best, best_ms = None, float("inf")
            for cfg in allowed:
                try:
                    if not accept(launch(*args, config=cfg)):
                        continue
                    ms = do_bench(lambda cfg=cfg, args=args: launch(*args, config=cfg), warmup=5, rep=reps)
                except Exception:  # a configuration that does not compile or launch here is skipped
                    continue
                if ms < best_ms:
                    best, best_ms = cfg, ms
            if best is not None:
                chosen[key] = best
                known[name], new = [best.block_m, best.block_n, best.warps, best.stages], True
        _TUNED.update(chosen)
        if new:
            disk[machine] = known
            atomic_write_bytes(cache_file(), json.dumps(disk, indent=1).encode())
    return chosen
