"""Soak: ``ipa_rt serve`` (the example models, 2 replicas, started as a user starts it) held under load for a bounded
time by concurrent clients on loopback, or the same request mix against the Python API in one process
(``--target api``: the caches only, no Ray). ``ipa_rt bench --profile soak``.

Every request carries a fresh random reference image (a share repeats one of a few references, a share is text
only), a random scale, prompt, seed and size; a share is bad on purpose (not JSON, not an image, a scale out of range,
an unknown field or model, a size that is not a multiple of 8, too many steps, an image over the pixel limit) and must
be answered with its 4xx. The resident memory of every replica, the proxy and the rest of the server is sampled every
few seconds; latency p50/p99 and answers are kept per window (a minute by default).

Pass: no request lost (every one answered: an image, or a 4xx/503/504 with a reason in JSON), no answer of the wrong
kind, the resident memory of every replica and of the proxy grows by at most 5% from the first window after warm-up
to the last, and p99 in the last window within 1.5x the first's.

    ipa_rt bench --profile soak                          # 10 minutes after 1 minute of warm-up, 4 clients
    ipa_rt bench --profile soak --target api             # the Python API in this process
    ipa_rt bench --profile soak --duration 60 --warmup 20 --no-write
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as dt
import io
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from common import environment, soak_lines, write_results
from PIL import Image

MEMORY_GROWTH_MAX = 0.05  # the bound: resident memory after warm-up grows by at most 5%
P99_RATIO_MAX = 1.5  # p99 in the last window within 1.5x the first window's
WATCHED = ("replica", "proxy", "api")  # the processes the memory bound applies to; the others are reported beside them
MEMORY_OF = {"serve": "replicas, proxy", "api": "the process"}
WHAT = {
    "serve": "`ipa_rt serve --example --num-replicas {replicas}` (tiny random SD1.5 + IP-Adapter)",
    "api": "ipa_rt.Pipeline (tiny random SD1.5 + IP-Adapter) in one process; each bad request becomes the API's own "
    "bad argument of its kind, refused with an IpaRtError (counted as 422)",
}
WORDS = "cat dog fox owl tree river city night neon oil painting photo portrait castle forest glass storm".split()


@dataclass
class SoakConfig:
    target: str = "serve"  # "serve": HTTP against `ipa_rt serve --example`; "api": ipa_rt.Pipeline in this process
    duration_s: float = 600.0  # measured time, after the warm-up
    warmup_s: float = 60.0
    window_s: float = 60.0  # latency and memory are compared per window: the first after warm-up against the last
    clients: int = 4  # concurrent clients (the API target: one caller, a Pipeline is one stream like diffusers')
    replicas: int = 2
    sample_s: float = 3.0  # memory sampling period
    repeat_share: float = 0.2  # requests reusing one of a few references (the reference cache's hits)
    text_share: float = 0.1  # text-only requests
    bad_share: float = 0.1  # requests that must be refused with a 4xx
    seed: int = 0
    timeout_s: float = 120.0  # per request; no answer within it is a lost request
    port: int = 0  # 0: a free one


@dataclass
class Sample:
    t: float  # seconds since the load started
    role: str  # "replica-1", "proxy", "gateway", "controller", "raylet", "gcs", "serve", "api"
    pid: int
    rss: int  # bytes
    extra: dict[str, Any] = field(default_factory=dict)  # the API target: its caches' entries and bytes


@dataclass
class Answer:
    t: float  # start, seconds since the load started
    latency_s: float
    kind: str  # "fresh", "repeat", "text" or a bad request's name
    expect: int  # 200, or the status a bad request must get
    status: int  # the HTTP status (the API target: 200, or 422 for an IpaRtError); 0: no answer
    reason: str | None  # the error's text, if any

    @property
    def answered(self) -> bool:
        """An image, or a 4xx/503/504 with a reason; anything else (no answer, a 500, an empty error) is lost."""
        return self.status == 200 or ((400 <= self.status < 500 or self.status in (503, 504)) and bool(self.reason))

    @property
    def wrong(self) -> bool:
        """Answered, but not as this request should be: a good one refused (other than 503/504 for load), a bad one
        given an image or another status."""
        if not self.answered or self.status in (503, 504):
            return False
        return self.status != self.expect


# ---- the request mix ------------------------------------------------------------------------------------------------


def noise_png(rng: random.Random, side: int | None = None) -> bytes:
    """A fresh random reference: noise over a random colour ramp, 24-96 px a side (never seen before: a cache miss)."""
    side = side or rng.randrange(24, 97)
    gen = np.random.default_rng(rng.getrandbits(32))
    ramp = np.linspace(0, 255, side)[None, :, None] * gen.random(3)[None, None, :]
    pixels = np.clip(ramp + gen.normal(0, 40, (side, side, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def huge_png() -> bytes:
    """A small file of a 5000x5000 image: over the server's 4096x4096 pixel limit, refused before it is decoded."""
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Request:
    kind: str
    expect: int
    fields: dict[str, Any]  # the JSON fields (the image as PNG bytes, base64-encoded on the way out)
    raw: bytes | None = None  # a body sent as is (not JSON)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# each bad request: its name, the status it must get, what it changes in a good request's fields
