"""GPU first light: every stage of the kit in order, each time-boxed in its own process, results written as they land.

    python benchmarks/gpu/first_light.py OUT [--budget 540] [--rehearse]

Stages (``stages.py``): environment; models (full-size random-weight SD1.5 in the real formats); ``ipa_rt doctor``
on SD1.5 fp16; the attention micro-benchmark (fused kernel vs diffusers' processor vs SDPA, from CUDA graphs);
SD1.5 512² (diffusers, ipa_rt eager, ipa_rt + graphs: UNet step, LCM-4 and 30-step CFG end to end, scale and image
changes, errors against diffusers, 8 batched requests against 8 single calls, recaptures); SDXL 1024² (the same
rows, skipped when too little time is left); AnimateDiff 16 frames 512² if time is left. A stage that fails or
runs out of its box is recorded as such and the next one still runs. After every stage ``OUT`` holds
``first-light.json`` (every row, the targets met or not), ``first-light.md`` (the tables) and ``first-light.log``:
three files, well inside the device tool's eight.

``--rehearse`` runs the same stages on the CPU with the tiny models (fp32, the Triton interpreter for the kernel
rows, eager loops) in about a minute and a half: the test suite does, so the script cannot rot between GPUs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FILES = ("first-light.json", "first-light.md", "first-light.log")


@dataclass(frozen=True)
class Stage:
    name: str
    box_s: float  # the stage's own time box on the GPU
    min_left_s: float = 0.0  # skipped when less than this is left of the whole budget
    interpreter: bool = False  # rehearsal: run Triton kernels through the interpreter


# Boxes sized for an H200 (16 cores) with full-size models; they add up to more than the budget on purpose: a stage
# gets min(its box, what is left), and the optional ones go last.
STAGES = (
    Stage("environment", 30),
    Stage("models", 120),
    Stage("doctor", 150, interpreter=True),  # kernel compiles and tuning at pipeline build happen here first
    Stage("attention", 75, interpreter=True),
    Stage("sd15", 210),
    Stage("sdxl", 180, min_left_s=120),
    Stage("video", 150, min_left_s=60),
    Stage("flux", 240, min_left_s=180),  # FLUX.1 width, 19 + 4 blocks, bf16 (issue #26)
    Stage("kolors", 240, min_left_s=180),  # the full SDXL-width UNet at 1024², bf16
    Stage("sd3", 240, min_left_s=180),  # SD3.5-Large width, 12 of 38 blocks, bf16
)
REHEARSAL_BOX_S = 150  # per stage with the tiny models: a safety net (they take 5-25 s each on 2 idle cores)

# Targets (issue #22): (key, wanted, "<=" or ">=", what it measures)
TARGETS = (
    ("sd15_cfg_step_ms", 4.0, "<=", "SD1.5 512² fp16 UNet step with CFG (graph replay)"),
    ("sd15_lcm4_end_to_end_ms", 15.0, "<=", "SD1.5 512² LCM 4 steps end to end"),
    ("sdxl_cfg_step_ms", 25.0, "<=", "SDXL 1024² UNet step with CFG"),
    ("lcm4_speedup_vs_diffusers", 3.0, ">=", "ipa_rt+graphs vs diffusers, SD1.5 LCM-4 end to end"),
    (
        "attention_speedup_vs_diffusers_sd15_min",
        1.5,
        ">=",
        "fused attention vs diffusers' processor, slowest SD1.5 shape",
    ),
    ("doctor_failed_rows", 0, "<=", "ipa_rt doctor rows that failed"),
    ("recaptures_on_live_controls", 0, "<=", "graph captures caused by scale, step-range and image changes"),
)


def atomic_write(path: Path, text: str) -> None:
    """ipa_rt.cache.atomic_write_bytes's job, kept here: the driver imports neither torch nor ipa_rt, so a
    broken install fails a stage (recorded) instead of the whole run before it has written anything."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run_stage(stage: Stage, args: argparse.Namespace, seconds: float, log) -> dict[str, Any]:
    """One stage in its own process group, killed whole at ``seconds``; its (possibly partial) result file read."""
    result = args.work / f"{stage.name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "stages.py"), stage.name, "--work", str(args.work), "--result", str(result)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.rehearse:  # on the CPU, also on a CUDA machine: the rehearsal checks the kit, not a GPU
        cmd.append("--rehearse")
        env["CUDA_VISIBLE_DEVICES"] = ""
        if stage.interpreter:
            env["TRITON_INTERPRET"] = "1"
    log.write(f"\n=== stage {stage.name}: box {seconds:.0f} s, {dt.datetime.now().isoformat(timespec='seconds')}\n")
    log.flush()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=seconds)
        status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage and anything it started
        proc.wait()
        status = f"timed out after {seconds:.0f} s"
    elapsed = time.perf_counter() - start
    log.write(f"=== stage {stage.name}: {status} in {elapsed:.1f} s\n")
    log.flush()
    data = json.loads(result.read_text()) if result.exists() else {}
    return {"status": status, "seconds": round(elapsed, 1), "box_s": round(seconds), "result": data}


