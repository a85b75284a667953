"""``ipa_rt generate``: one image, or an AnimateDiff clip (``--motion-adapter``, ``--video``, video engines)."""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import torch

from ..errors import ConfigError
from .common import DTYPES, add_backend_options, dtype_of, load_pipeline


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``generate``: text and image prompts to an image or a clip."""
    gen = sub.add_parser(
        "generate",
        help="text + image prompt -> an image (or an AnimateDiff clip), from weights or built engines",
        description="Generate one image, or a clip with --motion-adapter / --video.",
    )
    gen.add_argument(
        "base",
        nargs="?",
        help="diffusers base model folder or hub id (SD1.5, SDXL, Flux/Chroma, Kolors, SD3.5), or an SD1.5/SDXL "
        "single-file checkpoint (.safetensors/.ckpt)",
    )
    gen.add_argument(
        "--example",
        action="store_true",
        help="write a tiny random model and run it (offline; on PyTorch unless --backend is given)",
    )
    gen.add_argument("--ip-adapter", action="append", default=[], metavar="FILE", help="adapter file; repeatable")
    gen.add_argument(
        "--image-encoder", metavar="DIR", help="CLIP vision folder or file (default: image_encoder/ beside)"
    )
    gen.add_argument("--ip-image", action="append", default=[], metavar="IMG", help="reference image per adapter")
    gen.add_argument("--prompt", default="", help="text prompt")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--scale", action="append", type=float, default=[], help="adapter scale; one or one per adapter")
    gen.add_argument("--steps", type=int, default=30)
    gen.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the family's diffusers default)")
    gen.add_argument("--scheduler", default=None, help="ddim, euler, euler_a, dpm++2m, dpm++2m_karras, lcm, ...")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    gen.add_argument("--engine", metavar="DIR", help="run from an engine directory written by `ipa_rt build`")
    add_backend_options(gen)
    vid = gen.add_argument_group("video (AnimateDiff; torch backend)")
    vid.add_argument("--motion-adapter", metavar="DIR", help="MotionAdapter folder or hub id: generate a clip")
    vid.add_argument("--frames", type=int, default=None, help="frames of the clip (default 16; --video: its length)")
    vid.add_argument("--video", metavar="FILE", help="input clip (.gif/.mp4/.webm/.mov): video-to-video")
    vid.add_argument("--strength", type=float, default=0.8, help="video-to-video strength")
    vid.add_argument("--fps", type=float, default=8.0, help="frames per second of the written clip")
    gen.add_argument("-o", "--output", required=True, help="output path: .png (image), .gif/.mp4/.webm/.mov (clip)")


def run(args: argparse.Namespace) -> None:
    from ..cache import atomic_write_bytes

    dtype = dtype_of(args)
    with tempfile.TemporaryDirectory(prefix="ipa_rt-example-") as tmp:
        if args.example:
            from ..testing import EXAMPLE_UNET, write_example, write_motion_adapter

            files = write_example(tmp, configs={"unet": EXAMPLE_UNET})
            # a first image in seconds: the tiny example runs on PyTorch unless an engine backend is asked for
            args.backend = args.backend or "torch"
            args.base = str(files["base"])
            args.ip_adapter = args.ip_adapter or [str(files["adapter"])]
            args.ip_image = args.ip_image or [str(files["image"])]
            args.vae = str(files["taesd"]) if args.vae == "taesd" else args.vae  # the example's own tiny TAESD
            args.prompt = args.prompt or "a tiny example"
            args.height, args.width = args.height or 32, args.width or 32
            args.steps = min(args.steps, 4)
            if (args.frames or args.video) and not args.motion_adapter:  # a clip: the tiny motion adapter too
                args.motion_adapter = str(write_motion_adapter(Path(tmp) / "motion", files["base"]))
        if args.motion_adapter or args.video or (args.engine and _video_engine(args.engine)):
            return _generate_video(args, dtype)
        pipe = load_pipeline(args, "generate", dtype, args.scheduler)
        if args.scale:
            pipe.set_ip_adapter_scale(args.scale[0] if len(args.scale) == 1 else args.scale)
        images = None
        if args.ip_image:
            count = _adapter_count(pipe)
            images = args.ip_image if len(args.ip_image) == count else [args.ip_image]
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        guidance = {"guidance_scale": args.guidance} if args.guidance is not None else {}  # else the family's default
        out = pipe(
            args.prompt,
            ip_adapter_image=images,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            height=args.height,
            width=args.width,
            generator=generator,
            **guidance,
        )
        buf = io.BytesIO()
        out.images[0].save(buf, format="PNG")
        atomic_write_bytes(args.output, buf.getvalue())
    print(f"wrote {args.output}")


def _adapter_count(pipe) -> int:
    """IP-Adapters loaded: a UNet pipeline's stack (ipa_rt's, Kolors'), a Flux-family transformer's image side, or
    SD3.5's (one adapter)."""
    adapters = getattr(pipe, "adapters", None)
    if adapters is not None:
        return adapters.num_adapters
    transformer = getattr(pipe, "transformer", None)
    side = getattr(transformer, "encoder_hid_proj", None)
    if side is not None:
        return getattr(side, "num_ip_adapters", 0)
    return 1 if getattr(transformer, "image_proj", None) is not None else 0


