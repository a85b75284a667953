"""``ipa_rt`` command line (also ``python -m ipa_rt``): a thin parser; each command lives in its own module (``serve``
in :mod:`ipa_rt.serving.cli`), which adds its subparser and runs it. :func:`build_parser` assembles the complete
parser, from which docs/reference/cli.md is generated.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .._version import __version__
from ..console import quiet_process
from ..errors import IpaRtError
from . import bench, build, demo, doctor, generate, inspect
from .common import DTYPES, default_backend
from .inspect import describe

__all__ = ["DTYPES", "build_parser", "default_backend", "describe", "main"]

VERBOSE_HELP = "also show third-party warnings and progress bars (transformers, diffusers, the ONNX exporter)"

# Subcommands in the order `ipa_rt --help` lists them; bench is parsed only for that listing (main hands its
# arguments to the benchmark script untouched).
FAMILIES = (generate, build, demo, doctor, inspect, bench)
COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {
    "generate": generate.run,
    "build": build.run,
    "inspect": inspect.run,
    "demo": demo.run,
    "doctor": doctor.run,
}


def build_parser() -> argparse.ArgumentParser:
    """The complete ``ipa_rt`` parser, every subcommand included except ``serve`` (its own parser,
    :func:`ipa_rt.serving.cli.parser`, so that Ray is imported only when serving)."""
    parser = argparse.ArgumentParser(
        prog="ipa_rt",
        description="IP-Adapter inference runtime that gives diffusers' output (SD1.5, SDXL, Flux/Chroma, Kolors, "
        "SD3.5), on PyTorch or ONNX Runtime, OpenVINO and TensorRT engines.",
    )
    parser.add_argument("--version", action="version", version=f"ipa_rt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.add_parser(sub)
    # listed only: main hands serve's arguments to its own parser (Ray is imported only when serving)
    serve = sub.add_parser(
        "serve", help="HTTP server on Ray Serve: batched generation (ipa_rt serve --help)", add_help=False
    )
    serve.add_argument("args", nargs=argparse.REMAINDER)
    for command in sub.choices.values():  # -v after the command too; SUPPRESS keeps a top-level -v intact
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


_parser = build_parser  # the name it had before the CLI became a package


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["bench"], ["serve"]):  # parsed by their own scripts, which take no -v: it is taken here
        quiet_process(any(a in ("-v", "--verbose") for a in argv))
        rest = [a for a in argv[1:] if a not in ("-v", "--verbose")]
        if argv[0] == "bench":
            return bench.run(rest)
        from ..serving.cli import main as serve_main  # its own parser: Ray is imported only when serving

        return serve_main(rest)
    args = build_parser().parse_args(argv)
    quiet_process(args.verbose)
    try:
        run = COMMANDS.get(args.command)
        code = run(args) if run is not None else None
    except IpaRtError as exc:
        print(f"ipa_rt: error: {exc}", file=sys.stderr)
        return 2
    return code or 0
