"""Commit-ready names for a first-light run: ``python benchmarks/gpu/collect.py OUT_DIR`` copies
``first-light.{json,md,log}`` from ``OUT_DIR`` (what the device tool brought back) into ``benchmarks/results/`` as
``DATE-first-light-GPU.{json,md,log}`` and regenerates the performance page (``benchmarks/report.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ipa_rt.cache import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[2]


def collect(folder: Path, results: Path = ROOT / "benchmarks" / "results", regenerate: bool = True) -> list[Path]:
    report = json.loads((folder / "first-light.json").read_text())
    if report.get("rehearse"):
        raise SystemExit("collect: this is a rehearsal (CPU, tiny models): nothing to commit")
    env = report["stages"]["environment"]["result"].get("environment", {})
    gpu = (env.get("gpu") or "unknown-gpu").lower().replace(" ", "-")
    written = []
    for suffix in ("json", "md", "log"):
        target = results / f"{report['date']}-first-light-{gpu}.{suffix}"
        atomic_write_bytes(target, (folder / f"first-light.{suffix}").read_bytes())
        written.append(target)
    if regenerate:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py")], check=True)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/gpu/collect.py OUT_DIR")
    for path in collect(Path(sys.argv[1])):
        print(f"wrote {path}")
