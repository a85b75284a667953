"""Regenerate the performance page's tables (docs/performance.md) from the committed ``ipa_rt bench`` results files.

The tables sit between the two marker lines below in docs/performance.md; every number in them comes from a file
in ``benchmarks/results/``, and each table names the hardware and links its results files (the documentation
site serves ``benchmarks/results/`` as ``results/``: docs/hooks/results_files.py) and shows the file's plot when
one was written. ``python benchmarks/report.py`` rewrites the page; ``--check`` exits 1 if it differs from what
the files say (the test suite runs that).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import peaks_text, rows_table, serve_table, soak_lines

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))
from first_light import targets_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "performance.md"
LINKED = "results/"  # benchmarks/results/ as the page links it (relative to docs/)
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def table() -> str:
    files = sorted(p for p in RESULTS.glob("*.json") if not p.name.startswith(("attention-", "runtime-", "tiny")))
    if not files:
        return "No `ipa_rt bench` results are committed yet.\n"
    lines = []
    for path in files:
        r = json.loads(path.read_text())
        env = r.get("environment", {})  # a first-light run keeps it in its environment stage
        source = " · ".join(
            f"[`benchmarks/results/{p.name}`]({LINKED}{p.name})" for p in (path, path.with_suffix(".md")) if p.is_file()
        )
        plot = path.with_suffix(".png")
        if r.get("kit") == "benchmarks/gpu/first_light.py":  # a GPU first-light run: its targets, then its tables
            env = r["stages"]["environment"]["result"].get("environment", {})
            title = f"### {env.get('gpu')}, GPU first light, {r['date']}"
            lines += [title, "", source, "", *targets_table(r["targets"]), ""]
            continue
        if r.get("profile") == "soak":  # load held for minutes: losses, memory and latency per window
            title = f"### CPU ({env.get('cpu')}), profile `soak`, target `{r['config']['target']}`, {r['date']}"
            lines += [title, "", source, "", *soak_lines(r), ""]
            continue
        if r.get("profile") == "serve":  # HTTP load test: throughput and latency per max batch size
            title = f"### CPU ({env.get('cpu')}), profile `serve`, {r['model']}, {r['date']}"
            lines += [title, "", source, "", *serve_table(r), ""]
            continue
        hw = env.get("gpu") or f"CPU ({env.get('cpu')}, {r['threads']} threads)"
        lines += [
            f"### {hw}, profile `{r['profile']}`, {r['dtype']}, {r['date']}",
            "",
            source,
            "",
            *rows_table(r["rows"]),
        ]
        if plot.is_file():
            lines += ["", f"![{path.stem}: median ms per workload and system]({LINKED}{plot.name})"]
        if "peaks" in r:  # the CPU profile: the machine's matmul peaks and how close each UNet step comes
            utilization = r["summary"]["unet_step_utilization"]
            lines.append(
                f"\nMatmul peaks measured in the same run (GFLOP/s, int8 GOP/s): {peaks_text(r['peaks'])}. "
                + (f"Machine class {r['summary']['machine_class']}. " if "machine_class" in r["summary"] else "")
                + "UNet step, fraction of its precision's peak: "
                + ", ".join(f"{k} {u['fraction']:.2f}" for k, u in utilization.items() if u.get("fraction"))
                + "."
            )
        for workload, x in r.get("speedup_vs_diffusers", {}).items():  # the video profile
            lines.append(f"\n{workload}: ipa_rt {x:.2f}x diffusers.")
        for name, why in r.get("not_available", {}).items():  # systems this CPU cannot run, and why
            lines.append(f"\n{name}: not available on this CPU ({why}).")
        targets = r.get("summary", {}).get("targets", {})
        ceilings = r.get("summary", {}).get("ceilings", {})
        if ceilings and not any("ceiling" in g for g in targets.values()):  # runs that report them apart
            lines.append("\nCeilings on this machine: " + ", ".join(f"{k} {v:.2f}x" for k, v in ceilings.items()) + ".")
        for key, g in targets.items():
            verdict = "met" if g["met"] else f"not met, short by {g['short_by']:.2f}x"
            if g.get("ceiling"):  # what the run's own measurements allow (benchmarks/cpu.py: _ceilings)
                verdict += f"; ceiling on this machine {g['ceiling']:.2f}"
            lines.append(f"\nTarget `{key}` ≥/≤ {g['target']}: measured {g['measured']:.2f} ({verdict}).")
        lines.append("")
    return "\n".join(lines)


def render(page: str) -> str:
    head, _, rest = page.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{table()}{END}{tail}"


def main(argv: list[str]) -> int:
    page = PAGE.read_text()
    if BEGIN not in page or END not in page:
        print(f"{PAGE.relative_to(ROOT)} has no bench markers ({BEGIN} ... {END})", file=sys.stderr)
        return 1
    new = render(page)
    if "--check" in argv:
        if new != page:
            print(f"{PAGE.relative_to(ROOT)} is stale: run python benchmarks/report.py", file=sys.stderr)
        return 0 if new == page else 1
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
