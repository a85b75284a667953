"""Where an OpenVINO UNet step spends its time: OpenVINO's per-layer performance counters, summed by layer type
and kernel, with the step's GFLOP/s against this machine's matmul peak for its precision.

    python benchmarks/profile_unet.py ENGINE_DIR --base DIR --ip-adapter FILE [--rows 1] [--reps 5] [--json F]

``ENGINE_DIR`` is an ``ipa_rt build --backend openvino`` directory (its manifest says the precision and size). The
step's FLOPs are PyTorch's count on the model it was built from (``--flops N`` gives them instead).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def counters(request) -> dict[tuple[str, str], float]:
    """Milliseconds per ``(layer type, kernel)`` of the last inference."""
    out: dict[tuple[str, str], float] = defaultdict(float)
    for info in request.profiling_info:
        out[(info.node_type, info.exec_type)] += info.real_time.total_seconds() * 1000
    return dict(out)


def feeds(model, rows: int, manifest: dict) -> dict[str, np.ndarray]:
    """Inputs at the engine's static shape for ``rows`` rows: noise for tensors, a mid-schedule timestep, scale 1."""
    rng = np.random.default_rng(0)
    out = {}
    for port in model.inputs:
        name = port.get_any_name()
        spec = manifest["networks"]["unet"]["inputs"][name]["profile"][0]
        shape = [rows * max(1, spec[0]) if i == 0 else d for i, d in enumerate(spec)]
        out[name] = np.full(shape, 500.0, np.float32) if name == "timestep" else rng.standard_normal(shape, np.float32)
        if name == "ip_scale":
            out[name] = np.ones(shape, np.float32)
    return out


def profile(engine: Path, rows: int, reps: int) -> dict:
    import openvino as ov

    from ipa_rt.export.openvino_engine import compute_precision, cpu_threads

    manifest = json.loads((engine / "manifest.json").read_text())
    hint = compute_precision("unet", manifest["precision"])
    core = ov.Core()
    model = core.read_model(str(engine / "openvino" / "unet.xml"))
    inputs = feeds(model, rows, manifest)
    model.reshape({k: list(v.shape) for k, v in inputs.items()})
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True}
    request = core.compile_model(model, "CPU", config | {"INFERENCE_NUM_THREADS": cpu_threads()}).create_infer_request()
    request.infer(inputs)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        request.infer(inputs)
        times.append(time.perf_counter() - start)
    layers = counters(request)
    return {"precision": manifest["precision"], "hint": hint, "rows": rows, "shapes": manifest["shapes"],
            "step_ms": 1000 * statistics.median(times), "layers_ms": layers}  # fmt: skip


def report(result: dict, flops: float | None, peak: float | None) -> str:
    total = sum(result["layers_ms"].values())
    lines = [f"UNet step ({result['precision']}, hint {result['hint']}, {result['rows']} row(s), "
             f"{result['shapes']['height']}²): {result['step_ms']:.0f} ms, counters sum {total:.0f} ms"]  # fmt: skip
    if flops:
        rate = flops * result["rows"] / (result["step_ms"] / 1000) / 1e9
        share = f", {rate / peak:.0%} of the {peak:.0f} GFLOP/s matmul peak" if peak else ""
        lines.append(f"{rate:.0f} GFLOP/s{share}")
    lines += ["", "| layer type | kernel | ms | share |", "|---|---|---|---|"]
    for (kind, kernel), ms in sorted(result["layers_ms"].items(), key=lambda kv: -kv[1])[:20]:
        lines.append(f"| {kind} | {kernel} | {ms:.1f} | {ms / total:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine", type=Path)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--flops", type=float, default=None, help="FLOPs of one UNet row (else counted)")
    parser.add_argument("--base", help="the diffusers folder the engine was built from (to count FLOPs)")
    parser.add_argument("--ip-adapter", help="its IP-Adapter file")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.flops is None and not (args.base and args.ip_adapter):
        parser.error("give --base and --ip-adapter (to count the step's FLOPs) or --flops")
    result = profile(args.engine, args.rows, args.reps)
    flops = args.flops
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import cpu  # the bench's FLOP counter and matmul peaks, one definition of each

    if flops is None:
        flops = cpu.unet_flops({"base": args.base, "adapter": args.ip_adapter}, result["shapes"]["height"])
    peak = cpu.best_peaks(cpu.matmul_peaks()).get({"fp32": "fp32", "bf16": "bf16"}.get(result["precision"], "int8"))
    result |= {"unet_flops_per_row": flops, "peak": peak}
    print(report(result, flops, peak))
    if args.json:
        layers = {f"{k} / {e}": ms for (k, e), ms in result["layers_ms"].items()}
        args.json.write_text(json.dumps(result | {"layers_ms": layers}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
