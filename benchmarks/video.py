"""Video benchmark: diffusers' ``AnimateDiffPipeline`` against ``ipa_rt.AnimateDiffPipeline``, same weights, one
process (``ipa_rt bench --profile video``).

Full-size SD1.5 with an IP-Adapter and a motion adapter of AnimateDiff v1.5's architecture, random weights in the
real formats. Workloads, 16 frames, end to end (a PIL reference in, PIL frames out): AnimateLCM's recipe (LCM, 4
steps, guidance 1) and 25 steps with classifier-free guidance (DDIM). A 16-frame clip is a batch of 16 (32 with
guidance) UNet rows per step, so the CPU default is 128²; on CUDA 512² in fp16. Every ipa_rt row carries its final
latents' error against diffusers with the same dtype (relative L2).

    ipa_rt bench --profile video [--size 128] [--frames 16] [--reps 2] [--work DIR]
    ipa_rt bench --profile video --tiny          # tiny models: checks the harness (the test suite runs it)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

import torch
from common import device_timer, environment, pipeline_dtype, rows_table, write_results
from cpu import rel_l2, stats
from models import write_models

import ipa_rt
from ipa_rt import testing as T

WORKLOADS = {  # name: (diffusers scheduler, ipa_rt scheduler, steps, guidance)
    "AnimateLCM 4 steps end to end": ("LCMScheduler", "lcm", 4, 1.0),
    "CFG end to end": ("DDIMScheduler", "ddim", 25, 7.5),
}


def load(system: str, files: dict, dtype: torch.dtype, device: str):
    """One system's pipeline: ``diffusers`` or ``ipa_rt`` (same files, same dtype)."""
    adapter = Path(files["adapter"])
    if system == "diffusers":
        import diffusers

        motion = diffusers.MotionAdapter.from_pretrained(files["motion"], torch_dtype=dtype)
        kw = pipeline_dtype(dtype)
        pipe = diffusers.AnimateDiffPipeline.from_pretrained(files["base"], motion_adapter=motion, **kw)
        pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name)
        pipe.to(device)
    else:
        pipe = ipa_rt.AnimateDiffPipeline.from_pretrained(
            files["base"], adapter, motion_adapter=files["motion"], dtype=dtype, device=device
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, system: str, workload: str, args, latents: torch.Tensor | None = None, output_type: str = "pil"):
    import diffusers

    ref_sched, ours_sched, steps, guidance = WORKLOADS[workload]
    if system == "diffusers":
        pipe.scheduler = getattr(diffusers, ref_sched).from_config(pipe.scheduler.config)
    else:
        pipe.scheduler = ipa_rt.runtime.schedulers.make_scheduler(ours_sched, pipe.base.scheduler)
    image = T.make_image(0, (384, 384))
    with torch.inference_mode():
        return pipe(
            "a corgi running on the beach",
            ip_adapter_image=image if system == "diffusers" else [image],
            num_frames=args.frames,
            num_inference_steps=args.steps or steps,
            guidance_scale=guidance,
            height=args.size,
            width=args.size,
            latents=latents,
            output_type=output_type,
            generator=torch.Generator().manual_seed(0),
        ).frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ipa_rt bench --profile video", description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--size", type=int, default=512 if cuda else 128)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="override every workload's step count")
    parser.add_argument("--tiny", action="store_true", help="tiny models: checks the harness")
    parser.add_argument("--work", type=Path, default=None, help="models folder (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"ipa_rt-video-bench-{os.getpid()}"
    folder = work / ("tiny" if args.tiny else "full") / "base"
    if not (folder / "reference.png").exists():
        write_models(folder, "sd15", full=not args.tiny)
    files = {
        "base": folder / "model-sd15",
        "adapter": next((folder / "IP-Adapter" / "models").glob("*.safetensors")),
        "motion": folder / "motion",
    }
    if not (files["motion"] / "config.json").exists():
        T.write_motion_adapter(files["motion"], files["base"], heads=2 if args.tiny else 8)
    timer = device_timer(torch.device(device))
    rows, errors, oracle, latents = [], {}, {}, None
    for system in ("diffusers", "ipa_rt"):
        pipe = load(system, files, dtype, device)
        if latents is None:  # the same initial latents for both systems
            h = args.size // pipe.vae_scale_factor
            shape = (1, 4, args.frames, h, h)
            latents = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
        name = f"{'diffusers' if system == 'diffusers' else 'ipa_rt torch'} {str(dtype).removeprefix('torch.')}"
        for workload in WORKLOADS:
            out = run(pipe, system, workload, args, latents, "latent").float()  # warm-up, and the error check
            oracle.setdefault(workload, out)
            errors[f"{name} / {workload}"] = rel_l2(out, oracle[workload])
            samples = [timer(lambda p=pipe, s=system, w=workload: run(p, s, w, args)) for _ in range(args.reps)]
            family = f"sd15 {args.frames} frames {args.size}²"
            row = {"family": family, "size": args.size, "system": name, "workload": workload, **stats(samples)}
            rows.append(row | {"latent_rel_l2": errors[f"{name} / {workload}"]})
            print(
                f"{name:22s} {workload:32s} {rows[-1]['median_ms']:10.1f} ms  rel. L2 {rows[-1]['latent_rel_l2']:.1e}"
            )
        del pipe

    def median(workload: str, system: str) -> float:
        return next(r["median_ms"] for r in rows if r["workload"] == workload and r["system"].startswith(system))

    speedups = {w: median(w, "diffusers") / median(w, "ipa_rt") for w in WORKLOADS}
    result = {
        "environment": environment(torch.device(device)),
        "profile": "video",
        "date": dt.date.today().isoformat(),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "tiny": args.tiny,
        "frames": args.frames,
        "rows": rows,
        "errors": errors,
        "speedup_vs_diffusers": speedups,
    }
    env = result["environment"]
    hw = env.get("gpu") or f"CPU ({env.get('cpu')}, {result['threads']} threads)"
    md = [f"# ipa_rt bench — profile video on {hw}", ""]
    md.append(f"commit `{env['commit']}`, command `{env['command']}`; random weights, one process.\n")
    md += [*rows_table(rows), "", *(f"- {w}: ipa_rt {s:.2f}x diffusers" for w, s in speedups.items())]
    prefix = "tiny" if args.tiny else dt.date.today().isoformat()
    hardware = env["gpu"].lower().replace(" ", "-") if env.get("gpu") else "cpu"
    write_results(args.out, f"{prefix}-video", result, "\n".join(md) + "\n", hardware=hardware)
    return 0


if __name__ == "__main__":
    sys.exit(main())
