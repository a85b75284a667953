"""``ipa_rt`` command line: ``generate``, ``build``, ``inspect``, ``demo``, ``doctor``, ``bench``, ``serve`` (also
``python -m ipa_rt``)."""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from . import __version__
from .errors import ConfigError, IpaRtError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipa_rt", description="IP-Adapter inference runtime for SD1.5/SDXL that matches diffusers."
    )
    parser.add_argument("--version", action="version", version=f"ipa_rt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text + image prompt -> image", description="Generate one image.")
    gen.add_argument("base", nargs="?", help="diffusers base model folder or hub id (SD1.5 or SDXL family)")
    gen.add_argument("--example", action="store_true", help="write a tiny random model and run it (offline demo)")
    gen.add_argument("--ip-adapter", action="append", default=[], metavar="FILE", help="adapter file; repeatable")
    gen.add_argument("--image-encoder", metavar="DIR", help="CLIP vision folder (default: image_encoder/ beside)")
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
    _add_backend_options(gen)
    vid = gen.add_argument_group("video (AnimateDiff; torch backend)")
    vid.add_argument("--motion-adapter", metavar="DIR", help="MotionAdapter folder or hub id: generate a clip")
    vid.add_argument("--frames", type=int, default=None, help="frames of the clip (default 16; --video: its length)")
    vid.add_argument("--video", metavar="FILE", help="input clip (.gif/.mp4/.webm/.mov): video-to-video")
    vid.add_argument("--strength", type=float, default=0.8, help="video-to-video strength")
    vid.add_argument("--fps", type=float, default=8.0, help="frames per second of the written clip")
    gen.add_argument("-o", "--output", required=True, help="output path: .png (image), .gif/.mp4/.webm/.mov (clip)")
    build = sub.add_parser(
        "build",
        help="export to ONNX and build ONNX Runtime / TensorRT engines",
        description="Export every network and build engines into DIR (with manifest.json).",
    )
    build.add_argument("base", help="diffusers base model folder or hub id")
    build.add_argument("--ip-adapter", action="append", required=True, metavar="FILE", help="adapter; repeatable")
    build.add_argument("--image-encoder", metavar="DIR", help="CLIP vision folder (default: image_encoder/ beside)")
    build.add_argument("--backend", choices=("onnxruntime", "tensorrt", "openvino"), default="onnxruntime")
    build.add_argument("--height", type=int, default=512)
    build.add_argument("--width", type=int, default=512)
    build.add_argument("--batch", type=int, default=1, help="images per call the engines serve (x2 with CFG)")
    build.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="export dtype (TensorRT, ORT)")
    build.add_argument(
        "--precision",
        choices=("fp32", "bf16", "int8"),
        default="fp32",
        help="OpenVINO: fp32 (faithful), bf16, int8 (int8 UNet weights)",
    )
    build.add_argument("--lora", action="append", default=[], metavar="FILE", help="LoRA fused before export")
    build.add_argument("--controlnet", action="append", default=[], metavar="DIR", help="ControlNet; repeatable")
    build.add_argument("--t2i-adapter", action="append", default=[], metavar="DIR", help="T2I-Adapter; repeatable")
    build.add_argument("--vae", default=None, metavar="DIR|taesd", help="another decoder, e.g. taesd (fast mode)")
    build.add_argument("--rebuild", action="store_true", help="replace engines that are stale or differ")
    build.add_argument("--motion-adapter", metavar="DIR", help="AnimateDiff MotionAdapter: video engines (onnxruntime)")
    build.add_argument("--frames", type=int, default=16, help="frames per clip of video engines (static)")
    build.add_argument("-o", "--output", required=True, metavar="DIR", help="engine directory")
    demo = sub.add_parser(
        "demo",
        help="LCM 4-step realtime web demo (or --sweep to a GIF)",
        description="Serve a live page where image prompt, text and scale sliders drive LCM frames.",
    )
    demo.add_argument("base", nargs="?", help="diffusers base model folder or hub id (not with --engine)")
    demo.add_argument("--ip-adapter", action="append", default=[], metavar="FILE", help="adapter; repeatable")
    demo.add_argument("--image-encoder", metavar="DIR")
    demo.add_argument("--engine", metavar="DIR", help="run from an engine directory (`ipa_rt build`)")
    _add_backend_options(demo)
    demo.add_argument("--lora", action="append", default=[], metavar="FILE", help="e.g. an LCM-LoRA; repeatable")
    demo.add_argument("--example", action="store_true", help="a tiny random model written on the fly (offline)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    demo.add_argument("--steps", type=int, default=4, help="LCM steps per frame")
    demo.add_argument("--guidance", type=float, default=None, help="default: 8.5 for LCM-distilled UNets, else 1")
    demo.add_argument("--sweep", metavar="S0,S1,...", help="render these scales headless to -o GIF + contact sheet")
    demo.add_argument("--ip-image", action="append", default=[], metavar="IMG", help="reference(s) for --sweep")
    demo.add_argument("--prompt", default="a photo", help="prompt for --sweep")
    demo.add_argument("--seed", type=int, default=0, help="seed for --sweep")
    demo.add_argument("-o", "--output", help="GIF path for --sweep (the sheet is written beside it)")
    doctor = sub.add_parser(
        "doctor",
        help="check this machine: fused kernel, CUDA graphs and engines against their references",
        description="Run each optimisation next to the computation it replaces, on this device and model; print a "
        "table, write it as JSON; exit 1 if any check fails.",
    )
    doctor.add_argument("base", nargs="?", help="diffusers base model folder or hub id (with --ip-adapter)")
    doctor.add_argument("--ip-adapter", action="append", default=[], metavar="FILE", help="adapter; repeatable")
    doctor.add_argument("--image-encoder", metavar="DIR")
    doctor.add_argument("--engine", metavar="DIR", help="also check this engine directory against the torch backend")
    doctor.add_argument("--example", action="store_true", help="a tiny random model written on the fly (offline)")
    doctor.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    doctor.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    doctor.add_argument("-o", "--output", default="ipa_rt-doctor.json", help="JSON report path")
    inspect = sub.add_parser("inspect", help="describe an engine directory", description="Say what a manifest says.")
    inspect.add_argument("engine", metavar="DIR")
    bench = sub.add_parser("bench", help="benchmark against diffusers (runs benchmarks/harness.py)", add_help=False)
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _bench(argv: list[str]) -> int:
    """Thin front of the benchmarks, which live in the source checkout, not in the wheel: ``--profile cpu`` (the
    default) runs ``benchmarks/cpu.py`` (every CPU backend against diffusers), ``--profile video``
    ``benchmarks/video.py`` (AnimateDiff against diffusers'), ``--profile serve`` ``benchmarks/serve.py`` (HTTP
    load on a local ``ipa_rt serve``), ``--profile gpu`` and ``cpu-basic``
    run ``benchmarks/harness.py`` (diffusers vs the torch backend, ControlNet workloads, ``--model`` for real
    weights)."""
    import importlib.util
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    profile = argv[argv.index("--profile") + 1] if "--profile" in argv[:-1] else "cpu"
    script = {"cpu": "cpu.py", "video": "video.py", "serve": "serve.py"}.get(profile, "harness.py")
    if not (folder / script).is_file():
        print(
            f"ipa_rt: error: ipa_rt bench runs from a source checkout (benchmarks/{script} not found)", file=sys.stderr
        )
        return 2
    if script in ("cpu.py", "video.py", "serve.py"):
        argv = [a for i, a in enumerate(argv) if a != "--profile" and (i == 0 or argv[i - 1] != "--profile")]
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"ipa_rt_bench_{script[:-3]}", folder / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main(argv)


def default_backend(device: str) -> str:
    """The fastest backend installed for ``device``: on a CPU OpenVINO when present (else PyTorch), on CUDA PyTorch
    (the graphed loop with the fused kernel; TensorRT is chosen explicitly)."""
    if device.startswith("cuda"):
        return "torch"
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "torch"
    return "openvino"


def _add_backend_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=("torch", "onnxruntime", "tensorrt", "openvino"),
        default=None,
        help="default: openvino on a CPU when installed (engines built once into the cache), else torch",
    )
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "int8"), default=None, help="OpenVINO compute precision (default fp32)"
    )
    parser.add_argument("--vae", default=None, metavar="DIR|taesd", help="another decoder, e.g. taesd (fast mode)")