def _median(rows: list[dict], system: str, workload: str) -> float | None:
    return next((r["median_ms"] for r in rows if r["system"] == system and r["workload"] == workload), None)


def measurements(stages: dict[str, dict], rehearse: bool) -> dict[str, Any]:
    """The figures the targets read, from whatever stages produced them (``None`` where a stage did not). A
    rehearsal has no CUDA graphs: its figures come from the eager system, only to exercise this code."""
    out: dict[str, Any] = {}
    best = "ipa_rt" if rehearse else "ipa_rt+graphs"
    sd15 = stages.get("sd15", {}).get("result", {})
    rows = sd15.get("rows", [])
    out["sd15_cfg_step_ms"] = _median(rows, best, "unet step b2")
    out["sd15_lcm4_end_to_end_ms"] = _median(rows, best, "LCM 4 steps end to end")
    base = _median(rows, "diffusers", "LCM 4 steps end to end")
    ours = out["sd15_lcm4_end_to_end_ms"]
    out["lcm4_speedup_vs_diffusers"] = base / ours if base and ours else None
    out["sdxl_cfg_step_ms"] = _median(stages.get("sdxl", {}).get("result", {}).get("rows", []), best, "unet step b2")
    attention = stages.get("attention", {}).get("result", {}).get("rows", [])
    sd15_shapes = [r["speedup_vs_diffusers"] for r in attention if r["model"].startswith(("sd15", "smoke"))]
    out["attention_speedup_vs_diffusers_sd15_min"] = min(sd15_shapes) if sd15_shapes else None
    doctor = stages.get("doctor", {}).get("result", {})
    out["doctor_failed_rows"] = len(doctor["failed"]) if "failed" in doctor else None
    controls = sd15.get("controls", {})
    out["recaptures_on_live_controls"] = controls.get("recaptures")
    out["system"] = best
    return out


def judge(measured: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, wanted, how, what in TARGETS:
        have = measured.get(key)
        if have is None:
            rows.append({"target": key, "what": what, "wanted": f"{how} {wanted}", "measured": None, "met": None})
            continue
        met = have <= wanted if how == "<=" else have >= wanted
        short = None
        if not met and have and wanted:
            short = have / wanted if how == "<=" else wanted / have
        rows.append(
            {"target": key, "what": what, "wanted": f"{how} {wanted}", "measured": have, "met": met, "short_by": short}
        )
    return rows


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{digits}e}" if 0 < abs(v) < 1e-2 else f"{v:.{digits}f}"
    return str(v)


