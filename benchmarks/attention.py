"""Fused decoupled-attention kernel vs diffusers' processor math vs one SDPA over all keys.

Every distinct cross-attention shape of SD1.5 at 512² and SDXL at 1024², batch 2 (CFG), fp16, with 1 and 2
adapters. Three providers:

- ``fused``: ``torch.ops.ipa_rt.decoupled_attention`` (one Triton kernel, Q read once, O written once);
- ``diffusers``: ``IPAdapterAttnProcessor2_0``'s attention math — SDPA on the text, SDPA per adapter, scale,
  add, with its transposes and casts (image K/V given, as ipa_rt precomputes them);
- ``sdpa_concat``: one SDPA over ``[text | images]`` — *different semantics* (one softmax), shown only as a
  speed bound for a single fused attention call.

Reported per shape: median µs (warm-up excluded, replayed from a CUDA graph by
``triton.testing.do_bench_cudagraph``, as the kernels run inside the graphed loop), achieved
GB/s against the HBM floor (Q, K, V and O each moved once), its share of peak HBM bandwidth, and
``speedup_vs_diffusers``. Writes ``benchmarks/results/attention-<gpu>.json`` and ``.md``.

    python benchmarks/attention.py                 # on a CUDA machine
    TRITON_INTERPRET=1 python benchmarks/attention.py --smoke --out /tmp/bench   # CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from common import environment, write_results

TEXT_TOKENS = 77
ADAPTER_SETS = {1: [4], 2: [4, 16]}  # tokens per adapter: base (4), then Plus (16)
# Peak HBM bandwidth in GB/s by device-name fragment (vendor datasheets); --hbm-gbps overrides.
HBM_PEAK = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100": 3350, "A100": 2039}


@dataclass(frozen=True)
class Shape:
    model: str
    where: str  # the blocks that have this shape
    queries: int
    heads: int
    head_dim: int


def shapes() -> list[Shape]:
    """Distinct cross-attention shapes (UNet configs of SD1.5 and SDXL; latents 64² and 128²)."""
    sd15 = [  # heads 8 everywhere, head dim = channels / 8
        Shape("sd15-512", "down0/up3", 64 * 64, 8, 40),
        Shape("sd15-512", "down1/up2", 32 * 32, 8, 80),
        Shape("sd15-512", "down2/up1", 16 * 16, 8, 160),
        Shape("sd15-512", "mid", 8 * 8, 8, 160),
    ]
    sdxl = [  # head dim 64 everywhere
        Shape("sdxl-1024", "down1/up1", 64 * 64, 10, 64),
        Shape("sdxl-1024", "down2/mid/up0", 32 * 32, 20, 64),
    ]
    return sd15 + sdxl


def smoke_shapes() -> list[Shape]:
    return [Shape("smoke", "tiny", 64, 2, 40), Shape("smoke", "tiny", 32, 2, 64)]


def inputs(shape: Shape, tokens: list[int], batch: int, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g).to(device, dtype)

    b, h, n, d = batch, shape.heads, shape.queries, shape.head_dim
    q = r(b, n, h, d).transpose(1, 2)  # as a processor makes it
    k_text, v_text = r(b, h, TEXT_TOKENS, d), r(b, h, TEXT_TOKENS, d)
    k_img, v_img = r(b, h, sum(tokens), d), r(b, h, sum(tokens), d)
    bounds = [0]
    for t in tokens:
        bounds.append(bounds[-1] + t)
    offsets = torch.tensor(bounds, dtype=torch.int32, device=device)
    adapters = torch.arange(len(tokens), dtype=torch.int32, device=device)
    scales = torch.tensor([[0.6, 0.3], [0.8, 0.2]], device=device)[: len(tokens), 0]  # a column view
    return q, k_text, v_text, k_img, v_img, offsets, adapters, scales, bounds


def providers(args):
    q, k_text, v_text, k_img, v_img, offsets, adapters, scales, bounds = args
    b, h, _n, d = q.shape
    segs = [(k_img[:, :, s:e], v_img[:, :, s:e]) for s, e in itertools.pairwise(bounds)]
    host_scales = scales.tolist()  # diffusers keeps scales as Python floats
    k_cat, v_cat = torch.cat([k_text, k_img], dim=2), torch.cat([v_text, v_img], dim=2)

    def fused():
        return torch.ops.ipa_rt.decoupled_attention(q, k_text, v_text, k_img, v_img, offsets, adapters, scales, None)

    def diffusers():
        out = F.scaled_dot_product_attention(q, k_text, v_text).transpose(1, 2).reshape(b, -1, h * d).to(q.dtype)
        for (k, v), s in zip(segs, host_scales, strict=True):
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, h * d).to(q.dtype)
            out = out + s * o
        return out

    def sdpa_concat():
        return F.scaled_dot_product_attention(q, k_cat, v_cat).transpose(1, 2).reshape(b, -1, h * d)

    return {"fused": fused, "diffusers": diffusers, "sdpa_concat": sdpa_concat}


def time_us(fn, device, reps: int) -> float:
    if device.type == "cuda":  # replayed from a CUDA graph: launch overhead out, as inside the graphed loop
        import triton.testing

        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1000
    fn()  # warm-up (compiles under the interpreter)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def floor_bytes(shape: Shape, tokens: list[int], batch: int, itemsize: int) -> int:
    """Q, K, V and O each moved once: the HBM traffic floor of one layer's attention."""
    b, h, n, d = batch, shape.heads, shape.queries, shape.head_dim
    keys = TEXT_TOKENS + sum(tokens)
    return itemsize * (2 * b * h * n * d + 2 * b * h * keys * d)


