"""Model families served inside diffusers' own pipelines (Flux.1; ``ipa_rt bench --profile families``): diffusers
against ipa_rt on PyTorch and on OpenVINO engines, same weights, one process.

Full-size FLUX.1 (12B parameters, 48 GB in fp32) does not fit the 24 GB CPU machines this project benchmarks on, so
the CPU row uses FLUX.1's **full width** (24 heads x 128, joint width 4096, XLabs' 4-token adapter on 4096-wide T5
states, CLIP ViT-L/14 image encoder) with **reduced depth** (``--double`` / ``--single`` blocks instead of 19 / 38)
and tiny text encoders and VAE (their cost is one call per request, not per step): per-block costs are FLUX.1's, the
total is not. The tiny VAE downsamples 2x (FLUX.1's: 8x), so ``--size 256`` gives 128² latents = 4096 image tokens,
FLUX.1's token count at 1024²; rows are labelled by token count. Random weights in the real on-disk formats. The
workload is an end-to-end call (PIL reference in, latents out) of ``--steps`` steps, text length ``--text``; every
ipa_rt row carries its latents' relative L2 error against diffusers fp32.

    ipa_rt bench --profile families [--size 256] [--steps 2] [--reps 2] [--double 2] [--single 2] [--work DIR]
    ipa_rt bench --profile families --tiny      # tiny models: checks the harness (the test suite runs it)
    ipa_rt bench --profile families --device cuda --double 19 --single 8   # the GPU kit's stage: bf16
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import torch
from common import device_timer, environment, rows_table, write_results
from cpu import rel_l2, stats

import ipa_rt
from ipa_rt import testing as T

SYSTEMS = ("diffusers fp32", "ipa_rt torch fp32", "ipa_rt openvino fp32", "ipa_rt openvino bf16")
GPU_SYSTEMS = ("diffusers bf16", "ipa_rt torch bf16")  # on CUDA: the same pipelines in bf16 (the fused kernel: auto)
VIT_L = dict(  # openai/clip-vit-large-patch14 (XLabs' Flux adapters read its 768-d projection)
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, projection_dim=768,
    image_size=224, patch_size=14,
)  # fmt: skip


def write_flux(root: Path, double: int, single: int, tiny: bool) -> dict:
    """A FLUX.1-width (or tiny) folder, XLabs adapter and image encoder; written once per configuration."""
    name = "tiny" if tiny else f"flux-w3072-d{double}-s{single}"
    folder = root / name
    files = {"base": folder / "base", "adapter": folder / "ip_adapter.safetensors", "encoder": folder / "encoder"}
    if (folder / "done").exists():
        return files
    if tiny:
        T.write_flux_model(files["base"])
        T.write_image_encoder(files["encoder"], **T.FLUX_ENCODER)
        T.write_flux_adapter(files["adapter"], files["base"])
    else:
        transformer = dict(num_layers=double, num_single_layers=single, attention_head_dim=128, num_attention_heads=24,
                           axes_dims_rope=[16, 56, 56])  # fmt: skip
        vae = dict(latent_channels=16)  # FLUX.1's latent width: the transformer reads 64 channels per token
        T.write_flux_model(files["base"], joint_attention_dim=4096, configs={"transformer": transformer, "vae": vae})
        T.write_image_encoder(files["encoder"], **VIT_L)
        T.write_flux_adapter(files["adapter"], files["base"], encoder_dim=768)
    (folder / "done").write_text("")
    return files


def load(system: str, files: dict, size: int, text: int, device: str = "cpu"):
    """One system's pipeline on the same files (``device``: where the PyTorch systems run)."""
    dtype = torch.bfloat16 if system.endswith("bf16") and "openvino" not in system else torch.float32
    if system.startswith("diffusers"):
        import diffusers

        pipe = diffusers.FluxPipeline.from_pretrained(str(files["base"]), dtype=dtype).to(device)
        adapter = Path(files["adapter"])
        pipe.load_ip_adapter(str(adapter.parent), weight_name=adapter.name,
                             image_encoder_pretrained_model_name_or_path=str(files["encoder"]),
                             image_encoder_dtype=dtype)  # fmt: skip
        return pipe
    args = (files["base"], files["adapter"], files["encoder"])
    if system.startswith("ipa_rt torch"):
        return ipa_rt.Pipeline.from_pretrained(*args, dtype=dtype, device=device)
    precision = system.rsplit(" ", 1)[1]
    options = {"height": size, "width": size, "max_sequence_length": text, "precision": precision}
    return ipa_rt.Pipeline.from_pretrained(*args, backend="openvino", engine_options=options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--text", type=int, default=128, help="T5 tokens (max_sequence_length)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks (FLUX.1: 19)")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks (FLUX.1: 38)")
    parser.add_argument("--systems", nargs="+", default=None, choices=SYSTEMS + GPU_SYSTEMS)
    parser.add_argument("--device", default="cpu", help="cuda: the PyTorch systems in bf16 (the GPU kit)")
    parser.add_argument("--tiny", action="store_true", help="tiny models: check the harness")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ipa_rt-bench-families")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.tiny:
        args.size, args.text, args.steps, args.reps = 32, 32, 2, 1
    args.systems = args.systems or list(GPU_SYSTEMS if args.device == "cuda" else SYSTEMS)
    os.environ.setdefault("IPA_RT_CACHE", str(args.work / "cache"))
    files = write_flux(args.work, args.double, args.single, args.tiny)
    timer, image = device_timer(torch.device(args.device)), T.make_image(0, (320, 240))
    call = dict(height=args.size, width=args.size, num_inference_steps=args.steps, max_sequence_length=args.text,
                output_type="latent", ip_adapter_image=image)  # fmt: skip
    rows, oracle = [], None
    vae = json.loads((Path(files["base"]) / "vae" / "config.json").read_text())
    tokens = (args.size // 2 ** len(vae["block_out_channels"])) ** 2  # VAE downsampling, then 2x2 packing
    shape = f"{tokens} image + {args.text} text tokens"
    family = f"flux tiny, {shape}" if args.tiny else f"FLUX.1 width, {args.double}+{args.single} blocks, {shape}"
    for system in args.systems:
        pipe = load(system, files, args.size, args.text, args.device)
        pipe.set_progress_bar_config(disable=True)

        def run(pipe=pipe):
            return pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **call).images

        latents = run()  # warm-up: compiles, caches; its latents are the row's
        samples = [timer(run) for _ in range(args.reps)]
        row = {"family": family, "workload": f"{args.steps} steps end to end", "system": system, **stats(samples)}
        if oracle is None and system.startswith("diffusers"):
            oracle = latents
        if oracle is not None:
            row["latent_rel_l2"] = rel_l2(latents.float().cpu(), oracle.float().cpu())
        rows.append(row)
        print(f"{system:24s} {row['median_ms']:10.1f} ms  rel L2 {row.get('latent_rel_l2', float('nan')):.1e}")
        del pipe
    result = {"date": dt.date.today().isoformat(), "environment": environment(torch.device(args.device)),
              "profile": "families", "threads": torch.get_num_threads(),
              "dtype": "bf16" if args.device == "cuda" else "fp32 (OpenVINO: fp32, bf16)",
              "command": "ipa_rt bench --profile families " + " ".join(argv if argv is not None else sys.argv[1:]),
              "config": {k: v for k, v in vars(args).items() if k not in ("work", "out")}, "rows": rows}  # fmt: skip
    title = f"# ipa_rt bench — families on CPU ({result['environment'].get('cpu', 'CPU')})"
    lines = [title, "", __doc__.split("\n\n")[1], "", *rows_table(rows)]
    hardware = "tiny" if args.tiny else None if args.device == "cuda" else "cpu"  # None: the GPU's name
    write_results(args.out, f"{result['date']}-families", result, "\n".join(lines) + "\n", hardware)
    return 0


if __name__ == "__main__":
    sys.exit(main())
