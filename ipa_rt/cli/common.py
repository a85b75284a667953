"""What several commands share: the dtype table, the default backend, the backend options and loading the
pipeline a command asked for."""

from __future__ import annotations

import argparse

import torch

from ..errors import ConfigError

# OpenVINO precisions: export.openvino_engine.PRECISIONS, written out so the parser imports no export code (a test
# checks they agree)
PRECISIONS = ("fp32", "bf16", "int8", "int8-weights")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_of(args: argparse.Namespace) -> torch.dtype:
    """``--dtype``, else fp16 on CUDA and fp32 on a CPU."""
    return DTYPES[args.dtype] if args.dtype else (torch.float16 if args.device.startswith("cuda") else torch.float32)


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


def add_backend_options(parser: argparse.ArgumentParser) -> None:
    """``--backend``, ``--precision`` and ``--vae``, as ``generate`` and ``demo`` take them."""
    parser.add_argument(
        "--backend",
        choices=("torch", "onnxruntime", "tensorrt", "openvino"),
        default=None,
        help="default: openvino on a CPU when installed (engines built once into the cache), else torch",
    )
    parser.add_argument(
        "--precision",
        choices=(*PRECISIONS, "auto"),
        default=None,
        help="OpenVINO compute precision (default fp32; auto: the fastest measured for this CPU's class)",
    )
    parser.add_argument("--vae", default=None, metavar="DIR|taesd", help="another decoder, e.g. taesd (fast mode)")
    single = "a single-file BASE (torch backend): "
    parser.add_argument("--config", metavar="DIR", help=single + "a diffusers folder whose configs to use")
    parser.add_argument(
        "--tokenizer", metavar="DIR", help=single + "CLIP's tokenizer (else --config's, else the hub cache)"
    )


def load_pipeline(
    args: argparse.Namespace, command: str, dtype: torch.dtype, scheduler, backend: str | None = None, **kwargs
):
    """The pipeline a command asked for: from an engine dir (``--engine``) or from weights (``BASE``) on ``backend``
    (else the one asked for, else the fastest installed; engines are built into the cache once, then reused); says
    which backend, precision and decoder run."""
    from ..pipeline import Pipeline

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
            # generate takes --height/--width; the demo renders at the pipeline's default size (no such flags)
            options = {k: v for k in ("height", "width") if (v := getattr(args, k, None))}
            if backend == "openvino":
                if dtype != torch.float32:
                    raise ConfigError("--backend openvino takes --precision fp32|bf16|int8|int8-weights, not --dtype")
                options["precision"] = precision or "fp32"
            kwargs |= {"backend": backend, "engine_options": options}
        single = {k: v for k in ("config", "tokenizer") if (v := getattr(args, k, None))}  # a single-file BASE's
        pipe = Pipeline.from_pretrained(
            args.base,
            ip_adapter=args.ip_adapter or None,
            image_encoder=args.image_encoder,
            device=args.device,
            dtype=dtype,
            scheduler=scheduler,
            vae=vae,
            **single,
            **kwargs,
        )
    print(f"ipa_rt {command}: {pipe.runtime_summary()}", flush=True)
    return pipe
