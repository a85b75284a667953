"""What every benchmark result records: device, driver, versions, commit and the command that made it."""

from __future__ import annotations

import contextlib
import gc
import platform
import subprocess
import sys
from pathlib import Path

import torch


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import diffusers

    env = {
        "torch": torch.__version__,
        "triton": triton_version,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "commit": _run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"]),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"gpu": props.name, "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    else:
        env |= {"gpu": None, **cpu_info()}
    return env


def cpu_info() -> dict:
    """The CPU's model name, the flags that decide its matmul kernels (:data:`ipa_rt.cpu.FLAGS`), its machine class
    and its core counts."""
    import psutil

    from ipa_rt.cpu import FLAGS, cpu_features

    cpu = cpu_features()
    return {
        "cpu": cpu.described,
        "cpu_flags": [f for f in FLAGS if f in cpu.flags],
        "machine_class": cpu.machine_class,
        "cores": psutil.cpu_count(logical=False),
        "logical_cpus": psutil.cpu_count(),
    }


def machine_class() -> str:
    """What the targets are reported per (:attr:`ipa_rt.cpu.CpuFeatures.machine_class`)."""
    from ipa_rt.cpu import cpu_features

    return cpu_features().machine_class


def reset_peak_rss() -> None:
    """Start a new peak-resident-memory window for this process: the heap that earlier systems freed handed back to
    the system (glibc's ``malloc_trim``), then Linux's high-water mark reset to what is resident now (``clear_refs``
    5). Elsewhere nothing happens and :func:`peak_rss_mb` gives None."""
    import ctypes
    import ctypes.util

    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        with contextlib.suppress(AttributeError, OSError):
            ctypes.CDLL(libc).malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (MB) since the last :func:`reset_peak_rss` (Linux ``VmHWM``)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in text.splitlines() if line.startswith("VmHWM:")), None)
    return kib / 1024 if kib is not None else None


def not_available(backend: str, precision: str) -> str | None:
    """Why this CPU cannot run a system on ``backend`` at ``precision`` (OpenVINO refuses bf16 without bf16
    arithmetic), or None. A bench records the reason instead of the system's rows."""
    if backend != "openvino":
        return None
    from ipa_rt.errors import ConfigError
    from ipa_rt.export.openvino_engine import check_precision

    try:
        check_precision(precision)
    except ConfigError as e:
        return str(e)
    return None


def device_timer(device: torch.device):
    """``time(fn) -> seconds``: CUDA events around ``fn`` on CUDA (synchronised), perf_counter elsewhere."""
    import time

    def run(fn) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def pipeline_dtype(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype argument for a diffusers pipeline, spelled as the installed diffusers wants it:
    ``dtype`` where pipelines take it (diffusers 0.42 warns on every ``torch_dtype``), else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def write_results(out: Path, prefix: str, result: dict, markdown: str, hardware: str | None = None) -> None:
    """``<out>/<prefix>-<hardware>.json`` and ``.md`` (hardware: the GPU's name, else ``cpu-smoke``)."""
    import json

    name = hardware or (result["environment"].get("gpu") or "cpu-smoke").lower().replace(" ", "-")
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("json", json.dumps(result, indent=2)), ("md", markdown)):
        tmp = out / f".{prefix}-{name}.{suffix}.tmp"  # atomic: a killed run never leaves half a file
        tmp.write_text(text)
        tmp.replace(out / f"{prefix}-{name}.{suffix}")
    print(f"wrote {out}/{prefix}-{name}.json and .md")


def rows_table(rows: list[dict]) -> list[str]:
    """Markdown lines of ``ipa_rt bench`` timing rows, with each row's error against diffusers fp32 when it has one
    (final latents relative L2, decoded image PSNR)."""
    import math

    errors = any("latent_rel_l2" in r for r in rows)
    head = "| model | workload | system | median ms | p90 ms |"
    lines = [head + (" latents rel. L2 vs diffusers fp32 | PSNR dB |" if errors else ""), "|---|---|---|---|---|"]
    lines[1] += "---|---|" if errors else ""
    for r in rows:
        line = f"| {r['family']} | {r['workload']} | {r['system']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} |"
        if errors:
            err = f" {r['latent_rel_l2']:.1e} |" if "latent_rel_l2" in r else " |"
            db = r.get("psnr_db")
            line += err + ("" if db is None else " inf" if math.isinf(db) else f" {db:.1f}") + " |"
        lines.append(line)
    return lines