def _load(args: argparse.Namespace, command: str, dtype: torch.dtype, scheduler, backend: str | None = None, **kwargs):
    """The pipeline a command asked for: from an engine dir (``--engine``) or from weights (``BASE``) on ``backend``
    (else the one asked for, else the fastest installed; engines are built into the cache once, then reused); says
    which backend, precision and decoder run."""
    from .pipeline import Pipeline

    if args.engine:
        pipe = Pipeline.from_engine(args.engine, device=args.device, scheduler=scheduler)
    elif not args.base:
        raise SystemExit(f"ipa_rt {command}: error: BASE is required (or --engine DIR, or --example)")
    else:
        backend = backend or args.backend or default_backend(args.device)
        precision, vae = getattr(args, "precision", None), getattr(args, "vae", None)
        if precision not in (None, "fp32") and backend != "openvino":
            raise ConfigError(f"--precision {precision} applies to --backend openvino; got --backend {backend}")
        if backend != "torch":
            options = {k: v for k, v in (("height", args.height), ("width", args.width)) if v}
            if backend == "openvino":
                if dtype != torch.float32:
                    raise ConfigError("--backend openvino takes --precision fp32|bf16|int8, not --dtype")
                options["precision"] = precision or "fp32"
            kwargs |= {"backend": backend, "engine_options": options}
        pipe = Pipeline.from_pretrained(
            args.base,
            ip_adapter=args.ip_adapter or None,
            image_encoder=args.image_encoder,
            device=args.device,
            dtype=dtype,
            scheduler=scheduler,
            vae=vae,
            **kwargs,
        )
    print(f"ipa_rt {command}: {pipe.runtime_summary()}", flush=True)
    return pipe