def targets_table(targets: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: each target, what it measures, wanted, measured, met (— where not measured), shortfall."""
    lines = ["| target | what | wanted | measured | met | short by |", "|---|---|---|---|---|---|"]
    for t in targets:
        met = "—" if t["met"] is None else "yes" if t["met"] else "no"
        short = f"{t['short_by']:.2f}x" if t.get("short_by") else "—"
        lines.append(f"| {t['target']} | {t['what']} | {t['wanted']} | {_fmt(t['measured'])} | {met} | {short} |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    env = report["stages"].get("environment", {}).get("result", {}).get("environment", {})
    hw = env.get("gpu") or f"CPU rehearsal ({env.get('cpu')})"
    lines = [
        f"# GPU first light — {hw}",
        "",
        f"{report['date']}; ipa_rt commit `{env.get('commit')}`; torch {env.get('torch')}, CUDA {env.get('cuda')}, "
        f"triton {env.get('triton')}, diffusers {env.get('diffusers')}, driver {env.get('driver_version')}; command "
        f"`{report['command']}`; random weights of the full-size architectures"
        + (" (rehearsal: tiny models on the CPU, numbers meaningless)" if report["rehearse"] else "")
        + f"; whole run {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget.",
        "",
        "| stage | status | seconds | box |",
        "|---|---|---|---|",
        *(f"| {n} | {s['status']} | {s['seconds']} | {s['box_s']} |" for n, s in report["stages"].items()),
        "",
        "## Targets",
        "",
        *targets_table(report["targets"]),
    ]
    doctor = report["stages"].get("doctor", {}).get("result", {})
    if doctor.get("checks"):
        lines += [
            "",
            "## ipa_rt doctor",
            "",
            "| check | status | max error | tolerance | detail |",
            "|---|---|---|---|---|",
        ]
        for c in doctor["checks"]:
            lines.append(
                f"| {c['name']} | {c['status']} | {_fmt(c['max_error'])} | {_fmt(c['tolerance'])} | {c['detail']} |"
            )
    attention = report["stages"].get("attention", {}).get("result", {}).get("rows", [])
    if attention:
        lines += [
            "",
            "## Attention (µs, replayed from CUDA graphs)",
            "",
            "| model | blocks | N | heads | d | adapters | fused | diffusers | sdpa_concat | speed-up | GB/s | err |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in attention:
            us = r["us"]
            lines.append(
                f"| {r['model']} | {r['where']} | {r['queries']} | {r['heads']} | {r['head_dim']} | {r['adapters']} | "
                f"{us['fused']:.1f} | {us['diffusers']:.1f} | {us['sdpa_concat']:.1f} | "
                f"{r['speedup_vs_diffusers']:.2f}x | {r['fused_gbps']:.0f} | {r['rel_err_vs_diffusers']:.1e} |"
            )
    for family in ("sd15", "sdxl"):
        res = report["stages"].get(family, {}).get("result", {})
        if not res.get("rows") and not res.get("errors"):
            continue
        lines += [
            "",
            f"## {family} {res.get('size')}² {res.get('dtype')} (load {res.get('load_s')} s, kernel tuning "
            f"{_fmt(res.get('tune_s'))} s)",
            "",
            "| workload | system | median ms | p90 ms |",
            "|---|---|---|---|",
            *(
                f"| {r['workload']} | {r['system']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} |"
                for r in res.get("rows", [])
            ),
            "",
            "| error against diffusers (final latents / UNet output, rel. L2) | value |",
            "|---|---|",
            *(f"| {k} | {_fmt(v)} |" for k, v in res.get("errors", {}).items()),
        ]
        if b := res.get("batched"):
            lines += [
                "",
                f"Batched ({b['system']}): {b['requests']} requests, each its own reference and scale, in one "
                f"`pipe.batch` call {b['batched_ms']:.1f} ms against {b['singles_ms']:.1f} ms as single calls "
                f"({b['speedup']:.2f}x); largest error of a batched request against itself alone "
                f"{_fmt(b['max_rel_l2_batched_vs_alone'])}.",
            ]
        if c := res.get("controls"):
            costs = ", ".join(f"{k} {v:.3f}" for k, v in c.items() if k.endswith("_ms"))
            lines += ["", f"Live controls ({c['system']}, ms): {costs}; recaptures caused: {c['recaptures']}."]
    video = report["stages"].get("video", {}).get("result", {})
    if video.get("rows"):
        lines += ["", f"## AnimateDiff {video.get('frames')} frames", "", "| workload | system | median ms | err |"]
        lines += ["|---|---|---|---|"]
        for r in video["rows"]:
            lines.append(f"| {r['workload']} | {r['system']} | {r['median_ms']:.1f} | {_fmt(r.get('latent_rel_l2'))} |")
    for stage, title in (("flux", "Flux.1"), ("kolors", "Kolors"), ("sd3", "SD3.5")):
        res = report["stages"].get(stage, {}).get("result", {})
        if res.get("rows"):
            lines += ["", f"## {title} ({res['rows'][0]['family']})", "", "| workload | system | median ms | err |"]
            lines += ["|---|---|---|---|"]
            for r in res["rows"]:
                err = _fmt(r.get("latent_rel_l2"))
                lines.append(f"| {r['workload']} | {r['system']} | {r['median_ms']:.1f} | {err} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for first-light.{json,md,log}")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all stages (default 9 minutes)")
    parser.add_argument("--rehearse", action="store_true", help="CPU, tiny models: check the kit, not the GPU")
    parser.add_argument("--work", type=Path, default=None, help="models and stage files (default: a temp folder)")
    parser.add_argument("--stages", default=None, help="comma-separated subset of the stages, in their order")
    parser.add_argument("--rehearsal-box", type=float, default=REHEARSAL_BOX_S, help="seconds per rehearsed stage")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"ipa_rt-first-light-{os.getpid()}"
    args.work.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in STAGES if args.stages is None or s.name in args.stages.split(",")]
    report: dict[str, Any] = {
        "kit": "benchmarks/gpu/first_light.py",
        "date": dt.date.today().isoformat(),
        "command": " ".join(["first_light.py", *(argv if argv is not None else sys.argv[1:])]),
        "rehearse": args.rehearse,
        "budget_s": args.budget,
        "stage_plan": [asdict(s) for s in chosen],
        "stages": {},
    }
    with open(args.out / "first-light.log", "a") as log:
        for stage in chosen:
            left = args.budget - (time.perf_counter() - started)
            box = min(args.rehearsal_box if args.rehearse else stage.box_s, left)
            if left < max(0.0 if args.rehearse else stage.min_left_s, 5.0):
                entry = {"status": f"skipped ({left:.0f} s left, needs {stage.min_left_s:.0f})", "seconds": 0}
                report["stages"][stage.name] = entry | {"box_s": 0, "result": {}}
            else:
                report["stages"][stage.name] = run_stage(stage, args, box, log)
            report["seconds"] = time.perf_counter() - started
            measured = measurements(report["stages"], args.rehearse)
            report["measured"], report["targets"] = measured, judge(measured)
            atomic_write(args.out / "first-light.json", json.dumps(report, indent=1, default=str))
            try:
                text = markdown(report)
            except Exception as exc:  # the tables are a view of the JSON: never lose the JSON to a rendering bug
                text = f"# GPU first light\n\nrendering failed ({type(exc).__name__}: {exc}); see first-light.json\n"
            atomic_write(args.out / "first-light.md", text)
    failed = [n for n, s in report["stages"].items() if s["status"] != "ok"]
    print(f"first light: {len(chosen) - len(failed)}/{len(chosen)} stages ok; results in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
