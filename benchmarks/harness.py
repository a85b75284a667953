"""``ipa_rt bench``: diffusers vs every ipa_rt backend present, same weights, same device, one process.

Systems (those that exist on the machine): ``diffusers`` (eager, its own IP-Adapter processors, SDPA),
``diffusers+compile`` (``torch.compile`` on the UNet, CUDA), ``ipa_rt`` (SDPA, eager loop), ``ipa_rt+triton``
(fused kernel, CUDA), ``ipa_rt+graphs`` (fused kernel + CUDA-graph loop, CUDA). All share one set of modules
loaded from the same files (``ipa_rt.from_diffusers``), so the weights are identical by construction; every
system's output is compared with diffusers' and the error is reported next to the speed.

Workloads: one UNet step at batch 1 and 2 (CFG) — for ``ipa_rt+graphs`` one replay of the captured step (UNet,
guidance and scheduler update: a superset of the UNet call); LCM 4 steps end to end, PIL reference in, PIL image out
(image encode, text encode, 4 steps, VAE decode); 30 steps with CFG (GPU profile; SD1.5 and SDXL); the cost of
changing the image prompt and of changing the scale; SD1.5 + IP-Adapter + one ControlNet, LCM 4 steps and 30
steps CFG (``--controlnet``, on by default for the GPU profile). Warm-up excluded, device-synchronised timing, median
and p90, peak memory; load / compile time reported separately.

    ipa_rt bench --profile cpu-basic   # SD1.5 architecture at 256², LCM 4 steps, batch 1 (~10 min on 2 cores)
    ipa_rt bench --profile gpu      # SD1.5 512² and SDXL 1024², fp16
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import math
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import device_timer, environment, pipeline_dtype, rows_table, write_results
from models import write_models

import ipa_rt
from ipa_rt import testing as T

PROFILES = {
    "cpu-basic": {"families": ["sd15"], "size": {"sd15": 256}, "dtype": "fp32", "reps": 5, "cfg_steps": None},
    "gpu": {
        "families": ["sd15", "sdxl"],
        "size": {"sd15": 512, "sdxl": 1024},
        "dtype": "fp16",
        "reps": 10,
        "cfg_steps": 30,
    },
}
TARGETS = {  # from the issue: benchmark figures, never timed tests
    "cpu-basic": {"lcm4_end_to_end_speedup_vs_diffusers": 1.5},
    "gpu": {
        "sd15_cfg_step_ms": 4.0,
        "sd15_lcm4_end_to_end_ms": 15.0,
        "unet_step_speedup_vs_diffusers": 3.0,
        "sdxl_cfg_step_ms": 25.0,
    },
}


def stats(samples: list[float]) -> dict:
    s = sorted(samples)
    p90 = s[min(len(s) - 1, math.ceil(0.9 * len(s)) - 1)]  # nearest-rank percentile
    return {"median_ms": 1000 * statistics.median(s), "p90_ms": 1000 * p90, "n": len(s)}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process-wide peak


class Bench:
    """One family's pipelines and the systems that can run on this device."""

    def __init__(
        self,
        family: str,
        files: dict,
        device: torch.device,
        dtype: torch.dtype,
        size: int,
        only: list[str] | None = None,
    ) -> None:
        import diffusers

        cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
        t0 = time.perf_counter()
        self.diffusers = cls.from_pretrained(files["base"], **pipeline_dtype(dtype)).to(device)
        adapter = Path(files["adapter"])
        self.diffusers.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name)
        self.diffusers.set_progress_bar_config(disable=True)
        self.load_s = time.perf_counter() - t0
        self.image = T.make_image(0, (384, 384))
        self.other = T.make_image(1, (384, 384))
        with torch.no_grad():  # encoder outputs for the UNet-step workload, [uncond, cond] for the CFG batch
            self.embeds = {
                b: self.diffusers.prepare_ip_adapter_image_embeds([self.image], None, device, 1, b == 2) for b in (1, 2)
            }
        self.ours = ipa_rt.from_diffusers(self.diffusers, attention="sdpa")
        self.ours.set_progress_bar_config(disable=True)
        self.family, self.device, self.dtype, self.size = family, device, dtype, size
        self.compile_s: float | None = None
        self.only = only  # run only these systems (the GPU kit skips diffusers+compile: minutes of autotuning)

    # which implementation owns the shared UNet's processors
    def use(self, system: str) -> None:
        stack = self.ours.adapters
        if system.startswith("diffusers"):
            stack.restore(self.ours.unet)
        else:
            stack.install(self.ours.unet)
            fused = system in ("ipa_rt+triton", "ipa_rt+graphs")
            stack.set_attention([fused] * len(stack.layer_names))
            graphs = system == "ipa_rt+graphs"
            self.ours.loop.use_graphs = graphs
            self.ours.loop.states.clear()
            for g in self.ours.graphed_calls():  # the eager systems run the VAE and the encoder eagerly too
                g.clear()
                g.enabled = None if graphs else False

    def systems(self) -> list[str]:
        out = ["diffusers", "ipa_rt"]
        if self.device.type == "cuda":
            out += ["diffusers+compile", "ipa_rt+triton", "ipa_rt+graphs"]
        return out if self.only is None else [s for s in out if s in self.only]

    def call(self, system: str, steps: int, guidance: float, image=None, output_type="pil"):
        kw = dict(
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=self.size,
            width=self.size,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type=output_type,
            ip_adapter_image=image or self.image,
        )
        pipe = self.diffusers if system.startswith("diffusers") else self.ours
        return pipe("a photo of a cat", **kw).images

    def unet_step(self, system: str, batch: int):
        """One UNet forward at ``batch`` (2 = the CFG batch) with the adapter active, conditions prepared."""
        pipe = self.diffusers
        h = self.size // 8
        lat = torch.randn(batch, 4, h, h, device=self.device, dtype=self.dtype)
        text = torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, device=self.device, dtype=self.dtype)
        t = torch.tensor(500, device=self.device)
        added = {}
        if self.family == "sdxl":
            added = {
                "text_embeds": torch.randn(
                    batch, pipe.text_encoder_2.config.projection_dim, device=self.device, dtype=self.dtype
                ),
                "time_ids": torch.ones(batch, 6, device=self.device, dtype=self.dtype),
            }
        embeds = self.embeds[batch]
        if system.startswith("diffusers"):
            added = {**added, "image_embeds": embeds}
            return lambda: pipe.unet(lat, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
        if system == "ipa_rt+graphs":
            return self.graphed_step(batch)
        stack = self.ours.adapters
        stack.prepare(stack.project([e.to(self.dtype) for e in embeds], [None]))
        return lambda: self.ours.unet(lat, t, encoder_hidden_states=text, added_cond_kwargs=added).sample

    def graphed_step(self, batch: int):
        """One replay of the captured step (UNet on ``batch`` rows, guidance, scheduler update): what the graphed
        system runs per step. The step counter is rewound before each replay so the timed replays repeat step 0."""
        lcm = ipa_rt.runtime.schedulers.make_scheduler("lcm", self.diffusers.scheduler)
        self.ours.scheduler = copy.deepcopy(lcm)
        self.call("ipa_rt+graphs", 4, 7.5 if batch == 2 else 1.0, output_type="latent")  # captures
        state = next(reversed(self.ours.loop.states.values()))
        assert state.graph is not None and state.sig.cfg == (batch == 2), "the step was not captured"

        def replay():
            state.idx.zero_()
            state.graph.replay()

        return replay


def run_family(bench: Bench, profile: dict, timer, reps: int) -> list[dict]:
    rows = []
    lcm = ipa_rt.runtime.schedulers.make_scheduler("lcm", bench.diffusers.scheduler)
    for system in bench.systems():
        bench.use(system)
        if system == "diffusers+compile":
            t0 = time.perf_counter()
            bench.diffusers.unet = torch.compile(bench.diffusers.unet, mode="max-autotune-no-cudagraphs")
            bench.call(system, 2, 1.0)
            bench.compile_s = time.perf_counter() - t0
        for batch in (1, 2):
            fn = bench.unet_step(system, batch)
            with torch.no_grad():
                fn()
                rows.append(
                    {"system": system, "workload": f"unet step b{batch}", **stats([timer(fn) for _ in range(reps)])}
                )
        bench.diffusers.scheduler = copy.deepcopy(lcm)
        bench.ours.scheduler = copy.deepcopy(lcm)
        bench.call(system, 4, 1.0)  # warm-up
        samples = []
        for _ in range(reps):
            bench.ours.clear_caches()  # a fresh reference and prompt every call: the full image and text cost
            samples.append(timer(lambda s=system: bench.call(s, 4, 1.0)))
        rows.append({"system": system, "workload": "LCM 4 steps end to end", **stats(samples)})
        if profile["cfg_steps"]:
            dpm = ipa_rt.runtime.schedulers.make_scheduler("dpm++2m", bench.diffusers.scheduler)
            bench.diffusers.scheduler, bench.ours.scheduler = copy.deepcopy(dpm), copy.deepcopy(dpm)
            bench.call(system, profile["cfg_steps"], 7.5)
            samples = [
                timer(lambda s=system: bench.call(s, profile["cfg_steps"], 7.5)) for _ in range(max(2, reps // 3))
            ]
            rows.append(
                {"system": system, "workload": f"{profile['cfg_steps']} steps CFG end to end", **stats(samples)}
            )
        # live controls: a new image prompt (encode + projection + image K/V) and a scale change
        if system.startswith("diffusers"):
            new_image = lambda: bench.diffusers.prepare_ip_adapter_image_embeds(  # noqa: E731
                [bench.other], None, bench.device, 1, True
            )
            new_scale = lambda: bench.diffusers.set_ip_adapter_scale(0.7)  # noqa: E731
        else:

            def new_image():
                bench.ours.clear_caches()
                c = bench.ours.conditioner(bench.other, None, None, "concat", 1, True)
                bench.ours.adapters.prepare(bench.ours.adapters.project(c[0], c[1]))

            new_scale = lambda: bench.ours.set_ip_adapter_scale(0.7)  # noqa: E731
        with torch.no_grad():
            rows.append(
                {"system": system, "workload": "change image prompt", **stats([timer(new_image) for _ in range(reps)])}
            )
        rows.append({"system": system, "workload": "change scale", **stats([timer(new_scale) for _ in range(reps)])})
        if system == "diffusers+compile":
            bench.diffusers.unet = bench.diffusers.unet._orig_mod  # back to the shared eager module
        for r in rows:
            r.setdefault("family", bench.family)
    return rows


def errors_vs_diffusers(bench: Bench) -> dict[str, float]:
    """Each system's LCM-4 output latents against diffusers' (same seed, same weights)."""
    lcm = ipa_rt.runtime.schedulers.make_scheduler("lcm", bench.diffusers.scheduler)
    outs = {}
    for system in bench.systems():
        if system == "diffusers+compile":
            continue
        bench.use(system)
        bench.diffusers.scheduler, bench.ours.scheduler = copy.deepcopy(lcm), copy.deepcopy(lcm)
        outs[system] = bench.call(system, 4, 1.0, output_type="latent").float()
    ref = outs["diffusers"]
    return {s: ((o - ref).norm() / ref.norm()).item() for s, o in outs.items() if s != "diffusers"}


def run_controlnet(files: dict, device, dtype, size: int, profile: dict, timer, reps: int) -> tuple[list, dict]:
    """SD1.5 + IP-Adapter + one ControlNet (random, from the base UNet's config): LCM 4 steps and (GPU) 30 steps
    CFG end to end, diffusers' ControlNet pipeline against ipa_rt on the same files; plus the output error."""
    import diffusers

    net_dir = T.write_controlnet(Path(files["base"]).parent / "controlnet", files["base"])
    ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        files["base"],
        controlnet=diffusers.ControlNetModel.from_pretrained(net_dir, torch_dtype=dtype),
        **pipeline_dtype(dtype),
    ).to(device)
    adapter = Path(files["adapter"])
    ref.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name)
    ours = ipa_rt.Pipeline.from_pretrained(files["base"], adapter, controlnet=net_dir, device=device, dtype=dtype)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    image, control = T.make_image(0, (384, 384)), T.make_image(5, (size, size))
    systems = {"diffusers": ref, "ipa_rt" + ("+graphs" if device.type == "cuda" else ""): ours}

    def call(pipe, steps, guidance, output_type="pil"):
        kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, output_type=output_type)
        kw["generator"] = torch.Generator("cpu").manual_seed(0)
        return pipe("a photo of a house", image=control, ip_adapter_image=image, **kw).images

    workloads = [("LCM 4 steps end to end", "lcm", 4, 1.0)]
    if profile["cfg_steps"]:
        workloads.append((f"{profile['cfg_steps']} steps CFG end to end", "dpm++2m", profile["cfg_steps"], 7.5))
    rows, outs = [], {}
    for workload, scheduler, steps, guidance in workloads:
        for system, pipe in systems.items():
            pipe.scheduler = ipa_rt.runtime.schedulers.make_scheduler(scheduler, ref.scheduler)
            call(pipe, steps, guidance)  # warm-up (and graph capture)
            samples = [timer(lambda p=pipe, n=steps, g=guidance: call(p, n, g)) for _ in range(reps)]
            rows.append({"system": system, "workload": workload, "family": "sd15+controlnet", **stats(samples)})
            if scheduler == "lcm":
                outs[system] = call(pipe, steps, guidance, "latent").float()
    err = {
        f"sd15+controlnet {s}": ((o - outs["diffusers"]).norm() / outs["diffusers"].norm()).item()
        for s, o in outs.items()
        if s != "diffusers"
    }
    return rows, err