def peak_gbps(name: str | None, override: float | None) -> float | None:
    if override:
        return override
    for key, value in HBM_PEAK.items():
        if name and key in name:
            return float(value)
    return None


def run(args: argparse.Namespace) -> dict:
    import ipa_rt.kernels.ops  # noqa: F401  (registers the op)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16
    env = environment(device)
    peak = peak_gbps(env.get("gpu"), args.hbm_gbps)
    rows = []
    for shape in smoke_shapes() if args.smoke else shapes():
        for count, tokens in ADAPTER_SETS.items():
            data = inputs(shape, tokens, args.batch, dtype, device)
            fns = providers(data)
            got, want = fns["fused"](), fns["diffusers"]()
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            us = {name: time_us(fn, device, args.reps) for name, fn in fns.items()}
            gbps = floor_bytes(shape, tokens, args.batch, 2) / (us["fused"] * 1e-6) / 1e9
            rows.append(
                {
                    **asdict(shape),
                    "batch": args.batch,
                    "adapters": count,
                    "image_tokens": tokens,
                    "text_tokens": TEXT_TOKENS,
                    "us": us,
                    "fused_gbps": gbps,
                    "fused_hbm_fraction": gbps / peak if peak else None,
                    "speedup_vs_diffusers": us["diffusers"] / us["fused"],
                    "rel_err_vs_diffusers": err,
                }
            )
            print(
                f"{shape.model:10s} {shape.where:14s} N={shape.queries:5d} H={shape.heads:2d} d={shape.head_dim:3d} "
                f"A={count} fused {us['fused']:9.1f} us  diffusers {us['diffusers']:9.1f} us  "
                f"concat {us['sdpa_concat']:9.1f} us  x{rows[-1]['speedup_vs_diffusers']:.2f}  {gbps:7.1f} GB/s",
                flush=True,
            )
    return {"environment": env, "dtype": "fp16", "hbm_peak_gbps": peak, "smoke": args.smoke, "rows": rows}


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# Decoupled attention: fused kernel vs diffusers ({env.get('gpu') or 'CPU smoke run'})",
        "",
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}, driver {env.get('driver')}, "
        f"commit `{env['commit']}`, command `{env['command']}`; fp16, batch 2 (CFG), text 77 tokens.",
        f"HBM peak used for the fraction: {result['hbm_peak_gbps']} GB/s. `sdpa_concat` has different semantics "
        "(one softmax over all keys) and is a speed bound only.",
        "",
        "| model | blocks | queries | heads | head dim | adapters (tokens) | fused µs | diffusers µs | "
        "sdpa_concat µs | speed-up | fused GB/s | % HBM | rel. err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        frac = f"{100 * r['fused_hbm_fraction']:.0f}%" if r["fused_hbm_fraction"] else "n/a"
        lines.append(
            f"| {r['model']} | {r['where']} | {r['queries']} | {r['heads']} | {r['head_dim']} | "
            f"{r['adapters']} ({'+'.join(map(str, r['image_tokens']))}) | {r['us']['fused']:.1f} | "
            f"{r['us']['diffusers']:.1f} | {r['us']['sdpa_concat']:.1f} | {r['speedup_vs_diffusers']:.2f}x | "
            f"{r['fused_gbps']:.0f} | {frac} | {r['rel_err_vs_diffusers']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3, help="CPU repeats (CUDA uses do_bench's own)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check the script (CPU interpreter)")
    parser.add_argument("--hbm-gbps", type=float, default=None, help="peak HBM bandwidth if not detected")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        parser.error("no CUDA device: the benchmark needs a GPU (use --smoke with TRITON_INTERPRET=1 on the CPU)")
    result = run(args)
    write_results(args.out, "attention", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
