"""Model families served inside diffusers' own pipelines (Flux.1, Kolors, Stable Diffusion 3.5; ``ipa_rt bench
--profile families --family F``): diffusers against ipa_rt on PyTorch and on OpenVINO engines, same weights.

Random weights in the real on-disk formats (``ipa_rt.testing``'s writers), diffusers' own pipeline with its own
adapter loader beside ipa_rt's, on the same files, in one process. None of the three families' full-size models
fits the 24 GB CPU machines this project benchmarks on together with its engine builds, so each row keeps its
family's **full width** at **reduced depth**, and the networks that run once per request, not per step (text and
image encoders, VAE), are reduced or tiny where said: per-block costs are the real model's, the totals are not; each
row's label says what was reduced. The workload is an end-to-end call (PIL reference in, latents out) of ``--steps``
steps, text length ``--text``; every ipa_rt row carries its latents' relative L2 error against diffusers fp32.

**Flux.1** (``--family flux``, the default): FLUX.1 (12B parameters, 48 GB in fp32) at its full width (24 heads x
128, joint width 4096, XLabs' 4-token adapter on 4096-wide T5 states, CLIP ViT-L/14 image encoder) with ``--double``
/ ``--single`` blocks instead of 19 / 38, tiny text encoders and VAE. The tiny VAE downsamples 2x (FLUX.1's: 8x), so
``--size 256`` gives 128² latents = 4096 image tokens, FLUX.1's token count at 1024²; rows are labelled by token
count. No CFG (FLUX.1-dev is guidance-distilled): one transformer evaluation per step.

**Kolors** (``--family kolors``): diffusers' ``KolorsPipeline`` with Kolors-IP-Adapter-Plus (h94's Resampler, 1280 wide,
16 tokens) on CLIP ViT-L/14-336 features. The UNet is SDXL's (320/640/1280 wide, cross-attention 2048, Kolors'
``text_proj`` from 4096-wide ChatGLM states) with ``--layers`` transformer blocks per level (default 1/2/1) instead of
SDXL's 1/2/10: the full UNet's engine (2.9B parameters with the adapter's keys/values, 11.7 GB in fp32) does not fit its
build, which holds the ONNX and OpenVINO files on disk together and the PyTorch pipeline beside the graph in memory
(1/2/1's 3.0 GB engine: 5 GB of disk, 14 GiB of memory at peak). ChatGLM3-6B (24 GB in fp32; one call per request) runs
at its full width (4096, 32 heads, 2 KV groups, FFN 13696) with ``--glm-layers`` of its 28 layers and a tiny tokenizer
vocabulary; SDXL's VAE (not run: latents out), so ``--size 512`` gives 64² latents (4096 positions at the UNet's first
level); 256 ChatGLM tokens (diffusers' ``KolorsPipeline`` pads prompts to 256 whatever ``--text`` says). CFG at Kolors'
guidance 5: two UNet evaluations per step. The UNet's and ChatGLM's weights are stored in fp16, as Kolors-diffusers
ships them, and loaded in fp32.

**Stable Diffusion 3.5** (``--family sd3``): diffusers' ``StableDiffusion3Pipeline`` with InstantX's SD3.5-Large
IP-Adapter (a timestep-conditioned TimeResampler, 1280 wide, 64 tokens, attended in every joint block) on SigLIP so400m
(1152 wide, 27 layers, 729 tokens). The transformer is SD3.5-Large's width (38 heads x 64 = 2432, joint width 4096, q/k
RMS norms, 192² position table) with ``--blocks`` of its 38 joint blocks (the last one context-pre-only, as in the real
model; all 38: 8B parameters, 32 GB in fp32); tiny CLIP and T5 text encoders (T5 at its 4096 width) and a tiny VAE with
SD3.5's 16 latent channels that downsamples 2x (SD3.5's: 8x), so ``--size 256`` gives 128² latents = 4096 image tokens
in 2x2 patches, SD3.5's count at 1024² (the default, 224, gives 3136, 896²'s: with 3 blocks, the run stays near 20
minutes on 2 cores). CFG at guidance 7: two transformer evaluations per step. The transformer's weights are stored in
bf16, as SD3.5's are, and loaded in fp32.

    ipa_rt bench --profile families [--size 256] [--steps 2] [--reps 2] [--double 2] [--single 2] [--work DIR]
    ipa_rt bench --profile families --family kolors [--size 512] [--layers 1 2 1] [--glm-layers 2] [--drop-engines]
    ipa_rt bench --profile families --family sd3 [--size 224] [--blocks 3] [--drop-engines]
    ipa_rt bench --profile families [--family F] --tiny      # tiny models: checks the harness (the test suite runs it)
    ipa_rt bench --profile families --device cuda --double 19 --single 8   # the GPU kit's stage: bf16
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import resource
import shutil
import sys
from pathlib import Path

import torch
from common import device_timer, environment, not_available, rows_table, write_results
from cpu import rel_l2, stats
from families_models import FAMILIES, write_flux

import ipa_rt
from ipa_rt import testing as T

__all__ = ["FAMILIES", "main", "parse", "write_flux"]  # the GPU kit writes the models on the GPU first

SYSTEMS = ("diffusers fp32", "ipa_rt torch fp32", "ipa_rt openvino fp32", "ipa_rt openvino bf16")
GPU_SYSTEMS = ("diffusers bf16", "ipa_rt torch bf16")  # on CUDA: the same pipelines in bf16 (the fused kernel: auto)


def load(system: str, files: dict, size: int, text: int, device: str = "cpu", family: str = "flux"):
    """One system's pipeline on the same files (``device``: where the PyTorch systems run)."""
    dtype = torch.bfloat16 if system.endswith("bf16") and "openvino" not in system else torch.float32
    if system.startswith("diffusers"):
        return FAMILIES[family].diffusers(files, dtype, device)
    args = (files["base"], files["adapter"], files["encoder"])
    if system.startswith("ipa_rt torch"):
        return ipa_rt.Pipeline.from_pretrained(*args, dtype=dtype, device=device)
    precision = system.rsplit(" ", 1)[1]
    options = {"height": size, "width": size, "max_sequence_length": text, "precision": precision}
    return ipa_rt.Pipeline.from_pretrained(*args, backend="openvino", engine_options=options)