def serve_table(result: dict) -> list[str]:
    """Markdown lines of a serve load test: the setting, then one row per max batch size."""
    lines = [
        f"{result['date']}, {result['model']}; {result['replicas']} replicas, {result['concurrency']} concurrent "
        f"clients, {result['steps']} steps, size {result['size'] or 'default'}"
        + (f"; one replica killed after {result['kill_after']} answers" if result["kill_after"] else ""),
        "",
        "| max batch | requests | ok | lost | errors | req/s | p50 s | p95 s | p99 s | requests by batch size |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lat, errors = r["latency_s"], ", ".join(f"{k}: {n}" for k, n in r["errors_by_status"].items()) or "-"
        formed = ", ".join(f"{n}× size {k}" for k, n in r["batch_sizes_formed"].items())
        lines.append(
            f"| {r['max_batch_size']} | {r['requests']} | {r['ok']} | {r['lost']} | {errors} | {r['requests_per_s']} "
            f"| {lat['p50']} | {lat['p95']} | {lat['p99']} | {formed} |"
        )
    return lines


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def _growth(g: float | None) -> str:
    return "-" if g is None else f"{g:+.2%}"


def soak_lines(result: dict) -> list[str]:
    """Markdown lines of a soak (benchmarks/soak.py): the setting, the verdict and its checks, the totals, then
    latency per window, resident memory per process and the answers per request kind."""
    c, s, env = result["config"], result["summary"], result["environment"]
    return [
        f"{env.get('cpu')} ({env.get('machine_class')}), {env.get('logical_cpus')} logical CPUs; {result['what']}; "
        f"{c['clients']} client(s), {c['warmup_s']:g} s warm-up then {c['duration_s']:g} s measured; shares: "
        f"{c['repeat_share']:.0%} repeated references, {c['text_share']:.0%} text only, {c['bad_share']:.0%} bad.",
        "",
        f"**{'PASS' if s['passed'] else 'FAIL'}** — " + "; ".join(f"{k}: {_yes(v)}" for k, v in s["checks"].items()),
        "",
        f"{s['requests']} requests ({s['measured_requests']} after warm-up, {s['requests_per_s']} /s), "
        f"{s['images']} images, {s['lost']} lost, {s['wrong']} wrong; max memory growth "
        f"{s['max_memory_growth']:.2%}; p99 last/first window {s['p99_ratio']}"
        + ("" if result["exit_code"] is None else f"; server exit code after SIGINT {result['exit_code']}"),
        "",
        "| window start s | requests | images | p50 s | p99 s |",
        "|---|---|---|---|---|",
        *[f"| {w['start_s']} | {w['requests']} | {w['images']} | {w['p50_s']} | {w['p99_s']} |" for w in s["windows"]],
        "",
        "| process | samples | warm-up MB | first window MB | last window MB | growth | peak MB |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {name} | {m['samples']} | {m['warmup_mb']} | {m['first_mb']} | {m['last_mb']} | "
            f"{_growth(m['growth'])} | {m['peak_mb']} |"
            for name, m in s["memory"].items()
        ],
        "",
        "| request kind | count | answers (status: count) |",
        "|---|---|---|",
        *[
            f"| {k} | {n} | {', '.join(f'{st}: {m}' for st, m in sorted(s['answers_by_kind'][k].items()))} |"
            for k, n in s["requests_by_kind"].items()
        ],
    ]


def peaks_text(peaks: dict) -> str:
    """``fp32 134, bf16 378`` (older runs: one library) or the same per library (``torch ...; openvino ...``)."""
    if all(isinstance(v, dict) for v in peaks.values()):
        return "; ".join(f"{lib} {peaks_text(rates)}" for lib, rates in peaks.items())
    return ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