def _generate(args: argparse.Namespace) -> None:
    from .checkpoint import atomic_write_bytes

    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if args.device.startswith("cuda") else torch.float32)
    with tempfile.TemporaryDirectory(prefix="ipa_rt-example-") as tmp:
        if args.example:
            from .testing import write_example, write_motion_adapter

            files = write_example(tmp)
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
        pipe = _load(args, "generate", dtype, args.scheduler)
        if args.scale:
            pipe.set_ip_adapter_scale(args.scale[0] if len(args.scale) == 1 else args.scale)
        images = None
        if args.ip_image:
            count = pipe.adapters.num_adapters if pipe.adapters is not None else 0
            images = args.ip_image if len(args.ip_image) == count else [args.ip_image]
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        out = pipe(
            args.prompt,
            ip_adapter_image=images,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.height,
            width=args.width,
            generator=generator,
        )
        buf = io.BytesIO()
        out.images[0].save(buf, format="PNG")
        atomic_write_bytes(args.output, buf.getvalue())
    print(f"wrote {args.output}")


def _video_engine(folder: str) -> bool:
    """Whether an engine directory holds video (AnimateDiff) engines."""
    from .export.manifest import read_manifest

    return bool(read_manifest(Path(folder))["shapes"].get("frames"))


def _generate_video(args: argparse.Namespace, dtype: torch.dtype) -> None:
    """``generate --motion-adapter``: an AnimateDiff clip (txt2video, or video-to-video with ``--video``)."""
    from .video import AnimateDiffPipeline
    from .video_io import FORMATS, read_video, write_video

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


def _build(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from .export.build import BuildRequest, build_engines

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
    )
    req.check()
    with tqdm(desc="ipa_rt build", unit="stage", file=sys.stderr) as bar:

        def progress(message: str) -> None:
            bar.update()
            bar.set_postfix_str(message[:60])
            tqdm.write(message, file=sys.stdout)

        build_engines(req, args.output, rebuild=args.rebuild, progress=progress)


