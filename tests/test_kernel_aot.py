"""The fused kernel compiled ahead of time for the GPUs ipa_rt targets (sm_80: A100, sm_90: H100/H200), with no GPU:
Triton's own compiler and the ptxas in the triton wheel, for every launch configuration the tuner may pick, at the
head dims SD1.5 (40/80/160) and SDXL (64) use, in fp16, bf16 and fp32. Each must compile, fit the architecture's
shared memory and store no more than ``SPILL_BUDGET`` bytes of spills per thread (a spill is local-memory traffic
in the inner loop: the candidates were pruned to those with none).

The compiles run in one subprocess with Triton's interpreter off (the test session turns it on for CPU runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from ipa_rt.kernels.tuning import candidates

pytestmark = pytest.mark.slow  # every test compiles kernels for each GPU architecture

SPILL_BUDGET = 0  # bytes per thread
MASKED_SPILL_BUDGET = 64  # bytes per thread, for masked calls with several segments (regional IP-Adapter)
ARCHS = (80, 90)
HEAD_DIMS = (40, 64, 80, 160)
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def compile_all(*extra: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    argv = [sys.executable, "-m", "ipa_rt.kernels.aot", "--json", "--arch", *map(str, ARCHS)]
    argv += ["--head-dim", *map(str, HEAD_DIMS), "--dtype", *DTYPES, *extra]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    return compile_all()


def test_every_candidate_compiles_fits_and_does_not_spill(compiled):
    expected = {
        (arch, name, d, tuple(vars(c).values()))
        for arch in ARCHS
        for name, full in DTYPES.items()
        for d in HEAD_DIMS
        for c in candidates(full, d)
    }
    assert {(r["arch"], r["dtype"], r["head_dim"], tuple(r["config"])) for r in compiled} == expected
    failures = [r for r in compiled if "error" in r]
    assert not failures, failures[:3]
    for r in compiled:
        where = f"sm_{r['arch']} {r['dtype']} d={r['head_dim']} {r['config']}"
        assert r["shared_bytes"] <= r["smem_limit"], f"{where}: {r['shared_bytes']} B of shared memory"
        assert r["spill_store_bytes"] <= SPILL_BUDGET, f"{where}: {r['spill_store_bytes']} B of spill stores"
        assert 0 < r["registers"] <= 255, where


def test_masked_multi_segment_variant_compiles():
    """Regional masks with several segments change the kernel's constants; such calls are not tuned (their key is
    not among the build's), so they run each head dim's default configuration: it compiles and fits too, with at
    most ``MASKED_SPILL_BUDGET`` bytes of spills (observed: none in fp16/bf16, up to 28 in fp32)."""
    rows = compile_all("--segments", "4", "16", "16", "--mask", "--space", "defaults")
    assert len(rows) == len(ARCHS) * len(DTYPES) * len(HEAD_DIMS) and not [r for r in rows if "error" in r]
    for r in rows:
        assert r["shared_bytes"] <= r["smem_limit"] and r["spill_store_bytes"] <= MASKED_SPILL_BUDGET, r


def test_flux_image_branch_compiles():
    """Flux's image branch runs the kernel with head dim 128, an empty text segment (a runtime length: the same
    binary) and one segment per adapter (XLabs: 4 or 16 tokens): each default configuration compiles for sm_80/sm_90
    in every dtype and fits shared memory; with two segments it spills at most ``MASKED_SPILL_BUDGET`` bytes, as the
    UNet's multi-segment calls (observed: none in bf16/fp16, 32 in fp32, which Flux does not run in on a GPU)."""
    rows = compile_all("--head-dim", "128", "--segments", "4", "16", "--space", "defaults")
    assert len(rows) == len(ARCHS) * len(DTYPES) and not [r for r in rows if "error" in r], rows[:2]
    for r in rows:
        where = f"sm_{r['arch']} {r['dtype']} d=128 {r['config']}"
        assert r["shared_bytes"] <= r["smem_limit"] and r["spill_store_bytes"] <= MASKED_SPILL_BUDGET, where
        if r["dtype"] != "fp32":
            assert r["spill_store_bytes"] <= SPILL_BUDGET, where
        assert 0 < r["registers"] <= 255, where
