"""``ipa_rt bench``: a front of the benchmarks in the source checkout (their own arguments pass through)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``bench``: every argument belongs to the benchmark script, so none are parsed here."""
    bench = sub.add_parser(
        "bench",
        help="benchmark against diffusers from a source checkout (benchmarks/: --profile cpu, video, families, "
        "serve, soak, gpu)",
        add_help=False,
    )
    bench.add_argument("args", nargs=argparse.REMAINDER)


def run(argv: list[str]) -> int:
    """Thin front of the benchmarks, which live in the source checkout, not in the wheel: ``--profile`` ``cpu``
    (the default), ``video``, ``families``, ``serve`` and ``soak`` run ``benchmarks/<profile>.py``, any other (``gpu``,
    ``cpu-basic``) ``benchmarks/harness.py``. What each measures: docs/reference/cli.md, docs/guides/serving.md
    (``serve``, ``soak``), docs/guides/flux.md (``families``)."""
    import importlib.util

    folder = Path(__file__).resolve().parents[2] / "benchmarks"  # ipa_rt/cli/bench.py -> the checkout
    profile = argv[argv.index("--profile") + 1] if "--profile" in argv[:-1] else "cpu"
    scripts = {"cpu": "cpu.py", "video": "video.py", "serve": "serve.py", "soak": "soak.py", "families": "families.py"}
    script = scripts.get(profile, "harness.py")
    if not (folder / script).is_file():
        print(
            f"ipa_rt: error: ipa_rt bench runs from a source checkout (benchmarks/{script} not found)", file=sys.stderr
        )
        return 2
    if script in scripts.values():
        argv = [a for i, a in enumerate(argv) if a != "--profile" and (i == 0 or argv[i - 1] != "--profile")]
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"ipa_rt_bench_{script[:-3]}", folder / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main(argv)
