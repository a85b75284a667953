"""Ahead-of-time compilation of the fused kernel for NVIDIA GPUs, with no GPU: Triton's own compiler and the
``ptxas`` that ships in the triton wheel, for a chosen architecture (sm_80, sm_90).

The arguments are specialised exactly as Triton's JIT specialises a real call (pointers 16-byte aligned, integers
divisible by 16 marked so, integers equal to 1 made constants), from a representative processor call at the given
shape, so the compiled code is the code a user's GPU would run. ``ptxas -v`` reports registers and spill bytes; the
compiled metadata gives the shared memory (docs/design.md, "The fused Triton kernel"; docs/verification.md).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import decoupled_kernel as k

SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # per block, opt-in maximum (bytes)
_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32"}


@dataclass
class AotResult:
    arch: int
    dtype: str
    head_dim: int
    config: k.KernelConfig
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int
    seconds: float


def representative_args(
    dtype: torch.dtype,
    head_dim: int,
    heads: int = 8,
    queries: int = 1024,
    text: int = 77,
    segments: tuple[int, ...] = (4,),
    mask: bool = False,
    layers: int = 16,
) -> tuple[tuple, dict]:
    """The kernel's arguments for a processor call at this shape, on the meta device (strides, no memory): queries
    and text keys as the ``[B, N, H, d]`` views a processor makes, image K/V in their contiguous static buffers,
    the scale a column of the ``[adapters, layers]`` table."""
    b, h, n, d = 2, heads, queries, head_dim
    meta = dict(device="meta", dtype=dtype)
    q = torch.empty(b, n, h, d, **meta).transpose(1, 2)
    k_text = torch.empty(b, text, h, d, **meta).transpose(1, 2)
    k_img = torch.empty(b, h, sum(segments), d, **meta)
    offsets = torch.empty(len(segments) + 1, device="meta", dtype=torch.int32)
    adapters = torch.empty(len(segments), device="meta", dtype=torch.int32)
    scales = torch.empty(len(segments), layers, device="meta")[:, 0]
    masks = torch.empty(len(segments), b, n, **meta) if mask else None
    out = torch.empty(b, n, h * d, **meta)
    return k.kernel_args(q, k_text, k_text, k_img, k_img, offsets, adapters, scales, masks, out)


def _triton_signature(args: tuple, meta: dict) -> tuple[dict, dict, dict]:
    """Signature, constants and divisibility attributes, as the JIT derives them from real arguments."""
    fn = k.decoupled_fwd
    signature, constants, attrs = {}, dict(meta), {}
    for i, (name, value) in enumerate(zip(fn.arg_names, args, strict=False)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            constants[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in constants:
        signature[name] = "constexpr"
    return signature, constants, attrs


def compile_config(arch: int, dtype: torch.dtype, head_dim: int, config: k.KernelConfig, **shape) -> AotResult:
    """Compile the kernel for ``sm_<arch>`` with ``config``; raises what Triton or ptxas raise."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    args, meta = representative_args(dtype, head_dim, **shape)
    meta.update(BLOCK_M=config.block_m, BLOCK_N=config.block_n, IEEE=dtype == torch.float32)
    signature, constants, attrs = _triton_signature(args, meta)
    src = ASTSource(k.decoupled_fwd, signature, constexprs=constants, attrs=attrs)
    start = time.perf_counter()
    options = {"num_warps": config.warps, "num_stages": config.stages}
    with contextlib.redirect_stdout(io.StringIO()):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    regs, spill_store, spill_load = ptxas_report(compiled.asm["ptx"], arch)
    return AotResult(
        arch=arch,
        dtype=_TYPES[dtype],
        head_dim=head_dim,
        config=config,
        registers=regs,
        spill_store_bytes=spill_store,
        spill_load_bytes=spill_load,
        shared_bytes=int(compiled.metadata.shared),
        seconds=time.perf_counter() - start,
    )


def ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    """``(registers, spill store bytes, spill load bytes)`` per thread, from ``ptxas -v`` run on the PTX as Triton
    runs it (its own ptxas, its register-allocation option); Triton's compile cache would skip its own run."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory(prefix="ipa_rt-aot-") as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}"]
        proc = subprocess.run([*cmd, str(src), "-o", str(src.with_suffix(".o"))], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if proc.returncode != 0 or not regs or not spills:
        raise RuntimeError(f"ptxas failed for sm_{arch} (exit {proc.returncode}): {text[-400:]}")
    return int(regs[-1]), int(spills[-1][0]), int(spills[-1][1])


def _space() -> list[k.KernelConfig]:
    return [k.KernelConfig(bm, bn, w, st) for bm in (64, 128) for bn in (16, 32, 64) for w in (4, 8) for st in (2, 3)]


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def sweep(archs, dtypes, head_dims, space: str = "candidates", **shape):
    """Compile every configuration of ``space`` (``candidates``: what the tuner may pick; ``defaults``: the first of
    them, what untuned keys such as masked calls run; ``all``: the 24-configuration space); yields a result dict per
    compile (``error`` set when it failed)."""
    from .configs import candidates

    for arch, name, d in itertools.product(archs, dtypes, head_dims):
        configs = _space() if space == "all" else candidates(str(DTYPES[name]).removeprefix("torch."), d)
        configs = configs[:1] if space == "defaults" else configs
        for cfg in configs:
            row = {"arch": arch, "dtype": name, "head_dim": d, "config": [*vars(cfg).values()]}
            try:
                r = compile_config(arch, DTYPES[name], d, cfg, **shape)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            else:
                row.update(
                    registers=r.registers,
                    spill_store_bytes=r.spill_store_bytes,
                    spill_load_bytes=r.spill_load_bytes,
                    shared_bytes=r.shared_bytes,
                    smem_limit=SMEM_LIMIT[arch],
                    seconds=round(r.seconds, 2),
                )
            yield row


def main(argv: list[str] | None = None) -> None:
    """``python -m ipa_rt.kernels.aot``: a markdown table (or JSON lines) of the compiles. Triton's interpreter must
    be off (``TRITON_INTERPRET`` unset): the compiler needs the JIT form of the kernel."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="compile the fused kernel ahead of time and report resources")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--dtype", nargs="+", default=["fp16", "bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--head-dim", type=int, nargs="+", default=[40, 64, 80, 160])
    parser.add_argument("--space", choices=["all", "candidates", "defaults"], default="candidates")
    parser.add_argument("--segments", type=int, nargs="+", default=[4], help="image tokens per segment")
    parser.add_argument("--mask", action="store_true", help="regional masks")
    parser.add_argument("--json", action="store_true", help="one JSON object per compile")
    args = parser.parse_args(argv)
    if k.interpreting():
        parser.error("TRITON_INTERPRET=1 is set: ahead-of-time compilation needs the real compiler")
    shape = {"segments": tuple(args.segments), "mask": args.mask}
    if not args.json:
        print("| arch | dtype | d | config (BLOCK_M, BLOCK_N, warps, stages) | regs | spill st/ld B | smem KiB | s |")
        print("|---|---|---|---|---|---|---|---|")
    for row in sweep(args.arch, args.dtype, args.head_dim, args.space, **shape):
        if args.json:
            print(json.dumps(row), flush=True)
        elif "error" in row:
            print(f"| sm_{row['arch']} | {row['dtype']} | {row['head_dim']} | {row['config']} | {row['error']} |||")
        else:
            print(
                f"| sm_{row['arch']} | {row['dtype']} | {row['head_dim']} | {row['config']} | {row['registers']} | "
                f"{row['spill_store_bytes']}/{row['spill_load_bytes']} | {row['shared_bytes'] / 1024:.0f} | "
                f"{row['seconds']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
