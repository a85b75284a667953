"""``ipa_rt build``: export every network to ONNX and build engines into a directory."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import PRECISIONS


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``build``: the engine directory's request, one flag per field of ``BuildRequest``."""
    build = sub.add_parser(
        "build",
        help="export to ONNX and build ONNX Runtime, OpenVINO or TensorRT engines with a manifest: every network of "
        "SD1.5/SDXL, the transformer (UNet) of Flux/Chroma, Kolors and SD3.5",
        description="Export to ONNX and build engines into DIR (with manifest.json; what is already built there is "
        "reused): every network of an SD1.5/SDXL model (with its ControlNets, T2I-Adapters or motion adapter), the "
        "transformer (Kolors: the UNet) of a Flux/Chroma, Kolors or SD3.5 model, whose other networks stay PyTorch.",
    )
    build.add_argument("base", help="diffusers base model folder or hub id, or an SD1.5/SDXL single-file checkpoint")
    build.add_argument("--ip-adapter", action="append", required=True, metavar="FILE", help="adapter; repeatable")
    build.add_argument(
        "--image-encoder", metavar="DIR", help="CLIP vision folder or file (default: image_encoder/ beside)"
    )
    build.add_argument("--backend", choices=("onnxruntime", "tensorrt", "openvino"), default="onnxruntime")
    build.add_argument("--height", type=int, default=512)
    build.add_argument("--width", type=int, default=512)
    build.add_argument("--batch", type=int, default=1, help="images per call the engines serve (x2 with CFG)")
    build.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="export dtype (TensorRT, ORT)")
    build.add_argument(
        "--precision",
        choices=(*PRECISIONS, "auto"),
        default="fp32",
        help="OpenVINO: fp32 (faithful), bf16, int8 (calibrated int8 UNet), int8-weights (int8 UNet weights only), "
        "auto (the fastest measured for this CPU's class: ipa_rt.cpu.RECIPES)",
    )
    build.add_argument(
        "--calibration-prompts", metavar="FILE", help="int8: the UNet's calibration prompts, one a line (else built-in)"
    )
    build.add_argument(
        "--calibration-images",
        action="append",
        default=[],
        metavar="DIR|FILE",
        help="int8: calibration reference images (a folder or a file; repeatable; else built-in)",
    )
    single = "a single-file BASE: "
    build.add_argument("--config", metavar="DIR", help=single + "a diffusers folder whose configs to use")
    build.add_argument("--tokenizer", metavar="DIR", help=single + "CLIP's tokenizer (else --config's, else hub cache)")
    build.add_argument("--lora", action="append", default=[], metavar="FILE", help="LoRA fused before export")
    build.add_argument("--controlnet", action="append", default=[], metavar="DIR", help="ControlNet; repeatable")
    build.add_argument("--t2i-adapter", action="append", default=[], metavar="DIR", help="T2I-Adapter; repeatable")
    build.add_argument("--vae", default=None, metavar="DIR|taesd", help="another decoder, e.g. taesd (fast mode)")
    build.add_argument(
        "--exporter",
        choices=("torchscript", "dynamo"),
        default="torchscript",
        help="ONNX exporter: torchscript (the tracer, fast) or dynamo (torch.export)",
    )
    build.add_argument("--rebuild", action="store_true", help="replace engines that are stale or differ")
    build.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        help="Flux/Chroma, Kolors, SD3.5: text tokens the engine takes (default: the pipeline's)",
    )
    build.add_argument("--motion-adapter", metavar="DIR", help="AnimateDiff MotionAdapter: video engines (onnxruntime)")
    build.add_argument("--frames", type=int, default=16, help="frames per clip of video engines (static)")
    build.add_argument("-o", "--output", required=True, metavar="DIR", help="engine directory")


def run(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from ..export.build import BuildRequest, build_engines
    from ..export.calibration import read_prompts
    from ..families import family_of
    from ..models import declared_pipeline

    name = declared_pipeline(args.base)
    family = family_of(name)
    if family is not None:
        return _build_wrapped(args, family, name)
    if args.motion_adapter:  # the video pipeline registers itself with the export layer, which never imports it
        from ..video import pipeline  # noqa: F401

    req = BuildRequest(
        base=args.base,
        ip_adapter=args.ip_adapter,
        image_encoder=args.image_encoder,
        backend=args.backend,
        height=args.height,
        width=args.width,
        batch=args.batch,
        dtype=args.dtype,
        precision=args.precision,
        lora=args.lora,
        controlnet=args.controlnet,
        t2i_adapter=args.t2i_adapter,
        vae=args.vae,
        motion_adapter=args.motion_adapter,
        frames=args.frames if args.motion_adapter else 0,
        exporter=args.exporter,
        calibration_prompts=read_prompts(args.calibration_prompts) if args.calibration_prompts else [],
        calibration_images=args.calibration_images,
        config=args.config,
        tokenizer=args.tokenizer,
    )
    req.check()
    with tqdm(desc="ipa_rt build", unit="stage", file=sys.stderr) as bar:

        def progress(message: str) -> None:
            bar.update()
            bar.set_postfix_str(message[:60])
            tqdm.write(message, file=sys.stdout)

        build_engines(req, args.output, rebuild=args.rebuild, progress=progress)


def _build_wrapped(args: argparse.Namespace, family: Any, class_name: str) -> None:
    """``ipa_rt build`` of a Flux/Chroma, Kolors or SD3.5 folder: the transformer's (UNet's) engine; the other
    networks stay PyTorch."""
    from ..errors import ConfigError

    unsupported = {
        "--lora": args.lora,
        "--controlnet": args.controlnet,
        "--t2i-adapter": args.t2i_adapter,
        "--vae": args.vae,
        "--motion-adapter": args.motion_adapter,
        "--calibration-prompts": args.calibration_prompts,
        "--calibration-images": args.calibration_images,
        "--dtype": args.dtype if args.dtype != "fp32" else None,
        "--exporter": args.exporter if args.exporter != "torchscript" else None,
        "--precision int8": args.precision if args.precision.startswith("int8") else None,
    }
    given = [flag for flag, value in unsupported.items() if value]
    if given:
        raise ConfigError(f"{', '.join(given)}: not supported for these families' engines yet (fp32/bf16 only)")
    options = {"height": args.height, "width": args.width, "batch": args.batch, "precision": args.precision}
    options["rebuild"] = args.rebuild
    if args.max_sequence_length is not None:
        options["max_sequence_length"] = args.max_sequence_length
    folder = family.build_engines(
        args.base, args.ip_adapter, args.image_encoder, args.backend, options, out=args.output, class_name=class_name
    )
    print(f"engines written to '{folder}'")
