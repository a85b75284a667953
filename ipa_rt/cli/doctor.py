"""``ipa_rt doctor``: each optimisation checked against the computation it replaces, on this machine."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ..errors import ConfigError
from .common import DTYPES, dtype_of, load_pipeline


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``doctor``: the model to check on, or an engine directory."""
    doctor = sub.add_parser(
        "doctor",
        help="check this machine: attention, fused kernel, CUDA graphs and engines against what they replace",
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


def run(args: argparse.Namespace) -> int:
    from .. import doctor

    dtype = dtype_of(args)
    with tempfile.TemporaryDirectory(prefix="ipa_rt-doctor-") as tmp:
        pipe = None
        if args.example:
            from ..testing import write_example

            files = write_example(tmp)
            args.base, args.ip_adapter = str(files["base"]), args.ip_adapter or [str(files["adapter"])]
        if args.base:
            if not args.ip_adapter:
                raise ConfigError("ipa_rt doctor BASE needs --ip-adapter FILE (the checks run the adapter's layers)")
            args.engine, engine = None, args.engine
            # the reference the checks compare against
            pipe = load_pipeline(args, "doctor", dtype, None, backend="torch")
            pipe.set_progress_bar_config(disable=True)
            args.engine = engine
        elif not args.engine:
            raise SystemExit("ipa_rt doctor: error: give BASE --ip-adapter FILE, --engine DIR or --example")
        rows = doctor.run(pipe, Path(args.engine) if args.engine else None, args.device)
    print(doctor.table(rows))
    doctor.write_report(rows, Path(args.output))
    failed = [r.name for r in rows if r.status == "fail"]
    summary = f"{len(failed)} check(s) failed: {', '.join(failed)}" if failed else "all checks passed"
    print(f"wrote {args.output}: {summary}")
    return 1 if failed else 0