BAD: tuple[tuple[str, int, Callable[[dict], dict]], ...] = (
    ("not_json", 400, lambda f: f),  # sent as a raw body
    ("not_base64", 422, lambda f: f | {"image": "%%% not base64 %%%"}),
    ("not_an_image", 422, lambda f: f | {"image": b64(b"GIF89a but not really an image")}),
    ("scale_out_of_range", 422, lambda f: f | {"scale": 1e6}),
    ("unknown_field", 400, lambda f: f | {"strength": 0.5}),
    ("unknown_model", 404, lambda f: f | {"model": "no-such-model"}),
    ("size_not_multiple_of_8", 422, lambda f: f | {"height": 36}),
    ("too_many_steps", 422, lambda f: f | {"steps": 100_000}),
    ("over_pixel_limit", 413, lambda f: f | {"image": "huge"}),
)


class Mix:
    """One client's stream of requests (its own RNG: a run is reproducible per seed and client)."""

    def __init__(self, config: SoakConfig, client: int, shared_refs: list[bytes], huge: bytes) -> None:
        self.rng = random.Random(config.seed * 1000 + client)
        self.config, self.shared_refs, self.huge = config, shared_refs, huge

    def next(self) -> Request:
        rng, c = self.rng, self.config
        side = rng.choice((None, 32, 48))
        fields: dict[str, Any] = {
            "prompt": " ".join(rng.choices(WORDS, k=rng.randrange(1, 8))),
            "seed": rng.randrange(2**31),
            "scale": round(rng.uniform(0.0, 1.5), 3),
            "steps": rng.choice((2, 3, 4)),
            **({"height": side, "width": side} if side else {}),
        }
        roll = rng.random()
        if roll < c.bad_share:
            name, status, change = rng.choice(BAD)
            fields = change(fields | {"image": noise_png(rng, 24)})
            if fields.get("image") == "huge":
                fields["image"] = self.huge
            return Request(name, status, fields, raw=b'{"prompt": "cut off' if name == "not_json" else None)
        if roll < c.bad_share + c.text_share:
            return Request("text", 200, fields)
        if roll < c.bad_share + c.text_share + c.repeat_share:
            return Request("repeat", 200, fields | {"image": rng.choice(self.shared_refs)})
        return Request("fresh", 200, fields | {"image": noise_png(rng)})


def http_body(req: Request) -> bytes:
    if req.raw is not None:
        return req.raw
    f = dict(req.fields)
    if isinstance(f.get("image"), bytes):
        f["image"] = b64(f["image"])
    return json.dumps(f).encode()


# ---- targets: where requests go and which processes are watched ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def role_of(proc: psutil.Process) -> str | None:
    """What a process of the server is, from its title (Ray names its workers ``ray::<actor>``)."""
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    for title, role in (("ServeReplica:ipa_rt:model-", "replica"), ("ServeReplica:ipa_rt:gateway", "gateway"),
                        ("ray::ProxyActor", "proxy"), ("ray::ServeController", "controller"),
                        ("/raylet ", "raylet"), ("/gcs_server ", "gcs")):  # fmt: skip
        if title in cmd:
            return role
    return None


