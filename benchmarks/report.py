"""Regenerate README's performance table from the committed ``ipa_rt bench`` results files.

The table sits between the two marker lines below in README.md; every number in it comes from a file in
``benchmarks/results/`` and names the hardware and the file. ``python benchmarks/report.py`` rewrites it;
``--check`` exits 1 if README differs from what the files say (the test suite runs that).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import rows_table, serve_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def table() -> str:
    files = sorted(p for p in RESULTS.glob("*.json") if not p.name.startswith(("attention-", "runtime-", "tiny")))
    if not files:
        return "No `ipa_rt bench` results are committed yet.\n"
    lines = []
    for path in files:
        r = json.loads(path.read_text())
        env = r["environment"]
        source = f"`benchmarks/results/{path.name}`"
        if r.get("profile") == "serve":  # HTTP load test: throughput and latency per max batch size
            lines += [f"**CPU ({env.get('cpu')})**, profile `serve` — {source}", "", *serve_table(r), ""]
            continue
        hw = env.get("gpu") or f"CPU ({env.get('cpu')}, {r['threads']} threads)"
        lines += [
            f"**{hw}**, profile `{r['profile']}`, {r['dtype']}, {r['date']} — {source}",
            "",
            *rows_table(r["rows"]),
        ]
        if "peaks" in r:  # the CPU profile: the machine's matmul peaks and how close each UNet step comes
            lines.append(
                f"\nMatmul peaks measured in the same run: fp32 {r['peaks']['fp32']:.0f} GFLOP/s, bf16 "
                f"{r['peaks']['bf16']:.0f} GFLOP/s. UNet step, fraction of its precision's peak: "
                + ", ".join(f"{k} {u['fraction']:.2f}" for k, u in r["summary"]["unet_step_utilization"].items())
                + "."
            )
        for workload, x in r.get("speedup_vs_diffusers", {}).items():  # the video profile
            lines.append(f"\n{workload}: ipa_rt {x:.2f}x diffusers.")
        for key, g in r.get("summary", {}).get("targets", {}).items():
            verdict = "met" if g["met"] else f"not met, short by {g['short_by']:.2f}x"
            lines.append(f"\nTarget `{key}` ≥/≤ {g['target']}: measured {g['measured']:.2f} ({verdict}).")
        lines.append("")
    return "\n".join(lines)


def render(readme: str) -> str:
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{table()}{END}{tail}"


def main(argv: list[str]) -> int:
    readme = (ROOT / "README.md").read_text()
    if BEGIN not in readme or END not in readme:
        print("README.md has no bench markers", file=sys.stderr)
        return 1
    new = render(readme)
    if "--check" in argv:
        return 0 if new == readme else 1
    (ROOT / "README.md").write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
