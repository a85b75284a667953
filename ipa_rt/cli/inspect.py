"""``ipa_rt inspect``: what an engine directory's manifest says, and whether its files are intact."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``inspect``: one engine directory."""
    inspect = sub.add_parser(
        "inspect",
        help="describe an engine directory and check its files are intact",
        description="Say what an engine directory's manifest says, and check its files against it.",
    )
    inspect.add_argument("engine", metavar="DIR")


def describe(manifest: dict) -> str:
    """A manifest in words, for ``ipa_rt inspect``."""
    shapes, v = manifest["shapes"], manifest["versions"]
    gpu = manifest.get("gpu")
    from ..export.engines import TENSORRT_RANGE

    precision = f", {manifest['precision']} compute" if manifest["backend"] == "openvino" else ""
    lines = [
        f"{manifest['backend']} engines for a {manifest['family'].upper()} model, {manifest['dtype']}{precision} "
        f"(inputs and outputs {manifest['io_dtype']}, VAE {manifest['vae_dtype']}; exported in these types with "
        f"normalisations in fp32), built in {manifest['built_seconds']} s",
        f"images {shapes['width']}x{shapes['height']}, up to {shapes['batch']} per call "
        f"({2 * shapes['batch']} UNet rows with guidance), {shapes['text_tokens']} text tokens",
        f"built with ipa_rt {v['ipa_rt']}, torch {v['torch']}, onnx {v['onnx']}, onnxruntime {v['onnxruntime']}, "
        f"TensorRT {v['tensorrt'] or 'not installed'}"
        + (f", on {gpu['name']} (sm {gpu['capability']})" if gpu else ""),
        f"TensorRT engines need TensorRT {TENSORRT_RANGE} (10.x and 11.x; networks built strongly typed) and the GPU "
        "they were built on",
        f"{len(manifest['adapters'])} IP-Adapter(s) over {manifest['layers']} cross-attention layers; "
        "the scale is an engine input (changing it rebuilds nothing):",
    ]
    lines += [
        f"  [{i}] {a['variant']}: {a['tokens']} image tokens, from {a['origin']}"
        for i, a in enumerate(manifest["adapters"])
    ]
    for i, net in enumerate(manifest.get("controlnets", [])):
        lines.append(
            f"  ControlNet [{i}] from {net['origin']} ({net['residuals']} residuals; scales are engine inputs)"
        )
    for i, a in enumerate(manifest.get("t2i_adapters", [])):
        lines.append(
            f"  T2I-Adapter [{i}] from {a['origin']} ({a['type']}, {a['features']} features; weighted per step "
            "outside the engine by the live scale)"
        )
    lines.append("networks:")
    for name, net in manifest["networks"].items():
        size = sum(f["size"] for f in net["files"].values()) / 2**20
        ins = ", ".join(f"{k} {v['profile'][1]}" for k, v in net["inputs"].items())
        lines.append(f"  {name} ({size:.1f} MiB, batch {net['batch'][0]}..{net['batch'][2]}): {ins}")
    lines.append(f"from {len(manifest['sources'])} source files (sha256 recorded)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    from ..export.manifest import check_engine_dir, read_manifest

    folder = Path(args.engine)
    manifest = read_manifest(folder)
    print(describe(manifest))
    check_engine_dir(folder, manifest, torch.device("cuda" if manifest["backend"] == "tensorrt" else "cpu"))
    print("status: every engine file is intact and no source file changed")
