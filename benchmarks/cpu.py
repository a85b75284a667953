"""CPU benchmark: diffusers against every ipa_rt CPU backend, same weights, one process (``ipa_rt bench``).

Full-size SD1.5 with an IP-Adapter (base, and Plus at 256²), random weights in the real formats (speed does not depend
on weight values), at 256² and 512². Systems (each where installed):

- ``diffusers fp32``: what users run; the oracle every row's error is measured against;
- ``diffusers bf16+taesd``: diffusers with the fast recipe (bf16 weights, TAESD decoder): the fair peer of fast modes;
- ``ipa_rt torch fp32`` / ``torch bf16`` (± TAESD); ``ipa_rt onnxruntime fp32``;
- ``ipa_rt openvino fp32`` / ``bf16`` / ``int8``, each ± TAESD (engines built once into the bench cache, exports kept);
- ``optimum-intel`` (its OpenVINO SD pipeline, no IP-Adapter), in a venv of its own (benchmarks/optimum_anchor.py).

Workloads: LCM 4 steps end to end (a PIL reference in, a PIL image out, ipa_rt's caches cleared: the reference and
prompt encoded every call), the same with the reference cached (ipa_rt; a new prompt each call), 25 steps with
classifier-free guidance end to end (DPM++ 2M), one denoising step, changing the image prompt, changing the scale.
Warm-up excluded, medians and p90 over repeats, every timed region in inference mode. Every system's LCM-4 latents
and decoded image are compared with diffusers fp32's (relative L2, PSNR, SSIM), int8 ones with the bf16 path's too.
The machine's matmul peaks (torch fp32/bf16, OpenVINO f32/bf16/int8) are measured in the same run, and each
system's UNet step is reported as a fraction of its precision's best peak; the targets are judged per machine class,
and where the run's own measurements bound one (faithful, repeated reference) its ceiling is reported beside it.

    ipa_rt bench --profile cpu                  # ~1.5-2 h on 2 cores (engine builds included the first time)
    ipa_rt bench --profile cpu --tiny --sizes 32   # tiny models: checks the harness (the test suite runs it)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import (
    environment,
    machine_class,
    not_available,
    peak_rss_mb,
    peaks_text,
    pipeline_dtype,
    reset_peak_rss,
    rows_table,
    write_results,
)
from models import write_models
from optimum_anchor import stats  # one definition: the anchor's venv cannot import this module
from torch.utils.flop_counter import FlopCounterMode

import ipa_rt
from ipa_rt import testing as T
from ipa_rt.cpu import CLASSES


def _every_class(want: float) -> dict[str, float]:
    return dict.fromkeys(CLASSES, want)


# issue #34, per machine class (ipa_rt.cpu.CLASSES), at the largest size run (512²): benchmark figures, never timed
# tests. A class a key does not list has no such target (bf16 steps where the CPU has no bf16 arithmetic).
TARGETS: dict[str, dict[str, float]] = {
    # the faithful speed-up over diffusers' arithmetic at the fp32 matmul peak: the fp32 path near the machine's peak
    "faithful_fraction_of_fp32_ceiling": _every_class(0.9),
    "faithful_lcm4_speedup_vs_sdcpp_f32": _every_class(4.0),
    "fast_lcm4_speedup_vs_sdcpp_fastest": _every_class(5.0),
    "sdcpp_q8_0_peak_rss_over_fast": _every_class(1.0),  # the fast mode holds no more than sd.cpp q8_0 + TAESD
    # AVX2: four fp32 UNet steps at the machine's peak allow ~3.2x; bf16/AMX machines have the low-precision units
    "fast_lcm4_speedup_vs_diffusers_fp32": {"AMX": 6.0, "AVX512_BF16": 6.0, "AVX-512": 3.0, "AVX2": 3.0},
    "fast_lcm4_speedup_vs_diffusers_same_recipe": _every_class(2.5),
    "repeated_reference_fraction_of_ceiling": _every_class(0.95),  # "at its ceiling", within run-to-run noise
    "unet_step_fraction_of_matmul_peak_fp32": _every_class(0.6),
    "unet_step_fraction_of_matmul_peak_bf16": {"AMX": 0.6, "AVX512_BF16": 0.6},
    "unet_step_fraction_of_matmul_peak_int8": _every_class(0.6),
    "fast_lcm4_speedup_vs_optimum_intel": _every_class(1.0),  # ipa_rt's fast mode with IP-Adapter, optimum without
}
FAITHFUL_RTOL = 1e-4  # latents relative L2 against diffusers fp32
LCM, CFG = "LCM 4 steps end to end", "25 steps CFG end to end"
REPEATED = "LCM 4 steps, same reference"  # the image side cached: a new prompt each call, the same image
SDCPP = "stable-diffusion.cpp"  # the anchor's rows: "stable-diffusion.cpp f32", "... q8_0+taesd", ...


@dataclass
class System:
    name: str
    kind: str  # "diffusers", "ipa_rt" or "optimum"
    precision: str  # fp32, bf16 or int8: which matmul peak its step is measured against
    taesd: bool = False
    backend: str = "torch"
    options: dict = field(default_factory=dict)

    @property
    def fast(self) -> bool:  # the fast-mode recipe: low precision and the TAESD decoder
        return self.taesd and self.precision != "fp32"


def systems(openvino: bool) -> list[System]:
    out = [
        System("diffusers fp32", "diffusers", "fp32"),
        System("diffusers bf16+taesd", "diffusers", "bf16", taesd=True),
        System("ipa_rt torch fp32", "ipa_rt", "fp32"),
        System("ipa_rt torch bf16", "ipa_rt", "bf16"),
        System("ipa_rt torch bf16+taesd", "ipa_rt", "bf16", taesd=True),
        System("ipa_rt onnxruntime fp32", "ipa_rt", "fp32", backend="onnxruntime"),
    ]
    if openvino:
        for precision in ("fp32", "bf16", "int8"):
            for taesd in (False, True):
                name = f"ipa_rt openvino {precision}" + ("+taesd" if taesd else "")
                out.append(System(name, "ipa_rt", precision, taesd, "openvino", {"precision": precision}))
    return out


def unavailable(system: System) -> str | None:
    """Why this CPU cannot run ``system`` (:func:`common.not_available`), or None."""
    return not_available(system.backend, system.precision)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    return time.perf_counter() - start


def matmul_peaks(n: int = 2048, reps: int = 5) -> dict[str, dict[str, float]]:
    """GFLOP/s (GOP/s for int8) of an n³ matmul on this machine, median of ``reps``, per library: PyTorch (fp32,
    bf16) and OpenVINO (f32, bf16, int8: the kernels its engines use). A step's fraction is taken against the best
    of them for its precision."""
    out: dict[str, dict[str, float]] = {"torch": {}, "openvino": {}}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        out["torch"][name] = 2 * n**3 / statistics.median(timed(lambda a=a, b=b: a @ b) for _ in range(reps)) / 1e9
    try:
        out["openvino"] = openvino_peaks(n, reps)
    except ImportError:
        pass
    return out


def openvino_peaks(n: int, reps: int) -> dict[str, float]:
    """OpenVINO's matmul rate: an ``[n, n] x [n, n]`` FullyConnected compiled in f32, bf16 and int8 (NNCF-quantised
    input and weight, as the int8 UNet's layers are)."""
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops

    from ipa_rt.export.openvino_engine import cpu_supports_bf16, cpu_threads
    from ipa_rt.export.quantize import quantize_matmul

    rng = np.random.default_rng(0)
    x = ops.parameter([n, n], np.float32, name="x")
    weight = ops.constant(rng.standard_normal((n, n)).astype(np.float32))
    model = ov.Model([ops.matmul(x, weight, False, True)], [x])
    data = rng.standard_normal((n, n)).astype(np.float32)
    bf16 = cpu_supports_bf16()  # without bf16 arithmetic there is no bf16 rate, and int8's float parts run in f32
    out = {}
    threads = cpu_threads()
    graphs = [("fp32", "f32", model), ("bf16", "bf16", model)][: 1 + bf16]
    graphs.append(("int8", "bf16" if bf16 else "f32", quantize_matmul(model, data)))
    for name, hint, graph in graphs:
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"} | {"INFERENCE_NUM_THREADS": threads}
        request = ov.Core().compile_model(graph, "CPU", config).create_infer_request()
        request.infer({0: data})
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            request.infer({0: data})
            samples.append(time.perf_counter() - start)
        out[name] = 2 * n**3 / statistics.median(samples) / 1e9
    return out


