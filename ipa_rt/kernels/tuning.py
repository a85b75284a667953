"""Tuning of the fused kernel's launch configurations, once at pipeline build (:func:`tune`); a request only looks its
configuration up (:func:`config_for`), never tunes. The candidates and defaults are in :mod:`.configs`; results are
kept per GPU and Triton version in ``kernel-tuning.json`` in the cache root (docs/design.md, "The fused Triton
kernel").
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from pathlib import Path

import torch

from ..cache import atomic_write_bytes, cache_root
from . import configs
from .configs import KernelConfig, candidates, config_for, default_config
from .decoupled_kernel import launch

# The candidates, defaults and the table of tuned choices live in .configs, shared with the kernel (which only
# reads the table); they are re-exported here, where tuning's users have always found them.
__all__ = ["KernelConfig", "cache_file", "candidates", "config_for", "default_config", "tune"]

C = KernelConfig

_LOCK = threading.Lock()


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
        configs.remember(chosen)
        if new:
            disk[machine] = known
            atomic_write_bytes(cache_file(), json.dumps(disk, indent=1).encode())
    return chosen
