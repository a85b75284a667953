"""``ipa_rt demo``: the LCM realtime web demo, or ``--sweep`` of scales to a GIF."""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

from ..console import reachable_from_others
from ..errors import ConfigError, require_extra
from .common import DTYPES, add_backend_options, dtype_of, load_pipeline


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``demo``: the live page's model and server, and the headless sweep."""
    demo = sub.add_parser(
        "demo",
        help="LCM realtime web page: image prompt, text and scale sliders live (or --sweep of scales to a GIF)",
        description="Serve a live page where image prompt, text and scale sliders drive LCM frames.",
    )
    demo.add_argument("base", nargs="?", help="diffusers base model folder or hub id (not with --engine)")
    demo.add_argument("--ip-adapter", action="append", default=[], metavar="FILE", help="adapter; repeatable")
    demo.add_argument("--image-encoder", metavar="DIR")
    demo.add_argument("--engine", metavar="DIR", help="run from an engine directory (`ipa_rt build`)")
    add_backend_options(demo)
    demo.add_argument("--lora", action="append", default=[], metavar="FILE", help="e.g. an LCM-LoRA; repeatable")
    demo.add_argument("--example", action="store_true", help="a tiny random model written on the fly (offline)")
    demo.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; the page has no login)",
    )
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


def bind_notice(host: str, port: int) -> str | None:
    """A line for a page bound beyond loopback: it has no login, so anyone who reaches the port can drive it."""
    if not reachable_from_others(host):
        return None
    return (
        f"ipa_rt demo: listening on {host}, reachable from other machines; the page has no login, so anyone who "
        f"reaches port {port} can use it (--host 127.0.0.1, the default, keeps it to this machine)"
    )


def run(args: argparse.Namespace) -> None:
    from ..adapters.image import load_image
    from ..demo import LiveRenderer, sweep

    if args.sweep and not args.output:
        raise SystemExit("ipa_rt demo: error: --sweep needs -o OUT.gif")
    if not args.sweep:  # the page's server: before the model loads
        require_extra("the live demo", "demo", ("fastapi", "uvicorn", "websockets"))
    dtype = dtype_of(args)
    with tempfile.TemporaryDirectory(prefix="ipa_rt-demo-") as tmp:
        if args.example:
            from ..testing import write_example

            files = write_example(tmp)
            args.base, args.ip_adapter = str(files["base"]), args.ip_adapter or [str(files["adapter"])]
            args.ip_image = args.ip_image or [str(files["image"])]
            args.vae = str(files["taesd"]) if args.vae == "taesd" else args.vae
        pipe = load_pipeline(args, "demo", dtype, "lcm", lora=args.lora or None)
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
        from ..demo.server import serve

        renderer = LiveRenderer(pipe, steps=args.steps, guidance=guidance)
        print(f"ipa_rt demo on http://{args.host}:{args.port} ({pipe.runtime_summary()})", flush=True)
        notice = bind_notice(args.host, args.port)
        if notice:
            print(notice, file=sys.stderr, flush=True)
        try:
            serve(renderer, args.host, args.port)
        finally:
            renderer.stop()