def best_peaks(peaks: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per precision, the best rate any library reached in this run."""
    out: dict[str, float] = {}
    for rates in peaks.values():
        for name, rate in rates.items():
            out[name] = max(out.get(name, 0.0), rate)
    return out


def unet_flops(files: dict, size: int) -> float:
    """FLOPs of one UNet forward on one row at ``size``, counted by PyTorch's FLOP counter on the real module."""
    pipe = ipa_rt.Pipeline.from_pretrained(files["base"], files["adapter"], attention="sdpa")
    h = size // pipe.vae_scale_factor
    tokens = pipe.adapters.entries[0].tokens_per_image or pipe.image_encoder_tokens()
    pipe.adapters.prepare([torch.randn(1, 1, tokens, pipe.unet.config.cross_attention_dim)])
    sample, text = torch.randn(1, 4, h, h), torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        pipe.unet(sample, torch.tensor([500]), encoder_hidden_states=text)
    return float(counter.get_total_flops())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float().clamp(0, 1) - b.float().clamp(0, 1)) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of two ``[N, C, H, W]`` images in [0, 1] (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
    K1 0.01, K2 0.03, per channel, valid positions)."""
    a, b = a.double().clamp(0, 1), b.double().clamp(0, 1)
    size = min(11, a.shape[-1], a.shape[-2])
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(a.shape[1], 1, size, size)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, window, groups=a.shape[1])

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return value.mean().item()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return ((a - b).norm() / b.norm()).item()


class Runner:
    """One system loaded for one model and size: its pipeline and how to run each workload on it."""

    def __init__(self, system: System, files: dict, size: int) -> None:
        self.system, self.files, self.size = system, files, size
        t0 = time.perf_counter()
        self.pipe = self._load()
        self.load_s = time.perf_counter() - t0
        self.pipe.set_progress_bar_config(disable=True)
        # the dtype the pipeline's own tensors are in: engines take fp32 whatever they compute in
        self.dtype = torch.bfloat16 if system.precision == "bf16" and system.backend == "torch" else torch.float32

    def _load(self):
        s, f = self.system, self.files
        if s.kind == "diffusers":
            import diffusers

            dtype = torch.bfloat16 if s.precision == "bf16" else torch.float32
            kw = {"vae": diffusers.AutoencoderTiny.from_pretrained(f["taesd"], torch_dtype=dtype)} if s.taesd else {}
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(f["base"], **pipeline_dtype(dtype), **kw)
            adapter = Path(f["adapter"])
            pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name)
            pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
            return pipe
        kw = {"scheduler": "lcm", "vae": str(f["taesd"]) if s.taesd else None}
        if s.backend == "torch":
            dtype = torch.bfloat16 if s.precision == "bf16" else torch.float32
            return ipa_rt.Pipeline.from_pretrained(f["base"], f["adapter"], dtype=dtype, **kw)
        options = {"height": self.size, "width": self.size, **s.options}
        return ipa_rt.Pipeline.from_pretrained(f["base"], f["adapter"], backend=s.backend, engine_options=options, **kw)

    def scheduler(self, name: str) -> None:
        import diffusers

        if self.system.kind == "diffusers":
            cls = diffusers.LCMScheduler if name == "lcm" else diffusers.DPMSolverMultistepScheduler
            self.pipe.scheduler = cls.from_config(self.pipe.scheduler.config)
        else:
            self.pipe.scheduler = ipa_rt.runtime.schedulers.make_scheduler(name, self.pipe.base.scheduler)

    def forget_reference(self) -> None:
        if self.system.kind == "ipa_rt":  # every timed first call pays the whole image and text side, as diffusers does
            self.pipe.clear_caches()

    def call(self, image, steps: int, guidance: float, output_type: str = "pil", latents=None, prompt: str = ""):
        kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=self.size, width=self.size)
        if latents is not None:
            kw["latents"] = latents.to(self.dtype)
        ref = image if self.system.kind == "diffusers" else [image]
        gen = torch.Generator().manual_seed(0)
        prompt = prompt or "a photo of a cat"
        return self.pipe(prompt, ip_adapter_image=ref, generator=gen, output_type=output_type, **kw).images

    def step(self) -> Callable[[], object]:
        """One denoising step, from the loop's static buffers (ipa_rt) or one UNet call with the adapter (diffusers)."""
        if self.system.kind == "ipa_rt":
            state = next(reversed(self.pipe.loop.states.values()))

            def one() -> None:
                state.idx.zero_()
                self.pipe.loop._step(state)

            return one
        pipe = self.pipe
        h = self.size // pipe.vae_scale_factor
        embeds = pipe.prepare_ip_adapter_image_embeds([T.make_image(0, (384, 384))], None, "cpu", 1, False)
        lat = torch.randn(1, 4, h, h, dtype=self.dtype)
        text = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, dtype=self.dtype)
        added = {"image_embeds": [e.to(self.dtype) for e in embeds]}
        return lambda: pipe.unet(lat, torch.tensor(500), encoder_hidden_states=text, added_cond_kwargs=added)

    def change_image(self, image) -> Callable[[], object]:
        if self.system.kind == "ipa_rt":
            pipe = self.pipe

            def new() -> None:  # a reference never seen: one encode, projection and K/V
                pipe.clear_caches()
                c = pipe.conditioner(image, None, None, "concat", 1, False)
                pipe.adapters.prepare(pipe.adapters.project(c[0], c[1]))

            return new
        return lambda: self.pipe.prepare_ip_adapter_image_embeds([image], None, "cpu", 1, False)