class ServeTarget:
    """``python -m ipa_rt serve --example`` in its own session, as a user starts it; stopped with SIGINT."""

    name = "serve"

    def __init__(self, config: SoakConfig, work: Path) -> None:
        self.config, self.work = config, work
        self.port = config.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/generate"
        self.labels: dict[int, str] = {}  # replica pid -> "replica-1", ...
        self.exit_code: int | None = None  # after SIGINT; None: it did not stop by itself
        self.local = threading.local()

    @contextmanager
    def running(self) -> Iterator[ServeTarget]:
        log = self.work / "serve.log"
        argv = [sys.executable, "-m", "ipa_rt", "serve", "--example", "--num-replicas", str(self.config.replicas),
                "--port", str(self.port)]  # fmt: skip
        # a Ray folder of its own: another local cluster's `ray.init(address="auto")` (a test's) must not find this
        # one; short, as Ray's socket paths must be
        ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        env = dict(os.environ, RAY_TMPDIR=ray_dir)
        with open(log, "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 300
        try:
            while "Ctrl-C stops" not in log.read_text():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ipa_rt serve did not start:\n{log.read_text()[-3000:]}")
                time.sleep(1)
            yield self
            self.proc.send_signal(signal.SIGINT)
            try:
                self.exit_code = self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:  # not stopped by SIGINT: the check fails, the group is killed below
                self.exit_code = None
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.exit_code = None
            shutil.rmtree(ray_dir, ignore_errors=True)

    def expected(self, req: Request) -> int:
        return req.expect

    def send(self, req: Request) -> tuple[int, str | None]:
        import httpx

        client = getattr(self.local, "client", None)
        if client is None:  # one keep-alive connection per client thread, as a real client holds
            client = self.local.client = httpx.Client(timeout=self.config.timeout_s)
        try:
            r = client.post(self.url, content=http_body(req), headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:
            return 0, f"{type(exc).__name__}: {exc}"
        if r.status_code == 200:
            return (200, None) if r.content[:8] == b"\x89PNG\r\n\x1a\n" else (0, "200 without a PNG")
        try:
            reason = r.json().get("error")
        except ValueError:
            reason = None
        return r.status_code, reason

    def samples(self, t: float) -> list[Sample]:
        out = []
        try:
            procs = [self.proc_handle(), *self.proc_handle().children(recursive=True)]
        except psutil.NoSuchProcess:
            return out
        for p in procs:
            role = "serve" if p.pid == self.proc.pid else role_of(p)
            if role is None:
                continue
            if role == "replica":  # numbered in the order first seen: a replaced replica gets the next number
                role = self.labels.setdefault(p.pid, f"replica-{len(self.labels) + 1}")
            try:
                out.append(Sample(t, role, p.pid, p.memory_info().rss))
            except psutil.NoSuchProcess:
                pass
        return out

    def proc_handle(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)


class ApiTarget:
    """``ipa_rt.Pipeline`` on the same example model in this process; requests become ``pipe(...)`` calls, a bad one
    must raise an :class:`ipa_rt.IpaRtError` (counted as the 4xx it would be over HTTP)."""

    name = "api"

    def __init__(self, config: SoakConfig, work: Path) -> None:
        self.config, self.work = config, work
        self.lock = threading.Lock()  # one caller at a time: a Pipeline is one stream, like a diffusers pipeline
        self.exit_code = 0

    @contextmanager
    def running(self) -> Iterator[ApiTarget]:
        import ipa_rt
        from ipa_rt import testing as T

        files = T.write_example(self.work)
        self.pipe = ipa_rt.Pipeline.from_pretrained(str(files["base"]), ip_adapter=str(files["adapter"]))
        self.pipe.set_progress_bar_config(disable=True)
        yield self

    def arguments(self, req: Request) -> dict[str, Any]:
        """The ``pipe(...)`` call a request stands for; a bad one becomes the API's own bad input of that kind (a
        fault only HTTP has, a body or a field or model name, becomes a missing reference file)."""
        f = req.fields
        image = f.get("image")
        kw = {"prompt": f["prompt"], "num_inference_steps": f["steps"], "height": f.get("height"),
              "width": f.get("width"), "scale": f["scale"]}  # fmt: skip
        if isinstance(image, bytes) and req.kind != "not_an_image":  # the API takes images, not files' bytes
            image = Image.open(io.BytesIO(image))
        kw["ip_adapter_image"] = image
        bad = {
            "not_an_image": {},  # the bytes themselves: not an image the API takes
            "scale_out_of_range": {"scale": math.nan},  # the API takes any finite scale; NaN it must refuse
            "too_many_steps": {"num_inference_steps": 0},  # the API has no step bound; 0 it must refuse
            "over_pixel_limit": {"ip_adapter_image": 123},  # no pixel bound either: a value that is no image
            "size_not_multiple_of_8": {},
        }
        missing = {"ip_adapter_image": str(self.work / "no-such-reference.png")}
        return kw | (bad.get(req.kind, missing) if req.expect != 200 else {})

    def expected(self, req: Request) -> int:
        return 200 if req.expect == 200 else 422  # every bad call: an IpaRtError, counted as a 422

    def send(self, req: Request) -> tuple[int, str | None]:
        from ipa_rt.errors import IpaRtError

        kw = self.arguments(req)
        try:
            with self.lock:
                self.pipe.set_ip_adapter_scale(kw.pop("scale"))
                self.pipe(**kw, generator=torch.Generator().manual_seed(req.fields["seed"]))
        except IpaRtError as exc:
            return 422, str(exc)
        return 200, None

    def samples(self, t: float) -> list[Sample]:
        with self.lock:  # between calls: the caches are not read while a call changes them
            stats = self.pipe.cache_stats()
        extra = {name: {"entries": s["entries"], "bytes": s["bytes"]} for name, s in stats.items()}
        return [Sample(t, "api", os.getpid(), psutil.Process().memory_info().rss, extra)]


# ---- the run ---------------------------------------------------------------------------------------------------------


def soak(config: SoakConfig) -> dict[str, Any]:
    """Start the target, drive it for warm-up + duration while sampling memory, stop it; answers and samples."""
    with tempfile.TemporaryDirectory(prefix="ipa_rt-soak-") as work:
        target = (ServeTarget if config.target == "serve" else ApiTarget)(config, Path(work))
        with target.running():
            shared = [noise_png(random.Random(config.seed + 7 * i)) for i in range(6)]
            huge = huge_png()
            answers: list[Answer] = []
            samples: list[Sample] = []
            lock, stop = threading.Lock(), threading.Event()
            t0 = time.monotonic()
            end = t0 + config.warmup_s + config.duration_s

            def client(k: int) -> None:
                mix = Mix(config, k, shared, huge)
                while time.monotonic() < end:
                    req = mix.next()
                    start = time.monotonic()
                    status, reason = target.send(req)
                    a = Answer(start - t0, time.monotonic() - start, req.kind, target.expected(req), status, reason)
                    with lock:
                        answers.append(a)

            def sampler() -> None:
                while not stop.is_set():
                    got = target.samples(time.monotonic() - t0)
                    with lock:
                        samples.extend(got)
                    stop.wait(config.sample_s)

            watcher = threading.Thread(target=sampler, daemon=True)
            watcher.start()
            clients = [threading.Thread(target=client, args=(k,)) for k in range(config.clients)]
            for c in clients:
                c.start()
            for c in clients:
                c.join()
            stop.set()
            watcher.join()
        return {"answers": answers, "samples": samples, "exit_code": target.exit_code}


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank), NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def summarize(config: SoakConfig, answers: list[Answer], samples: list[Sample]) -> dict[str, Any]:
    """Per window: requests, images, p50/p99 of the images' latency; per process: resident memory per window and
    its growth; errors by kind; the verdict."""
    w, warm = config.window_s, config.warmup_s
    windows = max(1, round(config.duration_s / w))

    def window_of(t: float) -> int | None:  # None: warm-up
        return None if t < warm else min(windows - 1, int((t - warm) // w))

    per_window = []
    for i in range(windows):
        got = [a for a in answers if window_of(a.t) == i]
        lat = [a.latency_s for a in got if a.status == 200]
        per_window.append({"window": i, "start_s": round(warm + i * w), "requests": len(got), "images": len(lat),
                           "p50_s": round(pct(lat, 50), 4), "p99_s": round(pct(lat, 99), 4)})  # fmt: skip

    memory = {}
    for key in sorted({(s.role, s.pid) for s in samples}):
        mine = [s for s in samples if (s.role, s.pid) == key]
        first = [s.rss for s in mine if window_of(s.t) == 0]
        last = [s.rss for s in mine if window_of(s.t) == windows - 1]
        row = {"role": key[0], "pid": key[1], "samples": len(mine),
               "warmup_mb": round(statistics.median([s.rss for s in mine if s.t < warm] or [0]) / 2**20, 1),
               "first_mb": round(statistics.median(first) / 2**20, 1) if first else None,
               "last_mb": round(statistics.median(last) / 2**20, 1) if last else None,
               "peak_mb": round(max(s.rss for s in mine) / 2**20, 1)}  # fmt: skip
        row["growth"] = round(row["last_mb"] / row["first_mb"] - 1, 4) if first and last else None
        if mine[-1].extra:
            row["caches_at_end"] = mine[-1].extra
        memory[f"{key[0]} (pid {key[1]})"] = row

    measured = [a for a in answers if a.t >= warm]
    lost = [a for a in answers if not a.answered]
    wrong = [a for a in answers if a.wrong]
    watched = [m for m in memory.values() if m["role"].split("-")[0] in WATCHED]
    growth = max((m["growth"] for m in watched if m["growth"] is not None), default=math.nan)
    p99_ratio = per_window[-1]["p99_s"] / per_window[0]["p99_s"] if per_window[0]["images"] else math.nan
    checks = {
        "no request lost": not lost,
        "no wrong answer": not wrong,
        f"memory growth <= {MEMORY_GROWTH_MAX:.0%} ({MEMORY_OF[config.target]})": bool(watched)
        and growth <= MEMORY_GROWTH_MAX,
        f"p99 last/first window <= {P99_RATIO_MAX}": p99_ratio <= P99_RATIO_MAX,
    }
    by_kind = Counter(a.kind for a in answers)
    return {
        "requests": len(answers), "measured_requests": len(measured),
        "images": sum(a.status == 200 for a in answers),
        "requests_per_s": round(len(measured) / config.duration_s, 3),
        "lost": len(lost), "wrong": len(wrong),
        "lost_examples": [dataclasses.asdict(a) for a in lost[:5]],
        "wrong_examples": [dataclasses.asdict(a) for a in wrong[:5]],
        "requests_by_kind": dict(sorted(by_kind.items())),
        "answers_by_kind": {k: dict(Counter(a.status for a in answers if a.kind == k)) for k in sorted(by_kind)},
        "windows": per_window, "memory": memory,
        "max_memory_growth": growth, "p99_ratio": round(p99_ratio, 3),
        "checks": checks, "passed": all(checks.values()),
    }  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    return (
        "\n".join([f"# ipa_rt soak — {result['config']['target']} ({result['date']})", "", *soak_lines(result)]) + "\n"
    )


def run(config: SoakConfig) -> dict[str, Any]:
    got = soak(config)
    summary = summarize(config, got["answers"], got["samples"])
    if config.target == "serve":
        summary["checks"]["server shut down cleanly on SIGINT"] = got["exit_code"] == 0
        summary["passed"] = all(summary["checks"].values())
    return {
        "profile": "soak",
        "date": dt.date.today().isoformat(),
        "environment": environment(torch.device("cpu")),
        "what": WHAT[config.target].format(replicas=config.replicas),
        "config": dataclasses.asdict(config),
        "exit_code": got["exit_code"] if config.target == "serve" else None,
        "summary": summary,
        "samples": [dataclasses.asdict(s) for s in got["samples"]],
    }  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ipa_rt bench --profile soak", description=__doc__.split("\n\n")[0])
    d = SoakConfig()
    p.add_argument("--target", choices=("serve", "api"), default=d.target)
    p.add_argument("--duration", type=float, default=d.duration_s, help="measured seconds, after the warm-up")
    p.add_argument("--warmup", type=float, default=d.warmup_s)
    p.add_argument("--window", type=float, default=None, help="seconds per window (default: 60, or a third of "
                   "a shorter run)")  # fmt: skip
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (default 4; the API target 1)")
    p.add_argument("--replicas", type=int, default=d.replicas)
    p.add_argument("--sample", type=float, default=d.sample_s, help="memory sampling period (s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--no-write", action="store_true")
    return p


def config_from(args: argparse.Namespace) -> SoakConfig:
    return SoakConfig(
        target=args.target, duration_s=args.duration, warmup_s=args.warmup,
        window_s=args.window or min(60.0, args.duration / 3),
        clients=args.clients or (1 if args.target == "api" else 4), replicas=args.replicas, sample_s=args.sample,
        seed=args.seed, port=args.port,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    config = config_from(args)
    result = run(config)
    md = markdown(result)
    print(md)
    if not args.no_write:
        write_results(args.out, f"{result['date']}-soak-{config.target}", result, md, "cpu")
    return result


if __name__ == "__main__":
    sys.argv[0] = "soak.py"
    main()