def _video_engine(folder: str) -> bool:
    """Whether an engine directory holds video (AnimateDiff) engines."""
    from ..export.manifest import read_manifest

    return bool(read_manifest(Path(folder))["shapes"].get("frames"))


def _generate_video(args: argparse.Namespace, dtype: torch.dtype) -> None:
    """``generate --motion-adapter``: an AnimateDiff clip (txt2video, or video-to-video with ``--video``)."""
    from ..video.io import FORMATS, read_video, write_video
    from ..video.pipeline import AnimateDiffPipeline

    if not args.motion_adapter and not args.engine:
        raise ConfigError("--video needs --motion-adapter DIR (video-to-video runs AnimateDiff)")
    if Path(args.output).suffix.lower() not in FORMATS:
        raise ConfigError(f"--output '{args.output}' must end in one of {FORMATS} for a clip")
    clip = read_video(args.video) if args.video else None  # read first: a bad file fails before any loading
    if args.engine:
        pipe = AnimateDiffPipeline.from_engine(args.engine, device=args.device, scheduler=args.scheduler)
        args.frames = args.frames or pipe.engine_manifest["shapes"]["frames"]
        args.height, args.width = args.height or pipe.default_size[0], args.width or pipe.default_size[1]
    else:
        backend = args.backend or "torch"  # video engines are built on request only (--backend onnxruntime)
        engine = {"backend": backend, "engine_options": {"frames": args.frames or 16}} if backend != "torch" else {}
        if engine and (args.height or args.width):
            engine["engine_options"] |= {k: v for k, v in (("height", args.height), ("width", args.width)) if v}
        pipe = AnimateDiffPipeline.from_pretrained(
            args.base, args.ip_adapter or None, args.image_encoder, motion_adapter=args.motion_adapter,
            device=args.device, dtype=dtype, scheduler=args.scheduler, vae=args.vae, **engine,
        )  # fmt: skip
    motion = f", motion adapter {args.motion_adapter}" if args.motion_adapter else ", video engines"
    print(f"ipa_rt generate: {pipe.runtime_summary()}{motion}", flush=True)
    if args.scale:
        pipe.set_ip_adapter_scale(args.scale[0] if len(args.scale) == 1 else args.scale)
    count = pipe.adapters.num_adapters if pipe.adapters is not None else 0
    images = (args.ip_image if len(args.ip_image) == count else [args.ip_image]) if args.ip_image else None
    out = pipe(
        args.prompt,
        num_frames=args.frames or 16,
        ip_adapter_image=images,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=7.5 if args.guidance is None else args.guidance,
        height=args.height,
        width=args.width,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
        video=clip,
        strength=args.strength,
    )
    write_video(args.output, out.frames[0], fps=args.fps)
    print(f"wrote {args.output} ({len(out.frames[0])} frames)")