SERVE_FROM_ENGINES = """
import sys, torch, ipa_rt
from ipa_rt import testing as T
folder, size = sys.argv[1], int(sys.argv[2])
pipe = ipa_rt.Pipeline.from_engine(folder, scheduler="lcm")
pipe.set_progress_bar_config(disable=True)
for seed in range(2):  # the first call compiles the static shapes; the second runs as every later one does
    pipe("a photo of a cat", ip_adapter_image=[T.make_image(0, (384, 384))], num_inference_steps=4, guidance_scale=1.0,
         height=size, width=size, generator=torch.Generator().manual_seed(seed))
# this process's own peak (VmHWM starts anew at exec; ru_maxrss would carry the bench's peak over from the fork)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def engine_process_peak_rss_mb(cache: Path, size: int) -> float | None:
    """Peak resident memory (MB) of a fresh process that loads the engine set just built in ``cache`` and runs two
    LCM-4 calls: what serving from built engines holds, comparable with stable-diffusion.cpp's whole process (the
    bench's own process also holds what the build and the other systems left)."""
    import subprocess

    manifests = sorted(cache.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not manifests:
        return None
    argv = [sys.executable, "-c", SERVE_FROM_ENGINES, str(manifests[-1].parent), str(size)]
    done = subprocess.run(argv, capture_output=True, text=True)
    return int(done.stdout.split()[-1]) / 1024 if done.returncode == 0 else None  # VmHWM: KiB


def run_system(system: System, files: dict, size: int, variant: str, args, oracle: dict) -> tuple[list, dict]:
    """All workloads of one system; returns rows and its errors against the oracle (diffusers fp32)."""
    runner = Runner(system, files, size)
    # the system's own window, from its loaded state to its last LCM call: an engine build in the load (the torch
    # model exported once) is not what serving from built engines holds
    reset_peak_rss()
    label = f"sd15 {variant} {size}²"
    image, other = T.make_image(0, (384, 384)), T.make_image(1, (384, 384))
    rows, info = [], {"load_s": round(runner.load_s, 1)}

    def row(workload: str, samples: list[float]) -> None:
        rows.append({"family": label, "size": size, "variant": variant, "system": system.name,
                     "workload": workload, **stats(samples)})  # fmt: skip
        print(f"{label:18s} {system.name:28s} {workload:26s} {rows[-1]['median_ms']:10.1f} ms", flush=True)

    latent = size // runner.pipe.vae_scale_factor
    lat = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(3))
    # the oracle's whole call counted (UNet steps, decoder, encoders): the arithmetic any faithful path does
    counter = FlopCounterMode(display=False) if system.name == "diffusers fp32" else contextlib.nullcontext()
    with torch.inference_mode():
        latents = runner.call(image, 4, 1.0, "latent", latents=lat).float()  # also the warm-up
        with counter:
            pixels = runner.call(image, 4, 1.0, "pt", latents=lat).float()
    if isinstance(counter, FlopCounterMode):
        info["call_flops"] = float(counter.get_total_flops())
    if system.name == "diffusers fp32":
        oracle.update(latents=latents, pixels=pixels)
    info.update(quality(latents, pixels, oracle))
    if system.name in BF16_ORACLES:  # the int8 rows' second reference: the bf16 path with the same decoder
        oracle[BF16_ORACLES[system.name]] = {"latents": latents, "pixels": pixels}
    lower = oracle.get(BF16_ORACLES.get(system.name.replace("int8", "bf16"), ""))
    if system.precision == "int8" and lower:
        info["vs_bf16"] = quality(latents, pixels, lower)
    samples = []
    for _ in range(args.reps):
        runner.forget_reference()
        samples.append(timed(lambda: runner.call(image, 4, 1.0)))
    row(LCM, samples)
    info["peak_rss_mb"] = peak_rss_mb()  # the whole process's resident memory, this system's load and calls
    if system.backend != "torch" and not args.tiny:
        info["process_peak_rss_mb"] = engine_process_peak_rss_mb(Path(os.environ["IPA_RT_CACHE"]), size)
    if system.kind == "ipa_rt":  # the reference cached by the call before: a new prompt, the same image
        prompts = iter(f"a photo of a cat, take {i}" for i in range(args.reps))
        row(REPEATED, [timed(lambda: runner.call(image, 4, 1.0, prompt=next(prompts))) for _ in range(args.reps)])
    if variant == "base":
        row("one denoising step", [timed(runner.step()) for _ in range(args.reps)])
        row("change image prompt", [timed(runner.change_image(other)) for _ in range(args.reps)])
        row("change scale", [timed(lambda: runner.pipe.set_ip_adapter_scale(0.7)) for _ in range(args.reps)])
        if size in args.cfg_sizes and (size <= 256 or system.name in args.cfg_512_systems):
            runner.scheduler("dpm++2m")
            runner.call(image, 2, 7.5)  # warm-up: the CFG signature (the step count is not part of it)
            reps = 1 if size > 256 else args.reps
            row(CFG, [timed(lambda: runner.call(image, args.cfg_steps, 7.5)) for _ in range(reps)])
    for r in rows:
        r.update(latent_rel_l2=info["latent_rel_l2"], psnr_db=info["psnr_db"])
    return rows, info


