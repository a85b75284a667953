"""optimum-intel's OpenVINO Stable Diffusion pipeline, the CPU anchor users know, timed beside ipa_rt's rows.

optimum-intel 2.2 pins ``transformers<5.6`` and ``huggingface_hub<1.22``, which conflict with the main environment's
diffusers 0.42, so it lives in a virtual environment of its own (``IPA_RT_OPTIMUM_VENV``, default
``~/.cache/ipa_rt/optimum-venv``) and this script runs there, in a subprocess of ``benchmarks/cpu.py``. It exports the
same diffusers folder the bench times (no IP-Adapter: optimum has none), reshapes it to static batch 1 at the bench's
size, switches to LCMScheduler and times LCM end to end (text in, PIL image out, full VAE) like the bench: warm-up
excluded, median and p90 over ``--reps``.

    python benchmarks/optimum_anchor.py --ensure          # create the venv (1.6 GB; downloads hundreds of MB)
    VENV/bin/python benchmarks/optimum_anchor.py --base MODEL_DIR --size 512 --reps 3 --out rows.json

The top level uses the standard library only: ``benchmarks/cpu.py`` imports it in the main environment.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SYSTEM = "optimum-intel openvino"
TORCH = "torch==2.13.0"  # installed first and held by a constraint: an unpinned torch would pull CUDA wheels
PINS = [  # found to install beside torch 2.13.0 (Python 3.11); optimum-intel picks its own diffusers/transformers
    "optimum-intel[openvino,diffusers]==2.2.0",
    "optimum==2.3.0",
    "openvino==2026.4.1",
    "openvino-tokenizers==2026.4.1.0",
    "nncf==3.4.0",
    "diffusers==0.39.0",
    "transformers==5.5.4",
    "huggingface_hub==1.21.0",
]
PROMPT = "a photo of a cat"
MARKER = "ipa_rt-optimum.json"  # written once the pinned set is installed: what makes ensure_venv a no-op


def default_venv() -> Path:
    """``$IPA_RT_OPTIMUM_VENV``, else under the user's cache (never inside the checkout: it is 1.6 GB)."""
    if os.environ.get("IPA_RT_OPTIMUM_VENV"):
        return Path(os.environ["IPA_RT_OPTIMUM_VENV"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ipa_rt" / "optimum-venv"


def venv_python(venv: Path) -> Path:
    return Path(venv) / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _pip(python: Path, args: list[str], log: Path) -> None:
    """``python -m pip ARGS``, appended to ``log``; a failure raises with the log's tail."""
    print(f"optimum_anchor: pip {' '.join(args)}", flush=True)
    with log.open("a") as f:
        f.write(f"\n$ pip {' '.join(args)}\n")
        f.flush()
        code = subprocess.run([str(python), "-m", "pip", *args], stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        tail = "".join(collections.deque(log.open(), maxlen=30))
        raise RuntimeError(f"pip {' '.join(args)} failed ({code}); full log {log}, last lines:\n{tail}")


def _drop_broken_torchvision(python: Path, log: Path) -> None:
    """Uninstall torchvision when it cannot load: PyPI's Linux wheel is built against CUDA torch (its ``_C.so``
    links libtorch_cuda), and beside a CPU torch it breaks ``transformers.AutoProcessor`` and so optimum's import.
    optimum imports torchvision only for vision-language and image-classification models, never here."""
    check = subprocess.run([str(python), "-I", "-c", "import torchvision"], capture_output=True, text=True)
    if check.returncode:
        print("optimum_anchor: torchvision does not load beside this torch (a CUDA build): uninstalling it", flush=True)
        _pip(python, ["uninstall", "-y", "torchvision"], log)


def ensure_venv(path: Path | str | None = None) -> Path:
    """The optimum-intel venv at ``path`` (default :func:`default_venv`), created and filled with the pinned set if
    missing; a venv that already holds this set is returned untouched."""
    venv = Path(path).expanduser() if path else default_venv()
    marker, wanted = venv / MARKER, {"torch": TORCH, "pins": PINS}
    if marker.exists() and json.loads(marker.read_text()) == wanted and venv_python(venv).exists():
        print(f"optimum_anchor: using the venv {venv}", flush=True)
        return venv
    python = venv_python(venv)
    if not python.exists():
        print(f"optimum_anchor: creating the venv {venv}", flush=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH + "\n")  # so that no later step replaces (or upgrades to CUDA) the torch below
    log = venv / "pip.log"
    _pip(python, ["install", TORCH], log)
    _pip(python, ["install", "-c", str(constraints), *PINS], log)
    _drop_broken_torchvision(python, log)
    marker.write_text(json.dumps(wanted, indent=2))
    print(f"optimum_anchor: ready: {venv}", flush=True)
    return venv


def measure(venv: Path, base: Path, size: int, reps: int, out: Path, steps: int = 4) -> list[dict]:
    """Run this script with the venv's Python on ``base``; returns its rows. Its own progress lines are shown as
    they come (the export's warnings are not); a failure raises with the output's tail."""
    cmd = [str(venv_python(venv)), "-I", str(Path(__file__).resolve())]  # -I: no checkout, no PYTHON* variables
    cmd += ["--base", str(base), "--size", str(size), "--reps", str(reps), "--steps", str(steps), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a local folder: nothing to ask a hub
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            tail.append(line)
            if line.startswith("optimum_anchor:"):
                print(line, end="", flush=True)
    if proc.returncode:
        raise RuntimeError(f"the optimum-intel anchor failed ({proc.returncode}):\n{''.join(tail)}")
    return json.loads(Path(out).read_text())["rows"]


# ---- what runs inside the venv (optimum-intel, openvino and its own diffusers are importable only there) ----


def stats(samples: list[float]) -> dict:
    """Median and p90 (ms) of ``samples`` (s): the bench's rows, here because this module imports nothing but the
    standard library (benchmarks/cpu.py imports it from here)."""
    s = sorted(samples)
    return {
        "median_ms": 1000 * statistics.median(s),
        "p90_ms": 1000 * s[min(len(s) - 1, math.ceil(0.9 * len(s)) - 1)],
        "n": len(s),
    }


def _versions() -> dict:
    from importlib.metadata import version

    names = [pin.split("==")[0].split("[")[0] for pin in [*PINS, TORCH]]  # what was installed, as installed
    return {n: version(n) for n in names} | {"python": sys.version.split()[0]}


def _batch_one_unet(pipe) -> None:
    """Static batch 1 for the UNet: optimum's reshape doubles the batch of a UNet without ``timestep_cond`` for
    classifier-free guidance, which LCM at guidance 1 does not run (diffusers then calls it with one row)."""
    shapes = {}
    for port in pipe.unet.model.inputs:
        shape = port.get_partial_shape()
        if port.get_any_name() in ("sample", "encoder_hidden_states"):
            shape[0] = 1
        shapes[port.get_any_name()] = shape
    pipe.unet.model.reshape(shapes)


def _compiled_properties(pipe) -> dict:
    """Each compiled network's precision hint and threads as OpenVINO reports them (on a CPU with bf16 arithmetic
    its default hint is bf16, not f32), and the element types of the UNet's weights (f32, f16, or int8 when
    optimum compressed them)."""
    out = {}
    for name in ("text_encoder", "unet", "vae_decoder"):
        request = getattr(pipe, name).request
        out[name] = {
            "INFERENCE_PRECISION_HINT": request.get_property("INFERENCE_PRECISION_HINT").to_string(),
            "PERFORMANCE_HINT": str(request.get_property("PERFORMANCE_HINT")),
            "INFERENCE_NUM_THREADS": int(request.get_property("INFERENCE_NUM_THREADS")),
        }
    constants = (op for op in pipe.unet.model.get_ops() if op.get_type_name() == "Constant")
    out["unet"]["weight_types"] = sorted({op.get_element_type().to_string() for op in constants})
    return out


def run(base: Path, size: int, reps: int, steps: int = 4) -> list[dict]:
    """Export ``base`` with optimum-intel, compile at static batch 1 and ``size``, time LCM ``steps`` end to end."""
    import openvino as ov
    import torch
    from diffusers import LCMScheduler
    from optimum.intel import OVStableDiffusionPipeline

    t0 = time.perf_counter()
    # the text encoder's weights, saved by the main environment's newer transformers in another key layout, may load
    # as fresh random ones here: the same architecture and cost, and the bench's weights are random anyway
    pipe = OVStableDiffusionPipeline.from_pretrained(str(base), export=True, compile=False)
    export_s = time.perf_counter() - t0
    print(f"optimum_anchor: exported {base} in {export_s:.1f} s", flush=True)
    pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
    _batch_one_unet(pipe)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)  # LCM sampling on SD1.5, as the bench runs it
    t0 = time.perf_counter()
    pipe.compile()
    compile_s = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)

    def call():
        gen = torch.Generator().manual_seed(0)
        kw = dict(num_inference_steps=steps, guidance_scale=1.0, height=size, width=size, output_type="pil")
        return pipe(PROMPT, generator=gen, **kw).images

    with torch.inference_mode():
        t0 = time.perf_counter()
        (image,) = call()  # the warm-up, excluded from the samples
        warmup_s = time.perf_counter() - t0
        if image.size != (size, size):
            raise RuntimeError(f"optimum's pipeline gave a {image.size} image, not {size}²")
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            samples.append(time.perf_counter() - t0)
    row = {
        "size": size,
        "system": SYSTEM,
        "workload": f"LCM {steps} steps end to end (no IP-Adapter)",
        **stats(samples),
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "decoder": "full VAE (AutoencoderKL)",  # ipa_rt's fast mode decodes with TAESD instead
        "ip_adapter": False,
        "compiled": _compiled_properties(pipe),
        "cpu_capabilities": ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"),
        "export_s": export_s,
        "compile_s": compile_s,
        "warmup_s": warmup_s,
        "versions": _versions(),
    }
    hint = row["compiled"]["unet"]["INFERENCE_PRECISION_HINT"]
    print(f"optimum_anchor: {size}² LCM-{steps} median {row['median_ms']:.1f} ms ({hint})", flush=True)
    return [row]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ensure", nargs="?", const="", default=None, metavar="VENV", help="create the venv")
    parser.add_argument("--base", type=Path, help="a diffusers StableDiffusionPipeline folder")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, help="the JSON file the rows go to")
    args = parser.parse_args(argv)
    if args.ensure is not None:
        print(ensure_venv(args.ensure or None))
        return 0
    if args.base is None or args.out is None:
        parser.error("--base and --out are required (or --ensure)")
    rows = run(args.base, args.size, args.reps, args.steps)
    args.out.write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
