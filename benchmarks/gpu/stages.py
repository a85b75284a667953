"""The stages of the GPU first-light kit, one per process (``first_light.py`` runs them, time-boxed).

    python benchmarks/gpu/stages.py STAGE --work DIR --result FILE [--rehearse]

Each stage writes its result as JSON to ``--result``, rewritten atomically after every row it finishes, so a stage
killed at its time box still leaves what it measured. ``--rehearse`` runs the same code on the CPU with the tiny
models (fp32; the Triton interpreter for the kernel rows, eager loops where CUDA graphs would run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the benchmark modules (harness, attention, video, ...) sit one folder up

import torch  # noqa: E402
from common import _run  # noqa: E402

from ipa_rt.cache import atomic_write_bytes  # noqa: E402
from ipa_rt.doctor import rel_l2  # noqa: E402  (NaN or inf is an infinite error: never passes)

SIZES = {"sd15": 512, "sdxl": 1024}  # the families' native sizes, fp16 on the GPU
REHEARSAL_SIZE = 32


class Record:
    """A stage's result dict, written atomically to disk on every update."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, {}

    def update(self, **items: Any) -> None:
        self.data.update(items)
        atomic_write_bytes(self.path, json.dumps(self.data, indent=1, default=str).encode())


def device_dtype(rehearse: bool) -> tuple[torch.device, torch.dtype]:
    if rehearse or not torch.cuda.is_available():
        return torch.device("cpu"), torch.float32
    return torch.device("cuda"), torch.float16


def model_folder(work: Path, rehearse: bool, family: str = "sd15") -> Path:
    """Where the models stage writes a family's files: ``benchmarks/video.py``'s ``--work`` layout for SD1.5."""
    return work / ("tiny" if rehearse else "full") / ("base" if family == "sd15" else family)


def model_files(folder: Path, family: str) -> dict[str, Path]:
    return {
        "base": folder / f"model-{family}",
        "adapter": next((folder / "IP-Adapter" / "models").glob("*.safetensors")),
    }