BF16_ORACLES = {"ipa_rt openvino bf16": "bf16", "ipa_rt openvino bf16+taesd": "bf16+taesd"}


def quality(latents: torch.Tensor, pixels: torch.Tensor, reference: dict) -> dict[str, float]:
    """Error of one system's LCM-4 result against a reference's: latents relative L2, decoded PSNR and SSIM."""
    return {
        "latent_rel_l2": rel_l2(latents, reference["latents"]),
        "psnr_db": psnr(pixels, reference["pixels"]),
        "ssim": ssim(pixels, reference["pixels"]),
    }


def optimum_rows(files: dict, size: int, args, errors: dict | None = None) -> list[dict]:
    """optimum-intel's OpenVINO Stable Diffusion pipeline on the same folder and size (no IP-Adapter): the CPU anchor
    users know. Its pins conflict with this environment's diffusers, so benchmarks/optimum_anchor.py runs it in a
    venv of its own (created on first use); a failure is printed and recorded in ``errors``, and gives no rows."""
    import tempfile

    import optimum_anchor

    key = f"{optimum_anchor.SYSTEM}@{size}"
    try:
        venv = optimum_anchor.ensure_venv(args.optimum_venv)
        with tempfile.TemporaryDirectory() as tmp:
            rows = optimum_anchor.measure(venv, files["base"], size, args.reps, Path(tmp) / "rows.json")
    except Exception as e:  # the anchor is a reference beside the bench, not a reason to lose its other rows
        print(f"optimum-intel anchor skipped at {size}²: {e}", flush=True)
        if errors is not None:
            text = str(e) or type(e).__name__
            errors[key] = {"error": text.splitlines()[0], "detail": text[-2000:]}  # what failed, and its output's end
        return []
    for r in rows:  # the bench's own labels, so the row sits beside ipa_rt's LCM rows
        r.update(family=f"sd15 base {size}²", variant="base", system=optimum_anchor.SYSTEM)
        r["workload"] = LCM + " (no IP-Adapter)"
        print(f"{r['family']:18s} {r['system']:28s} {r['workload']:26s} {r['median_ms']:10.1f} ms", flush=True)
    return rows