def summary(rows: list[dict], profile: str) -> dict:
    def med(system, workload, family="sd15"):
        return next(
            (
                r["median_ms"]
                for r in rows
                if r["system"] == system and r["workload"] == workload and r["family"] == family
            ),
            None,
        )

    best = "ipa_rt+graphs" if profile == "gpu" else "ipa_rt"
    e2e_d, e2e_o = med("diffusers", "LCM 4 steps end to end"), med(best, "LCM 4 steps end to end")
    step_d, step_o = med("diffusers", "unet step b2"), med(best, "unet step b2")
    out = {
        "best_ipa_rt_system": best,
        "lcm4_end_to_end_speedup_vs_diffusers": e2e_d / e2e_o if e2e_d and e2e_o else None,
        "unet_step_speedup_vs_diffusers": step_d / step_o if step_d and step_o else None,
        "sd15_cfg_step_ms": step_o,
        "sd15_lcm4_end_to_end_ms": e2e_o,
        "sdxl_cfg_step_ms": med(best, "unet step b2", "sdxl"),
    }
    gaps = {}
    for key, target in TARGETS[profile].items():
        have = out.get(key)
        if have is None:
            continue
        ok = have >= target if "speedup" in key else have <= target
        gaps[key] = {
            "target": target,
            "measured": have,
            "met": ok,
            "short_by": None if ok else (target / have if "speedup" in key else have / target),
        }
    out["targets"] = gaps
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    hw = env.get("gpu") or f"CPU ({env.get('cpu')}, {result['threads']} threads)"
    lines = [
        f"# ipa_rt bench — profile {result['profile']} on {hw}",
        "",
        f"torch {env['torch']}, diffusers {env['diffusers']}, commit `{env['commit']}`, command "
        f"`{env['command']}`; {result['dtype']}, random weights of the full-size architectures.",
        "",
        *rows_table(result["rows"]),
    ]
    lines += ["", "| system | rel. L2 error of final latents vs diffusers |", "|---|---|"]
    lines += [f"| {k} | {v:.2e} |" for k, v in result["errors"].items()]
    lines += ["", "| target | wanted | measured | met | short by |", "|---|---|---|---|---|"]
    for k, g in result["summary"]["targets"].items():
        short = f"{g['short_by']:.2f}x" if g["short_by"] else "—"
        lines.append(f"| {k} | {g['target']} | {g['measured']:.2f} | {'yes' if g['met'] else 'no'} | {short} |")
    lines += [
        "",
        f"Load time {result['load_s']}, compile time {result['compile_s']}, peak memory "
        f"{result['peak_memory_mb']:.0f} MiB ({'GPU' if env.get('gpu') else 'process RSS'}).",
    ]
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    """A PNG bar chart of median end-to-end and step times per system (drawn with PIL, no plotting stack)."""
    from PIL import Image, ImageDraw

    rows = [r for r in result["rows"] if "end to end" in r["workload"] or "unet step" in r["workload"]]
    width, bar_h, pad = 900, 18, 8
    img = Image.new("RGB", (width, 40 + len(rows) * (bar_h + pad)), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), f"ipa_rt bench ({result['profile']}): median ms, shorter is faster", fill="black")
    top = max(r["median_ms"] for r in rows)
    for i, r in enumerate(rows):
        y = 40 + i * (bar_h + pad)
        label = f"{r['family']} {r['workload']} / {r['system']}"
        d.text((10, y + 3), label[:52], fill="black")
        length = int((width - 460) * r["median_ms"] / top)  # room for the value label
        color = (40, 110, 200) if r["system"].startswith("ipa_rt") else (200, 120, 40)
        d.rectangle([380, y, 380 + max(length, 1), y + bar_h], fill=color)
        d.text((385 + length, y + 3), f"{r['median_ms']:.1f}", fill="black")
    img.save(path)