def _entries(root: Path) -> set[Path]:
    return set(root.rglob("*")) if root.is_dir() else set()


def drop_added(root: Path, before: set[Path]) -> None:
    """Remove what appeared under ``root`` since ``before`` (an engine folder, OpenVINO's compiled blobs)."""
    for path in _entries(root) - before:
        if path.parent == root or path.parent in before:  # the topmost new entries only
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the family's defaults filled in (the GPU kit reads it to write the models first)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=list(FAMILIES), default="flux")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the family's, see above)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--text", type=int, default=None, help="T5 tokens (max_sequence_length; Kolors: 256)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--double", type=int, default=2, help="flux: double-stream blocks (FLUX.1: 19)")
    parser.add_argument("--single", type=int, default=2, help="flux: single-stream blocks (FLUX.1: 38)")
    parser.add_argument("--layers", type=int, nargs=3, default=[1, 2, 1], help="kolors: transformer blocks per "
                        "UNet level (SDXL's transformer_layers_per_block: 1 2 10)")  # fmt: skip
    parser.add_argument("--glm-layers", type=int, default=2, help="kolors: ChatGLM3 layers (28)")
    parser.add_argument("--blocks", type=int, default=3, help="sd3: joint transformer blocks (SD3.5-Large: 38)")
    parser.add_argument("--systems", nargs="+", default=None, choices=SYSTEMS + GPU_SYSTEMS)
    parser.add_argument("--device", default="cpu", help="cuda: the PyTorch systems in bf16 (the GPU kit)")
    parser.add_argument("--tiny", action="store_true", help="tiny models: check the harness")
    parser.add_argument("--drop-engines", action="store_true", help="remove what each engine row added to the "
                        "engine cache once measured (the disk then holds one engine at a time)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ipa_rt-bench-families")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    fam = FAMILIES[args.family]
    args.size, args.text = args.size or fam.size, args.text or fam.text
    if args.tiny:
        args.size, args.text, args.steps, args.reps = 32, 32, 2, 1
    args.text = fam.text if fam.fixed_text else args.text
    args.systems = args.systems or list(GPU_SYSTEMS if args.device == "cuda" else SYSTEMS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    fam = FAMILIES[args.family]
    os.environ.setdefault("IPA_RT_CACHE", str(args.work / "cache"))
    cache = Path(os.environ["IPA_RT_CACHE"])
    files = fam.write(args.work, args)
    timer, image = device_timer(torch.device(args.device)), T.make_image(0, (320, 240))
    call = dict(height=args.size, width=args.size, num_inference_steps=args.steps, max_sequence_length=args.text,
                output_type="latent", ip_adapter_image=image, **fam.call)  # fmt: skip
    rows, oracle = [], None
    vae = json.loads((Path(files["base"]) / "vae" / "config.json").read_text())
    latent = args.size // 2 ** (len(vae["block_out_channels"]) - 1)
    label = fam.label(args, latent, (latent // 2) ** 2)  # Flux and SD3.5: 2x2 latent patches per token
    left_out = {s: why for s in args.systems if "openvino" in s and (why := not_available("openvino", s.split()[-1]))}
    for system, why in left_out.items():
        print(f"{system}: not available on this CPU ({why})", flush=True)
    for system in [s for s in args.systems if s not in left_out]:
        before = _entries(cache)
        pipe = load(system, files, args.size, args.text, args.device, args.family)
        pipe.set_progress_bar_config(disable=True)

        def run(pipe=pipe):
            return pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **call).images

        latents = run()  # warm-up: compiles, caches; its latents are the row's
        samples = [timer(run) for _ in range(args.reps)]
        row = {"family": label, "workload": f"{args.steps} steps end to end", "system": system, **stats(samples)}
        if oracle is None and system.startswith("diffusers"):
            oracle = latents
        if oracle is not None:
            row["latent_rel_l2"] = rel_l2(latents.float().cpu(), oracle.float().cpu())
        rows.append(row)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, the process so far
        print(f"{system:24s} {row['median_ms']:10.1f} ms  rel L2 {row.get('latent_rel_l2', float('nan')):.1e}  "
              f"peak RSS so far {peak:.1f} GiB", flush=True)  # fmt: skip
        del pipe, run  # run's default argument holds the pipeline (and an engine's open files) too
        gc.collect()
        if args.drop_engines and "openvino" in system:
            drop_added(cache, before)
    others = {k for f in FAMILIES.values() for k in f.knobs} - set(fam.knobs)  # other families' reductions
    config = {k: v for k, v in vars(args).items() if k not in ("work", "out", *others)}
    result = {"date": dt.date.today().isoformat(), "environment": environment(torch.device(args.device)),
              "profile": "families", "family": args.family, "threads": torch.get_num_threads(),
              "dtype": "bf16" if args.device == "cuda" else "fp32 (OpenVINO: fp32, bf16)",
              "command": "ipa_rt bench --profile families " + " ".join(argv if argv is not None else sys.argv[1:]),
              "config": config, "peak_rss_gib": round(peak, 2), "rows": rows,
              "not_available": left_out}  # fmt: skip
    title = f"# ipa_rt bench — families on CPU ({result['environment'].get('cpu', 'CPU')})"
    paragraphs = __doc__.split("\n\n")
    about = [paragraphs[1], *(p for p in paragraphs if p.startswith(fam.doc))]
    lines = [title, "", "\n\n".join(about), "", *rows_table(rows)]
    lines += [f"- {name}: not available on this CPU ({why})" for name, why in left_out.items()]
    hardware = "tiny" if args.tiny else None if args.device == "cuda" else "cpu"  # None: the GPU's name
    write_results(args.out, f"{result['date']}-{fam.results}", result, "\n".join(lines) + "\n", hardware)
    return 0


if __name__ == "__main__":
    sys.exit(main())