def sdcpp_rows(files: dict, size: int, args, errors: dict, work: Path) -> list[dict]:
    """stable-diffusion.cpp (benchmarks/sdcpp_anchor.py) on the same folder, adapter, encoder, reference, size, steps
    and sampler, at its weight types ± TAESD (``--sdcpp-configs``), the 25-step CFG workload for
    ``--sdcpp-cfg-configs``. Without a binary the anchor is skipped with the reason, recorded in ``errors``."""
    import sdcpp_anchor

    exe, why = sdcpp_anchor.find_binary(args.sdcpp)
    if exe is None:
        print(f"stable-diffusion.cpp anchor skipped: {why}", flush=True)
        errors[f"{SDCPP}@{size}"] = {"error": why}
        return []
    lcm = {LCM: {"sampler": "lcm", "steps": 4, "cfg_scale": 1.0}}
    cfg = {CFG: {"sampler": "dpm++2m", "steps": args.cfg_steps, "cfg_scale": 7.5}} if size in args.cfg_sizes else {}
    rows = []
    for config in args.sdcpp_configs:
        workloads = lcm | (cfg if config in args.sdcpp_cfg_configs else {})
        rows += sdcpp_anchor.measure(exe, files, size, args.sdcpp_reps, [config], workloads, work=work / "sdcpp",
                                     errors=errors)  # fmt: skip
    for r in rows:  # the bench's own labels, beside ipa_rt's rows
        r.update(family=f"sd15 base {size}²", variant="base")
    return rows


def summary(rows: list[dict], errors: dict, peaks: dict, flops: dict) -> dict:
    def med(system: str, workload: str, size: int, variant: str = "base") -> float | None:
        return next((r["median_ms"] for r in rows if (r["system"], r["workload"], r["size"], r["variant"])
                     == (system, workload, size, variant)), None)  # fmt: skip

    big = max(r["size"] for r in rows)
    d32, peer = med("diffusers fp32", LCM, big), med("diffusers bf16+taesd", LCM, big)
    ours = {n.split("@")[0]: e for n, e in errors.items() if n.startswith("ipa_rt") and n.endswith(f"@{big}")}
    # faithful: diffusers' latents (≤ 1e-4) decoded by diffusers' own VAE (a TAESD image is not diffusers' output)
    faithful = [med(n, LCM, big) for n, e in ours.items() if e["latent_rel_l2"] <= FAITHFUL_RTOL and "taesd" not in n]
    fast = {n: med(n, LCM, big) for n in ours if "taesd" in n and "fp32" not in n}
    fast = {n: t for n, t in fast.items() if t}
    best_faithful = min(filter(None, faithful), default=None)
    best_fast_name = min(fast, key=fast.__getitem__, default=None)
    best_fast = fast.get(best_fast_name) if best_fast_name else None
    repeated = med(best_fast_name, REPEATED, big) if best_fast_name else None
    anchor = med("optimum-intel openvino", LCM + " (no IP-Adapter)", big)
    precision = {s.name: s.precision for s in systems(True)}
    rates = best_peaks(peaks)
    utilization = {}
    for r in rows:
        if r["workload"] == "one denoising step" and r["system"].startswith("ipa_rt"):
            p = precision[r["system"]]
            achieved = flops[r["size"]] / (r["median_ms"] / 1000) / 1e9
            utilization[f"{r['system']} @{r['size']}"] = {
                "precision": p, "gflops": achieved, "fraction": achieved / rates[p] if rates.get(p) else None
            }  # fmt: skip

    def best_fraction(p: str) -> float | None:
        return max((u["fraction"] for k, u in utilization.items() if u["precision"] == p and u["fraction"]
                    and k.endswith(f"@{big}")), default=None)  # fmt: skip

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    encode = med(best_fast_name, "change image prompt", big) if best_fast_name else None
    call_flops = errors.get(f"diffusers fp32@{big}", {}).get("call_flops")
    fp32 = [rates.get("fp32", 0.0)] + [u["gflops"] for u in utilization.values() if u["precision"] == "fp32"]
    if call_flops and best_faithful:  # the faithful call itself, counted as the oracle's arithmetic
        fp32.append(call_flops / best_faithful / 1e6)
    ceilings = _ceilings(d32, call_flops, max(fp32), best_fast, encode)
    # the faithful target's reference: the same arithmetic at the machine's fp32 matmul peak alone (the ceiling above
    # also counts the faithful call's own rate, so a path at its own rate would always reach it)
    at_peak = _ceilings(d32, call_flops, rates.get("fp32", 0.0), None, None).get("faithful")
    if at_peak:
        ceilings["faithful_at_fp32_matmul_peak"] = at_peak
    faithful_speedup, repeated_speedup = ratio(d32, best_faithful), ratio(best_fast, repeated)
    # sd.cpp's rows are whole processes: its image generation without the weight loads (compute_ms, its own log) is
    # what compares with a call on a loaded pipeline (the process time where the log gave none)
    sdcpp = {r["system"]: r for r in rows if r["system"].startswith(SDCPP) and (r["workload"], r["size"]) == (LCM, big)}
    sdcpp_ms = {name: r.get("compute_ms") or r["median_ms"] for name, r in sdcpp.items()}
    sdcpp_fastest = min(sdcpp_ms.values(), default=None)
    sdcpp_q8_rss = sdcpp.get(f"{SDCPP} q8_0+taesd", {}).get("peak_rss_mb")  # the fast mode's recipe: TAESD
    fast_info = errors.get(f"{best_fast_name}@{big}", {}) if best_fast_name else {}
    fast_rss = fast_info.get("process_peak_rss_mb") or fast_info.get("peak_rss_mb")  # a fresh process's where measured
    measured = {
        "faithful_lcm4_speedup_vs_diffusers_fp32": faithful_speedup,
        "faithful_fraction_of_fp32_ceiling": ratio(faithful_speedup, at_peak),
        "faithful_lcm4_speedup_vs_sdcpp_f32": ratio(sdcpp_ms.get(f"{SDCPP} f32"), best_faithful),
        "fast_lcm4_speedup_vs_sdcpp_fastest": ratio(sdcpp_fastest, best_fast),
        "sdcpp_q8_0_peak_rss_over_fast": ratio(sdcpp_q8_rss, fast_rss),
        "fast_lcm4_speedup_vs_diffusers_fp32": ratio(d32, best_fast),
        "fast_lcm4_speedup_vs_diffusers_same_recipe": ratio(peer, best_fast),
        "repeated_reference_speedup_vs_first_call": repeated_speedup,
        "repeated_reference_fraction_of_ceiling": ratio(repeated_speedup, ceilings.get("repeated_reference")),
        **{f"unet_step_fraction_of_matmul_peak_{p}": best_fraction(p) for p in ("fp32", "bf16", "int8")},
        "fast_lcm4_speedup_vs_optimum_intel": ratio(anchor, best_fast),
    }
    cls = machine_class()
    targets = {}
    for key, per_class in TARGETS.items():
        want, have = per_class.get(cls), measured[key]
        if want is not None and have is not None:
            ok = have >= want
            targets[key] = {"target": want, "measured": have, "met": ok, "short_by": None if ok else want / have}
    return {"size": big, "machine_class": cls, "fast_system": best_fast_name, "measured": measured,
            "targets": targets, "ceilings": ceilings, "unet_step_utilization": utilization,
            "peak_rss_mb": {"fast": fast_rss, "sdcpp q8_0+taesd": sdcpp_q8_rss}}  # fmt: skip