def model_family(folder: Path) -> str:
    """``sd15`` or ``sdxl`` for a diffusers folder, by ipa_rt's own detection table."""
    import json

    from ipa_rt.models import detect_family

    index = json.loads((folder / "model_index.json").read_text())
    unet = json.loads((folder / "unet" / "config.json").read_text())
    return detect_family(index, unet, str(folder)).name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ipa_rt bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu-basic")
    parser.add_argument("--reps", type=int, default=None, help="timed repeats per workload (default: profile's)")
    parser.add_argument("--size", type=int, default=None, help="override the image size (pixels)")
    parser.add_argument("--tiny", action="store_true", help="tiny models instead of full-size (checks the harness)")
    parser.add_argument("--model", type=Path, default=None, help="a real diffusers base model folder to use")
    parser.add_argument("--ip-adapter", type=Path, default=None, help="with --model: its IP-Adapter file")
    parser.add_argument(
        "--controlnet",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also SD1.5 + IP-Adapter + one ControlNet (default: on for --profile gpu)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.profile == "gpu" and not torch.cuda.is_available():
        parser.error("--profile gpu needs a CUDA device")
    device = torch.device("cuda" if args.profile == "gpu" else "cpu")
    dtype = torch.float16 if profile["dtype"] == "fp16" else torch.float32
    reps = args.reps or profile["reps"]
    timer = device_timer(device)
    rows, errors, load_s, compile_s = [], {}, {}, {}
    if args.model is not None and args.ip_adapter is None:
        parser.error("--model needs --ip-adapter (the adapter file; image_encoder/ beside it)")
    families = [model_family(args.model)] if args.model is not None else profile["families"]
    for family in families:
        size = args.size or (32 if args.tiny else profile["size"][family])
        with tempfile.TemporaryDirectory(prefix="ipa_rt-bench-") as tmp:
            if args.model is not None:  # the user's real weights instead of random ones
                files = {"base": args.model, "adapter": args.ip_adapter}
            else:
                files = write_models(Path(tmp), family, full=not args.tiny)
            bench = Bench(family, files, device, dtype, size)
            rows += run_family(bench, profile, timer, reps)
            errors |= {f"{family} {k}": v for k, v in errors_vs_diffusers(bench).items()}
            load_s[family], compile_s[family] = round(bench.load_s, 1), bench.compile_s
            del bench
            with_control = args.controlnet if args.controlnet is not None else args.profile == "gpu"
            if with_control and family == "sd15":
                extra, err = run_controlnet(files, device, dtype, size, profile, timer, reps)
                rows, errors = rows + extra, errors | err
    result = {
        "environment": environment(device),
        "profile": args.profile,
        "date": dt.date.today().isoformat(),
        "dtype": profile["dtype"],
        "threads": torch.get_num_threads(),
        "tiny": args.tiny,
        "model": str(args.model) if args.model else "random weights, full-size architectures from benchmarks/configs",
        "rows": rows,
        "errors": errors,
        "summary": summary(rows, args.profile),
        "load_s": load_s,
        "compile_s": compile_s,
        "peak_memory_mb": peak_memory_mb(device),
    }
    hw = "cpu" if device.type == "cpu" else result["environment"]["gpu"].lower().replace(" ", "-")
    prefix = result["date"] if not args.tiny else "tiny"
    write_results(args.out, prefix, result, markdown(result), hardware=hw)
    chart(result, args.out / f"{prefix}-{hw}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