# --- a. environment ---------------------------------------------------------------------------------------------
def stage_environment(args: argparse.Namespace, rec: Record) -> None:
    import ipa_rt

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "ipa_rt": ipa_rt.__version__,
        "commit": os.environ.get("IPA_RT_COMMIT") or _run(["git", "-C", str(HERE), "rev-parse", "HEAD"]),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    for module in ("triton", "diffusers", "transformers", "onnxruntime"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        env |= {
            "gpu": props.name,
            "capability": f"sm_{props.major}{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_free_gib": round(free / 2**30, 1),
            "memory_total_gib": round(total / 2**30, 1),
        }
        fields = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu"
        query = _run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"])
        if query:
            env |= dict(zip(fields.replace(".", "_").split(","), (v.strip() for v in query.split(",")), strict=False))
    else:
        env["gpu"] = None
    rec.update(environment=env)


# --- the models every later stage reads --------------------------------------------------------------------------
def write_family(folder: Path, family: str, rehearse: bool) -> float:
    """Full-size (or, rehearsing, tiny) random-weight models of ``family`` in the real formats, under ``folder``.
    On CUDA the modules are initialised on the GPU (seconds instead of a minute of CPU init for SDXL's UNet)."""
    from models import write_models

    if (folder / "reference.png").exists():
        return 0.0
    start = time.perf_counter()
    if torch.cuda.is_available() and not rehearse:
        try:
            with torch.device("cuda"):
                write_models(folder, family, full=True)
            return time.perf_counter() - start
        except Exception as exc:  # never measured on a GPU before: fall back to the CPU init the suite checks
            print(f"GPU init of the {family} models failed ({type(exc).__name__}: {exc}); writing on the CPU")
            shutil.rmtree(folder, ignore_errors=True)
    write_models(folder, family, full=not rehearse)
    return time.perf_counter() - start


def stage_models(args: argparse.Namespace, rec: Record) -> None:
    seconds = write_family(model_folder(args.work, args.rehearse), "sd15", args.rehearse)
    rec.update(sd15_write_s=round(seconds, 1), folder=str(model_folder(args.work, args.rehearse)))


# --- b. ipa_rt doctor --------------------------------------------------------------------------------------------
def stage_doctor(args: argparse.Namespace, rec: Record) -> None:
    files = model_files(model_folder(args.work, args.rehearse), "sd15")
    report = args.work / "doctor.json"
    dtype = "fp32" if args.rehearse else "fp16"
    cmd = [sys.executable, "-m", "ipa_rt", "doctor", str(files["base"]), "--ip-adapter", str(files["adapter"])]
    cmd += ["--dtype", dtype, "-o", str(report)]
    if args.rehearse:
        cmd += ["--device", "cpu"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout + proc.stderr, flush=True)
    if not report.exists():
        raise RuntimeError(f"ipa_rt doctor wrote no report (exit {proc.returncode})")
    rec.update(
        exit_code=proc.returncode, seconds=round(time.perf_counter() - start, 1), **json.loads(report.read_text())
    )


# --- c. attention micro-benchmark --------------------------------------------------------------------------------
def stage_attention(args: argparse.Namespace, rec: Record) -> None:
    import attention

    out = args.work / "attention"
    attention.main(["--out", str(out), *(["--smoke"] if args.rehearse else [])])
    (result,) = [json.loads(p.read_text()) for p in out.glob("attention-*.json")]
    rec.update(**result)


# --- d./e. the pipelines ------------------------------------------------------------------------------------------
def _lcm(pipe) -> Any:
    import ipa_rt

    return ipa_rt.runtime.schedulers.make_scheduler("lcm", pipe.scheduler)


def pipeline_errors(bench, cfg_steps: int) -> dict[str, float]:
    """Each ipa_rt system's output against diffusers' on the same weights and latents: the UNet step with CFG,
    LCM 4 steps, ``cfg_steps`` with CFG, and LCM 4 steps after a scale change and after an image change."""
    import copy

    import ipa_rt

    dpm = ipa_rt.runtime.schedulers.make_scheduler("dpm++2m", bench.diffusers.scheduler)
    lcm = _lcm(bench.diffusers)
    cases: list[tuple[str, Any, int, float, float, Any]] = [
        ("LCM 4 steps", lcm, 4, 1.0, 1.0, None),
        (f"{cfg_steps} steps CFG", dpm, cfg_steps, 7.5, 1.0, None),
        ("LCM 4 steps after a scale change", lcm, 4, 1.0, 0.6, None),
        ("LCM 4 steps after an image change", lcm, 4, 1.0, 1.0, bench.other),
    ]
    want: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for system in bench.systems():
        bench.use(system)
        pipe = bench.diffusers if system == "diffusers" else bench.ours
        for name, scheduler, steps, guidance, scale, image in cases:
            pipe.scheduler = copy.deepcopy(scheduler)
            pipe.set_ip_adapter_scale(scale)
            with torch.no_grad():  # not inference mode: the static buffers made here are written later
                out = bench.call(system, steps, guidance, image=image, output_type="latent").float()
            if system == "diffusers":
                want[name] = out
            else:
                errors[f"{system} / {name}"] = rel_l2(out, want[name])
        pipe.set_ip_adapter_scale(1.0)
        if system == "ipa_rt+graphs":  # a replay returns nothing: the graphed step's attention is run eagerly
            bench.use(system := "ipa_rt+triton")
        torch.manual_seed(0)  # the step's random latents and text: the same for every system
        with torch.no_grad():
            out = bench.unet_step(system, 2)().float()
        if system == "diffusers":
            want["unet step b2"] = out
        else:
            errors[f"{system} / unet step b2"] = rel_l2(out, want["unet step b2"])
    return errors


def batched_rows(bench, system: str, count: int, reps: int, timer) -> dict[str, Any]:
    """``count`` requests, each its own reference image, scale, prompt and seed: one ``pipe.batch`` call against
    ``count`` single calls (LCM 4 steps), and the largest error of a batched request against the same request
    alone."""
    import ipa_rt.testing as T

    bench.use(system)
    pipe = bench.ours
    pipe.scheduler = _lcm(bench.diffusers)
    images = [T.make_image(10 + i, (384, 384)) for i in range(count)]
    scales = [0.3 + 0.7 * i / max(count - 1, 1) for i in range(count)]

    def request(i: int) -> dict[str, Any]:
        return dict(
            prompt=f"a photo of a cat, take {i}",
            ip_adapter_image=images[i],
            num_inference_steps=4,
            guidance_scale=1.0,
            height=bench.size,
            width=bench.size,
            generator=torch.Generator("cpu").manual_seed(i),
            output_type="latent",
        )

    def batched() -> list[torch.Tensor]:
        return [o.images for o in pipe.batch([request(i) | {"ip_adapter_scale": scales[i]} for i in range(count)])]

    def singles() -> list[torch.Tensor]:
        outs = []
        for i in range(count):
            pipe.set_ip_adapter_scale(scales[i])
            outs.append(pipe(**request(i)).images)
        pipe.set_ip_adapter_scale(1.0)
        return outs

    with torch.no_grad():
        got, want = batched(), singles()  # warm-up (captures) and the error check
        error = max(rel_l2(g.float(), w.float()) for g, w in zip(got, want, strict=True))
        t_batch = sorted(timer(batched) for _ in range(reps))[reps // 2]
        t_single = sorted(timer(singles) for _ in range(reps))[reps // 2]
    return {
        "system": system,
        "requests": count,
        "batched_ms": 1000 * t_batch,
        "singles_ms": 1000 * t_single,
        "speedup": t_single / t_batch,
        "max_rel_l2_batched_vs_alone": error,
    }


def stage_pipelines(args: argparse.Namespace, rec: Record, family: str) -> None:
    import harness
    import runtime as rt
    from common import device_timer

    import ipa_rt.testing as T

    device, dtype = device_dtype(args.rehearse)
    folder = model_folder(args.work, args.rehearse, family)
    rec.update(family=family, write_s=round(write_family(folder, family, args.rehearse), 1))
    size = REHEARSAL_SIZE if args.rehearse else SIZES[family]
    cfg_steps, reps, requests = (2, 1, 3) if args.rehearse else (30, 10, 8)
    cuda = device.type == "cuda"
    systems = ["diffusers", "ipa_rt", "ipa_rt+graphs"] if cuda else ["diffusers", "ipa_rt"]
    bench = harness.Bench(family, model_files(folder, family), device, dtype, size, only=list(systems))
    rec.update(size=size, dtype=str(dtype).removeprefix("torch."), load_s=round(bench.load_s, 1))
    if cuda:  # what kernel tuning costs a pipeline build in a first process on this GPU: into an empty tuning cache
        from ipa_rt.kernels.select import tune_layers

        saved = os.environ.get("IPA_RT_CACHE")
        os.environ["IPA_RT_CACHE"] = str(args.work / f"tuning-{family}")
        start = time.perf_counter()
        try:
            tune_layers(bench.ours.layer_shapes(), dtype, device)
            rec.update(tune_s=round(time.perf_counter() - start, 2))
        except Exception as exc:  # recorded, not fatal: the rows below still run with the default configurations
            rec.update(tune_s=None, tune_error=f"{type(exc).__name__}: {exc}")
        finally:
            os.environ.pop("IPA_RT_CACHE") if saved is None else os.environ.__setitem__("IPA_RT_CACHE", saved)
    rec.update(errors=pipeline_errors(bench, cfg_steps))
    timer = device_timer(device)
    rows: list[dict] = []
    profile = {"cfg_steps": cfg_steps}
    for system in systems:  # one system at a time, so a stage stopped at its time box keeps the rows it has
        bench.only = [system]
        rows += harness.run_family(bench, profile, timer, reps)
        rec.update(rows=rows)
    bench.only = systems
    best = "ipa_rt+graphs" if cuda else "ipa_rt"
    rec.update(batched=batched_rows(bench, best, requests, max(1, reps // 3), timer))
    bench.use(best)
    pipe = bench.ours
    pipe.scheduler = _lcm(bench.diffusers)
    images = [T.make_image(20, (384, 384)), T.make_image(21, (384, 384))]
    controls = rt.control_costs(pipe, images[0], images, size, timer)
    rec.update(controls=controls | {"system": best}, done=True)


# --- f. AnimateDiff ------------------------------------------------------------------------------------------------
def stage_video(args: argparse.Namespace, rec: Record) -> None:
    import video

    out = args.work / "video"
    argv = ["--work", str(args.work), "--out", str(out), "--reps", "1"]
    argv += ["--tiny", "--frames", "2", "--size", str(REHEARSAL_SIZE)] if args.rehearse else ["--frames", "16"]
    if not args.rehearse:
        argv += ["--size", "512"]
    video.main(argv)
    (result,) = [json.loads(p.read_text()) for p in out.glob("*-video-*.json")]
    rec.update(**result)


# --- g. the families served inside diffusers' pipelines: Flux.1, Kolors, SD3.5 (issue #26) ---------------------------
# Full width; depth sized to the kit's boxes (writing and loading random weights is most of a stage): FLUX.1's 19
# double-stream blocks (where the adapter acts) and 4 of its 38 single ones at 4096 image tokens; Kolors' full SDXL
# UNet (depths 1/2/10) at 1024² with ChatGLM3 at 2 of 28 layers (one call per request); SD3.5-Large at 12 of its 38
# blocks at 4096 image tokens. bf16, diffusers against ipa_rt (CUDA graphs, the fused kernel where it applies).
FAMILY_GPU = {
    "flux": ["--double", "19", "--single", "4", "--size", "256", "--text", "512", "--steps", "4", "--reps", "2"],
    "kolors": ["--layers", "1", "2", "10", "--glm-layers", "2", "--size", "1024", "--steps", "4", "--reps", "2"],
    "sd3": ["--blocks", "12", "--size", "256", "--steps", "4", "--reps", "2"],
}


def stage_family(args: argparse.Namespace, rec: Record, family: str) -> None:
    """One family of ``benchmarks/families.py`` on the GPU (:data:`FAMILY_GPU`); rehearsing, its tiny models on
    PyTorch."""
    import families

    out, work = args.work / f"families-{family}", args.work / "families-work"
    if args.rehearse:
        argv = ["--family", family, "--tiny", "--systems", "diffusers fp32", "ipa_rt torch fp32"]
    else:
        argv = ["--family", family, "--device", "cuda", *FAMILY_GPU[family]]
        with torch.device("cuda"):  # initialise the random modules on the GPU: seconds instead of minutes
            families.FAMILIES[family].write(work, families.parse([*argv, "--work", str(work)]))
    families.main([*argv, "--work", str(work), "--out", str(out)])
    (result,) = [json.loads(p.read_text()) for p in out.glob("*-families*.json")]
    rec.update(**result)


STAGES: dict[str, Callable[[argparse.Namespace, Record], None]] = {
    "environment": stage_environment,
    "models": stage_models,
    "doctor": stage_doctor,
    "attention": stage_attention,
    "sd15": lambda a, r: stage_pipelines(a, r, "sd15"),
    "sdxl": lambda a, r: stage_pipelines(a, r, "sdxl"),
    "video": stage_video,
    **{f: lambda a, r, f=f: stage_family(a, r, f) for f in FAMILY_GPU},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--rehearse", action="store_true")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    STAGES[args.stage](args, Record(args.result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
