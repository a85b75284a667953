"""Runtime benchmark: eager loop vs CUDA-graph loop, per step and end to end, and the cost of live controls.

Full-size SD1.5 architecture (UNet, VAE, CLIP-L text encoder, ViT-H image encoder, a base IP-Adapter) with
seeded random weights — speed does not depend on weight values — written in the real diffusers / h94
formats and loaded through ``ipa_rt.Pipeline.from_pretrained`` like a user's files. Workloads at 512²,
fp16, batch 1: LCM 4 steps (no CFG) and DPM++ 2M 30 steps with CFG. For each: ms per step and end to end
(PIL reference in, latents out), eager and graphed; then the cost of a scale change, a step-range change
and a new reference image, with the number of graph captures they caused (must stay 0).

    python benchmarks/runtime.py                      # CUDA: writes results/runtime-graphs-<gpu>.{json,md}
    python benchmarks/runtime.py --smoke --out /tmp   # CPU: tiny model, checks the script
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import device_timer, environment, write_results
from models import write_models

import ipa_rt
from ipa_rt import testing as T


def measure(pipe, image, steps: int, guidance: float, graphs: bool, size: int, reps: int, timer) -> dict:
    pipe.loop.use_graphs = graphs
    pipe.loop.states.clear()
    for g in pipe.graphed_calls():  # the eager rows run the VAE and the encoder eagerly too
        g.clear()
        g.enabled = None if graphs else False
    pipe.clear_caches()
    call = dict(ip_adapter_image=image, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size)
    pipe("warm-up", output_type="latent", **call)  # capture / autotune / allocate, excluded
    (state,) = [s for s in pipe.loop.states.values() if s.steps == steps]
    # every timed region in inference mode: nothing records autograd history or bumps version counters
    with torch.inference_mode():
        # the same reference and prompt each call: the image side and the text come from the caches (the repeated-
        # request case a live app sees); the first-call cost is benchmarks/cpu.py's and the harness's subject
        total = [timer(lambda: pipe("a photo", output_type="latent", **call)) for _ in range(reps)]
        per_step = []  # the loop alone, from its static buffers
        for _ in range(reps):
            state.idx.zero_()  # rewind the step counter: the timed steps replay the last request
            if graphs and state.graph is not None:
                per_step.append(timer(lambda: [state.graph.replay() for _ in range(steps)]) / steps)
            else:
                per_step.append(timer(lambda: [pipe.loop._step(state) for _ in range(steps)]) / steps)
    return {
        "end_to_end_ms": 1000 * statistics.median(total),
        "end_to_end_p90_ms": 1000 * sorted(total)[int(0.9 * (len(total) - 1))],
        "per_step_ms": 1000 * statistics.median(per_step),
        "captures": pipe.loop.captures,
        "graph": state.graph is not None,
        "memory": pipe.memory_stats(),
    }


def control_costs(pipe, image, images, size: int, timer) -> dict:
    """Time of each live control plus the next call, and whether any of them recaptured."""
    call = dict(num_inference_steps=4, guidance_scale=1.0, height=size, width=size, output_type="latent")
    pipe("warm-up", ip_adapter_image=image, **call)
    before = pipe.loop.captures
    with torch.inference_mode():
        out = {
            "set_scale_ms": 1000 * timer(lambda: pipe.set_ip_adapter_scale(0.7)),
            "set_scale_dict_ms": 1000 * timer(lambda: pipe.set_ip_adapter_scale("style")),
            "set_step_range_ms": 1000 * timer(lambda: pipe.set_ip_adapter_step_range((0.25, 1.0))),
            "call_after_controls_ms": 1000 * timer(lambda: pipe("a photo", ip_adapter_image=image, **call)),
            "call_new_reference_ms": 1000 * timer(lambda: pipe("a photo", ip_adapter_image=images[1], **call)),
            "call_same_reference_ms": 1000 * timer(lambda: pipe("a photo", ip_adapter_image=images[1], **call)),
        }
    out["recaptures"] = pipe.loop.captures - before
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# Runtime: eager vs CUDA graphs ({env.get('gpu') or 'CPU smoke run'})",
        "",
        f"torch {env['torch']}, diffusers {env['diffusers']}, CUDA {env.get('cuda')}, driver {env.get('driver')}, "
        f"commit `{env['commit']}`, command `{env['command']}`; model: {result['model']}, {result['size']}², fp16, "
        "batch 1, random weights.",
        "",
        "| workload | loop | ms / step | end to end ms (median) | p90 ms | graph captures |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['workload']} | {row['loop']} | {row['per_step_ms']:.2f} | {row['end_to_end_ms']:.1f} | "
            f"{row['end_to_end_p90_ms']:.1f} | {row['captures']} |"
        )
    c = result["controls"]
    lines += [
        "",
        "| live control | ms |",
        "|---|---|",
        *(f"| {k} | {v:.3f} |" for k, v in c.items() if k != "recaptures"),
        f"| recaptures caused by the controls | {c['recaptures']} |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("no CUDA device: this benchmark needs a GPU (use --smoke on the CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    size = 32 if args.smoke else 512
    timer = device_timer(device)
    with tempfile.TemporaryDirectory(prefix="ipa_rt-bench-") as tmp:
        files = write_models(Path(tmp), "sd15", full=not args.smoke)
        pipe = ipa_rt.Pipeline.from_pretrained(
            files["base"], ip_adapter=files["adapter"], device=device, dtype=dtype, scheduler="lcm"
        )
        pipe.set_progress_bar_config(disable=True)
        image = T.make_image(0, (256, 256))
        images = [image, T.make_image(1, (256, 256))]
        rows = []
        for workload, scheduler, steps, guidance in (
            ("LCM 4 steps", "lcm", 4, 1.0),
            ("DPM++ 2M 30 steps CFG", "dpm++2m", 30, 7.5),
        ):
            pipe.scheduler = ipa_rt.runtime.schedulers.make_scheduler(scheduler, pipe.base.scheduler)
            for graphs in (False, True) if cuda else (False,):
                r = measure(pipe, image, steps, guidance, graphs, size, args.reps, timer)
                rows.append({"workload": workload, "loop": "graph" if graphs else "eager", **r})
                print(rows[-1], flush=True)
        pipe.scheduler = ipa_rt.runtime.schedulers.make_scheduler("lcm", pipe.base.scheduler)
        pipe.loop.use_graphs = None
        controls = control_costs(pipe, image, images, size, timer)
    result = {
        "environment": environment(device),
        "model": "tiny fixture" if args.smoke else "SD1.5 architecture + IP-Adapter (ViT-H), random weights",
        "size": size,
        "rows": rows,
        "controls": controls,
    }
    write_results(args.out, "runtime-graphs", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