def _ceilings(
    d32_ms: float | None, call_flops: float | None, fp32_gflops: float, first_ms: float | None, encode_ms: float | None
) -> dict[str, float]:
    """What this run's own measurements allow two targets to reach (absent when it lacks the rows):

    - faithful: diffusers fp32's call time over the time its counted arithmetic (every matmul and convolution of the
      call: 4 UNet steps, the VAE decode, the encoders; PyTorch's FLOP counter) takes at ``fp32_gflops``, the best
      fp32 rate measured in the run (the fp32 matmul peak, an fp32 UNet step, or the faithful call as a whole). A
      faithful path computes the same products in fp32: beyond this it would have to run them faster than anything
      measured on this machine did, or do fewer (an algorithm such as Winograd's);
    - repeated reference: a same-image call can skip what changing the image costs (encode, projection, image K/V:
      the "change image prompt" row) and nothing else (the new prompt is encoded; the steps and the decode run), so
      first / (first - that)."""
    out = {}
    if d32_ms and call_flops and fp32_gflops:
        out["faithful"] = d32_ms / (1000 * call_flops / (fp32_gflops * 1e9))
    if first_ms and encode_ms is not None and encode_ms < first_ms:
        out["repeated_reference"] = first_ms / (first_ms - encode_ms)
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# ipa_rt bench — profile cpu on CPU ({env.get('cpu')}, {result['threads']} threads)",
        "",
        f"torch {env['torch']}, diffusers {env['diffusers']}, openvino {result['versions'].get('openvino')}, "
        f"onnxruntime {result['versions'].get('onnxruntime')}, commit `{env['commit']}`, command `{env['command']}`;"
        " random weights of the full-size SD1.5 architecture, one process.",
        f"Machine class: **{result['summary']['machine_class']}**; CPU flags: {', '.join(env.get('cpu_flags', []))}.",
        f"Matmul peaks measured in this run (GFLOP/s; int8: GOP/s): {peaks_text(result['peaks'])}.",
        "" if result["complete"] else "\n**Incomplete run**: the rows below are what it measured before it stopped.\n",
        *rows_table(result["rows"]),
        *[f"- {name}: not available on this CPU ({why})" for name, why in result.get("not_available", {}).items()],
        "",
        f"| target ({result['summary']['machine_class']}) | wanted | measured | met | short by |",
        "|---|---|---|---|---|",
    ]
    for key, g in result["summary"]["targets"].items():
        short = f"{g['short_by']:.2f}x" if g["short_by"] else ""
        lines.append(f"| {key} | {g['target']} | {g['measured']:.2f} | {'yes' if g['met'] else 'no'} | {short} |")
    ceilings = result["summary"].get("ceilings", {})
    if ceilings:
        lines += ["", "Ceilings on this machine: " + ", ".join(f"{k} {v:.2f}x" for k, v in ceilings.items()) + ". "
                  "Faithful: diffusers fp32's time over its counted matmul and convolution FLOPs at the best fp32 rate "
                  "measured in this run (matmul peak, fp32 UNet step or the faithful call itself); repeated reference: "
                  "first call over first call minus what changing the image costs (all that a same-image call can "
                  "skip); faithful at the fp32 matmul peak: the same arithmetic at the best fp32 matmul rate alone, "
                  "what the faithful fraction target is taken against. The fraction targets are the speed-up over "
                  "the ceiling."]  # fmt: skip
    lines += ["", "| UNet step | precision | GFLOP/s | fraction of its precision's best matmul peak |",
              "|---|---|---|---|"]  # fmt: skip
    for name, u in result["summary"]["unet_step_utilization"].items():
        fraction = f"{u['fraction']:.2f}" if u.get("fraction") else "-"
        lines.append(f"| {name} | {u.get('precision', '')} | {u['gflops']:.0f} | {fraction} |")
    lines += ["", "LCM-4 quality (same latents in): against diffusers fp32, and int8 against the bf16 path with the "
              "same decoder.", "", "| system | latents rel. L2 | PSNR dB | SSIM | vs bf16: latents rel. L2 | PSNR dB "
              "| SSIM |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, e in result["errors"].items():
        if "latent_rel_l2" not in e:
            continue
        low = e.get("vs_bf16", {})
        cells = [f"{e['latent_rel_l2']:.2e}", f"{e['psnr_db']:.1f}", f"{e.get('ssim', float('nan')):.4f}"]
        cells += [f"{low['latent_rel_l2']:.2e}", f"{low['psnr_db']:.1f}", f"{low['ssim']:.4f}"] if low else ["", "", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; the environment variables it sets for itself are restored afterwards (tests call it
    in-process)."""
    saved = {k: os.environ.get(k) for k in ("IPA_RT_CACHE", "IPA_RT_KEEP_EXPORTS")}
    try:
        return _main(argv)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ipa_rt bench --profile cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cfg-steps", type=int, default=25)
    parser.add_argument("--cfg-sizes", type=int, nargs="*", default=[256, 512])
    parser.add_argument(
        "--cfg-512-systems",
        nargs="*",
        default=["diffusers fp32", "ipa_rt openvino fp32", "ipa_rt openvino bf16+taesd"],
        help="systems that also run the 25-step CFG workload above 256² (one repeat: minutes each)",
    )
    parser.add_argument("--systems", nargs="*", default=None, help="only these systems (names as listed)")
    parser.add_argument("--tiny", action="store_true", help="tiny models: checks the harness")
    parser.add_argument("--plus", action=argparse.BooleanOptionalAction, default=True, help="IP-Adapter Plus too")
    parser.add_argument("--work", type=Path, default=None, help="models and engine cache (default: a temp dir)")
    parser.add_argument("--resume", action="store_true", help="go on from the last run's progress in --work")
    parser.add_argument("--optimum", action=argparse.BooleanOptionalAction, default=True, help="optimum-intel anchor")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--optimum-venv",
        type=Path,
        default=None,
        help="optimum-intel's venv, created there if missing (default: $IPA_RT_OPTIMUM_VENV, else "
        "~/.cache/ipa_rt/optimum-venv)",
    )
    parser.add_argument("--sdcpp", default=None, help="stable-diffusion.cpp's sd-cli (default: $IPA_RT_SDCPP)")
    parser.add_argument(
        "--sdcpp-configs",
        nargs="*",
        default=["f32", "f16", "q8_0", "q4_0", "f32+taesd", "f16+taesd", "q8_0+taesd", "q4_0+taesd"],
        help="sd.cpp weight types, each with or without +taesd",
    )
    parser.add_argument("--sdcpp-cfg-configs", nargs="*", default=["f32", "q8_0+taesd"], help="sd.cpp's CFG rows")
    parser.add_argument("--sdcpp-reps", type=int, default=1, help="timed sd-cli processes per configuration")
    args = parser.parse_args(argv)
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"ipa_rt-cpu-bench-{os.getpid()}"
    own_cache = "IPA_RT_CACHE" not in os.environ  # then engines are dropped once measured (GBs per set)
    os.environ.setdefault("IPA_RT_CACHE", str(work / "cache"))
    os.environ.setdefault("IPA_RT_KEEP_EXPORTS", "1")  # the engine variants share their exports
    try:
        import openvino  # noqa: F401

        have_ov = True
    except ImportError:
        have_ov = False
    chosen = [s for s in systems(have_ov) if args.systems is None or s.name in args.systems]
    left_out = {s.name: why for s in chosen if (why := unavailable(s))}
    for name, why in left_out.items():
        print(f"{name}: not available on this CPU ({why})", flush=True)
    chosen = [s for s in chosen if s.name not in left_out]
    peaks = matmul_peaks(256 if args.tiny else 2048)
    print(f"matmul peaks GFLOP/s: {peaks}", flush=True)
    progress = Progress(work / f"progress-{'tiny' if args.tiny else 'full'}.json", args.resume)
    rows, errors, loads, flops = progress.rows, progress.errors, progress.loads, progress.flops
    prefix = "tiny" if args.tiny else dt.date.today().isoformat()
    for variant in ("base", "plus") if args.plus else ("base",):
        folder = work / ("tiny" if args.tiny else "full") / variant
        if not (folder / "reference.png").exists():
            write_models(folder, "sd15", full=not args.tiny, variant=variant)
        files = {
            "base": folder / "model-sd15",
            "adapter": next((folder / "IP-Adapter" / "models").glob("*.safetensors")),
            "taesd": folder / "taesd",
        }
        sizes = args.sizes if variant == "base" else [min(args.sizes)]
        for size in sizes:
            if variant == "base" and str(size) not in flops:
                flops[str(size)] = unet_flops(files, size)
            oracle = progress.oracle(variant, size)
            for system in chosen:
                if variant == "plus" and system.name not in (
                    "diffusers fp32", "ipa_rt torch fp32", "ipa_rt openvino fp32", "ipa_rt openvino bf16+taesd"
                ):  # fmt: skip
                    continue
                key = f"{system.name} {variant}@{size}" if variant != "base" else f"{system.name}@{size}"
                if key in errors:
                    continue  # measured by the run this one resumes
                got, info = run_system(system, files, size, variant, args, oracle)
                gc.collect()  # one system's pipeline in memory at a time
                if own_cache and system.backend != "torch":
                    drop_engines(Path(os.environ["IPA_RT_CACHE"]))
                rows += got
                errors[key], loads[f"{system.name}@{size}"] = info, info["load_s"]
                progress.save(variant, size, oracle)
                # results written after every system: a run stopped early still leaves what it measured
                partial = result(args, peaks, progress, False, left_out)
                write_results(args.out, prefix, partial, markdown(partial), hardware="cpu")
            anchored = any(r["system"] == "optimum-intel openvino" and r["size"] == size for r in rows)  # --resume
            if variant == "base" and not args.tiny and not anchored and args.optimum:
                rows += optimum_rows(files, size, args, errors)
            anchored = any(r["system"].startswith(SDCPP) and r["size"] == size for r in rows)
            if variant == "base" and not args.tiny and not anchored:
                sd_files = {**files, "image_encoder": folder / "IP-Adapter" / "models" / "image_encoder",
                            "image": folder / "reference.png"}  # fmt: skip
                rows += sdcpp_rows(sd_files, size, args, errors, work)
                progress.save(variant, size, oracle)
                partial = result(args, peaks, progress, False, left_out)
                write_results(args.out, prefix, partial, markdown(partial), hardware="cpu")
            if own_cache:
                shutil.rmtree(
                    Path(os.environ["IPA_RT_CACHE"]) / "exports", ignore_errors=True
                )  # next size: new exports
    final = result(args, peaks, progress, True, left_out)
    write_results(args.out, prefix, final, markdown(final), hardware="cpu")
    return 0


def drop_engines(cache: Path) -> None:
    """Remove the engine sets and OpenVINO's compiled blobs of the system just measured (full-size sets are several
    GB each; the kept ONNX exports stay for the next precision of the same size)."""
    for entry in cache.iterdir():
        if entry.is_dir() and entry.name != "exports":
            shutil.rmtree(entry, ignore_errors=True)


class Progress:
    """What a run has measured so far, saved after every system (rows, errors, the oracle's tensors) so that
    ``--resume`` goes on where a stopped run ended."""

    def __init__(self, path: Path, resume: bool) -> None:
        import json

        self.path = path
        state = json.loads(path.read_text()) if resume and path.exists() else {}
        self.rows, self.errors = state.get("rows", []), state.get("errors", {})
        self.loads, self.flops = state.get("load_s", {}), state.get("flops", {})

    def oracle(self, variant: str, size: int) -> dict:
        f = self.path.with_name(f"{self.path.stem}-oracle-{variant}-{size}.pt")
        return torch.load(f) if f.exists() and self.errors else {}

    def save(self, variant: str, size: int, oracle: dict) -> None:
        import json

        torch.save(oracle, self.path.with_name(f"{self.path.stem}-oracle-{variant}-{size}.pt"))
        state = {"rows": self.rows, "errors": self.errors, "load_s": self.loads, "flops": self.flops}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.path)


def result(args, peaks: dict, progress: Progress, complete: bool, left_out: dict[str, str]) -> dict:
    """The results file's content from what ``progress`` holds; ``left_out``: the systems this CPU cannot run, with
    the reason."""
    from ipa_rt.export.manifest import versions

    flops = {int(k): v for k, v in progress.flops.items()}
    return {
        "environment": environment(torch.device("cpu")),
        "profile": "cpu",
        "date": dt.date.today().isoformat(),
        "dtype": "mixed (see each system)",
        "threads": torch.get_num_threads(),
        "tiny": args.tiny,
        "versions": versions(),
        "peaks": peaks,
        "unet_flops_per_row": flops,
        "complete": complete,  # False: a run stopped early (or still going); its rows are what it measured
        "rows": progress.rows,
        "errors": progress.errors,
        "load_s": progress.loads,
        "not_available": left_out,
        "summary": summary(progress.rows, progress.errors, peaks, flops),
    }


if __name__ == "__main__":
    sys.exit(main())
