"""Serving load test on loopback: N concurrent HTTP clients against a local ``ipa_rt serve`` (Ray Serve), bounded in
request count and time, stopping by itself (``ipa_rt bench --profile serve``).

Each client posts a JSON request with its own prompt, reference image, scale and seed and records the status,
latency and the batch size the replica formed (``X-Batch-Size``). Reports requests/s, p50/p95/p99 latency, the
batch sizes formed and errors by status; ``--compare`` runs the same load with ``max_batch_size=1`` first, so
throughput batched vs unbatched sits side by side. ``--kill-after K`` kills one model replica after K answers: every
request must still get an image or a clear error (Ray replaces the replica; the gateway retries once).

    ipa_rt bench --profile serve --compare                 # tiny model, 2 replicas, 80 requests, 8 clients
    ipa_rt bench --profile serve --full --size 256 --steps 4 --compare
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import io
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from common import environment, serve_table, write_results

from ipa_rt import testing as T
from ipa_rt.serving.cli import start
from ipa_rt.serving.config import ModelSpec, ServeConfig


def reference_images(count: int = 4) -> list[str]:
    out = []
    for seed in range(count):
        buf = io.BytesIO()
        T.make_image(seed=seed, size=(64, 64)).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def kill_one_replica(app: str = "ipa_rt") -> str:
    """``ray.kill`` one live model replica (the actor dies at once, mid-request if it is in one)."""
    import ray

    named = ray.util.list_named_actors(all_namespaces=True)  # Serve names replicas SERVE_REPLICA::app#deployment#id
    victim = next(a for a in named if a["name"].startswith(f"SERVE_REPLICA::{app}#model-"))
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    return victim["name"]


def drive(url: str, requests: int, concurrency: int, steps: int, size: int | None, timeout_s: float,
          kill_after: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """``requests`` posts from ``concurrency`` clients; each answer's status, latency, batch size and content type."""
    import httpx

    refs, rng = reference_images(), random.Random(0)
    bodies = [
        {"prompt": f"request {i}", "steps": steps, "seed": i, "scale": round(rng.uniform(0.0, 1.0), 2),
         **({"image": refs[i % len(refs)]} if i % 4 else {}),  # every fourth request is text only
         **({"height": size, "width": size} if size else {})}
        for i in range(requests)
    ]  # fmt: skip
    answers: list[dict[str, Any]] = []
    lock, killed = threading.Lock(), []

    def one(body: dict) -> None:
        t0 = time.perf_counter()
        try:
            with httpx.Client(timeout=timeout_s) as client:
                r = client.post(url, json=body)
            kind = r.headers.get("content-type", "")
            answer = {"status": r.status_code, "type": kind, "batch": int(r.headers.get("x-batch-size", 0)),
                      "png": r.content[:8] == b"\x89PNG\r\n\x1a\n",
                      "error": r.json() if kind.startswith("application/json") else None}  # fmt: skip
        except httpx.HTTPError as exc:  # no answer at all: a lost request
            answer = {"status": 0, "type": "", "batch": 0, "png": False, "error": f"{type(exc).__name__}: {exc}"}
        answer["latency_s"] = time.perf_counter() - t0
        with lock:
            answers.append(answer)
            if kill_after is not None and len(answers) == kill_after and not killed:
                killed.append(kill_one_replica())

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, bodies))
    return answers


def summarize(answers: list[dict[str, Any]], wall_s: float, max_batch_size: int) -> dict[str, Any]:
    ok = [a for a in answers if a["status"] == 200]
    lat = sorted(a["latency_s"] for a in ok) or [float("nan")]

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))]

    return {
        "max_batch_size": max_batch_size,
        "requests": len(answers),
        "ok": len(ok),
        "lost": sum(a["status"] == 0 for a in answers),
        "errors_by_status": dict(Counter(a["status"] for a in answers if a["status"] != 200)),
        "wall_s": round(wall_s, 2),
        "requests_per_s": round(len(ok) / wall_s, 3),
        "latency_s": {f"p{p}": round(pct(p), 3) for p in (50, 95, 99)} | {"mean": round(statistics.fmean(lat), 3)},
        "batch_sizes_formed": dict(sorted(Counter(a["batch"] for a in ok).items())),
    }


def model_spec(args: argparse.Namespace, work: Path) -> ModelSpec:
    if args.full:  # full-size SD1.5 + IP-Adapter, random weights in the real formats (benchmarks/models.py)
        from models import write_models

        files = write_models(work)
        return ModelSpec(base=str(files["base"]), ip_adapter=[str(files["adapter"])], default_steps=args.steps)
    files = T.write_example(work)
    return ModelSpec(base=str(files["base"]), ip_adapter=[str(files["adapter"])], default_steps=args.steps)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start Ray + the app, drive the load (once per batch setting), stop; the results dict."""
    import ray
    from ray import serve

    with tempfile.TemporaryDirectory(prefix="ipa_rt-serve-bench-") as work:
        spec = model_spec(args, Path(work))
        ray.init(num_cpus=max(args.replicas, 2), include_dashboard=False, ignore_reinit_error=True,
                 log_to_driver=False)  # fmt: skip
        runs = []
        try:
            for batch in [1, args.max_batch_size] if args.compare else [args.max_batch_size]:
                config = ServeConfig(
                    models={"bench": spec}, num_replicas=args.replicas, max_batch_size=batch,
                    max_ongoing_requests=max(batch, 2) * 2, batch_wait_timeout_s=args.wait, port=args.port,
                    threads=args.threads, num_cpus=1, max_queued_requests=args.requests,
                )  # fmt: skip
                start(config)
                url = f"http://127.0.0.1:{args.port}/v1/generate"
                drive(url, 2 * args.replicas, args.replicas, args.steps, args.size, args.timeout)  # warm-up
                t0 = time.perf_counter()
                answers = drive(url, args.requests, args.concurrency, args.steps, args.size, args.timeout,
                                args.kill_after)  # fmt: skip
                runs.append(summarize(answers, time.perf_counter() - t0, batch) | {"answers": answers})
                serve.delete("ipa_rt")
        finally:
            serve.shutdown()
            ray.shutdown()
    return {
        "profile": "serve",
        "date": dt.date.today().isoformat(),
        "environment": environment(torch.device("cpu")),
        "model": "full-size SD1.5 + IP-Adapter (random weights)" if args.full else "tiny fixture",
        "replicas": args.replicas, "concurrency": args.concurrency, "steps": args.steps, "size": args.size,
        "kill_after": args.kill_after,
        "runs": [{k: v for k, v in r.items() if k != "answers"} for r in runs],
        "answers": [r["answers"] for r in runs],
    }  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    return "\n".join([f"# ipa_rt bench — profile serve ({result['model']})", "", *serve_table(result)]) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ipa_rt bench --profile serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="full-size SD1.5 (random weights) instead of the tiny fixture")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--requests", type=int, default=80)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--wait", type=float, default=0.05, help="serve.batch wait timeout (s)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--compare", action="store_true", help="run max_batch_size=1 first, then batched")
    p.add_argument("--kill-after", type=int, default=None, help="kill one replica after this many answers")
    p.add_argument("--timeout", type=float, default=600.0, help="client timeout per request (s)")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--no-write", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    result = run(args)
    md = markdown(result)
    result["ok"] = all(r["lost"] == 0 for r in result["runs"])
    print(md)
    if not args.no_write:
        stamp = f"{result['date']}-serve" + ("-full" if args.full else "-tiny")
        write_results(args.out, stamp, result, md, hardware="cpu")
    return result


if __name__ == "__main__":
    sys.argv[0] = "serve.py"
    main()