def _demo(args: argparse.Namespace) -> None:
    from .demo import LiveRenderer, sweep
    from .image import load_image

    if args.sweep and not args.output:
        raise SystemExit("ipa_rt demo: error: --sweep needs -o OUT.gif")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if args.device.startswith("cuda") else torch.float32)
    with tempfile.TemporaryDirectory(prefix="ipa_rt-demo-") as tmp:
        if args.example:
            from .testing import write_example

            files = write_example(tmp)
            args.base, args.ip_adapter = str(files["base"]), args.ip_adapter or [str(files["adapter"])]
            args.ip_image = args.ip_image or [str(files["image"])]
            args.vae = str(files["taesd"]) if args.vae == "taesd" else args.vae
        pipe = _load(args, "demo", dtype, "lcm", lora=args.lora or None)
        pipe.set_progress_bar_config(disable=True)
        guidance = args.guidance
        if guidance is None:  # diffusers' LCM pipeline default for distilled UNets; no CFG for LCM-LoRA
            guidance = 8.5 if pipe.unet.config.time_cond_proj_dim is not None else 1.0
        if args.sweep:
            try:
                scales = [float(s) for s in args.sweep.split(",")]
            except ValueError as exc:
                raise ConfigError(f"--sweep is {args.sweep!r}; expected comma-separated numbers") from exc
            count = pipe.adapters.num_adapters if pipe.adapters is not None else 0
            refs = [load_image(p, f"--ip-image {p}") for p in args.ip_image]
            if refs and len(refs) not in (1, count):
                raise ConfigError(f"--ip-image given {len(refs)} times; expected 1 or {count} (one per adapter)")
            images = (refs * count if len(refs) == 1 else refs) if refs else [None] * count
            gif, sheet = sweep(pipe, images, scales, args.output, args.prompt, args.seed, args.steps, guidance)
            print(f"wrote {gif} and {sheet}")
            return
        from .demo.server import serve

        renderer = LiveRenderer(pipe, steps=args.steps, guidance=guidance)
        print(f"ipa_rt demo on http://{args.host}:{args.port} ({pipe.runtime_summary()})")
        try:
            serve(renderer, args.host, args.port)
        finally:
            renderer.stop()


def _doctor(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import doctor

    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if args.device.startswith("cuda") else torch.float32)
    with tempfile.TemporaryDirectory(prefix="ipa_rt-doctor-") as tmp:
        pipe = None
        if args.example:
            from .testing import write_example

            files = write_example(tmp)
            args.base, args.ip_adapter = str(files["base"]), args.ip_adapter or [str(files["adapter"])]
        if args.base:
            if not args.ip_adapter:
                raise ConfigError("ipa_rt doctor BASE needs --ip-adapter FILE (the checks run the adapter's layers)")
            args.engine, engine = None, args.engine
            pipe = _load(args, "doctor", dtype, None, backend="torch")  # the reference the checks compare against
            pipe.set_progress_bar_config(disable=True)
            args.engine = engine
        elif not args.engine:
            raise SystemExit("ipa_rt doctor: error: give BASE --ip-adapter FILE, --engine DIR or --example")
        rows = doctor.run(pipe, Path(args.engine) if args.engine else None, args.device)
    print(doctor.table(rows))
    doctor.write_report(rows, Path(args.output))
    failed = [r.name for r in rows if r.status == "fail"]
    print(
        f"wrote {args.output}: "
        + (f"{len(failed)} check(s) failed: {', '.join(failed)}" if failed else "all checks passed")
    )
    return 1 if failed else 0


def describe(manifest: dict) -> str:
    """A manifest in words, for ``ipa_rt inspect``."""
    shapes, v = manifest["shapes"], manifest["versions"]
    gpu = manifest.get("gpu")
    from .export.engines import TENSORRT_RANGE

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


def _inspect(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .export.manifest import check_engine_dir, read_manifest

    folder = Path(args.engine)
    manifest = read_manifest(folder)
    print(describe(manifest))
    check_engine_dir(folder, manifest, torch.device("cuda" if manifest["backend"] == "tensorrt" else "cpu"))
    print("status: every engine file is intact and no source file changed")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    if argv[:1] == ["serve"]:  # its own parser: Ray is imported only when serving
        from .serving.cli import main as serve_main

        return serve_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            _generate(args)
        elif args.command == "build":
            _build(args)
        elif args.command == "inspect":
            _inspect(args)
        elif args.command == "demo":
            _demo(args)
        elif args.command == "doctor":
            return _doctor(args)
    except IpaRtError as exc:
        print(f"ipa_rt: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
