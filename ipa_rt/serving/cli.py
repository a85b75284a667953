"""``ipa_rt serve``: start the Ray Serve application and keep it up until SIGINT/SIGTERM, then shut down gracefully
(docs/guides/serving.md: how to run it; docs/reference/cli.md: every option).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

from ..console import reachable_from_others
from ..errors import ConfigError, IpaRtError, require_extra
from .auth import ENV, ApiKey
from .config import ServeConfig, example_config

OPTIONS = ("num_replicas", "max_batch_size", "batch_wait_timeout_s", "max_queued_requests", "max_ongoing_requests",
           "num_gpus", "num_cpus", "threads", "host", "port")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ipa_rt serve", description="Serve IP-Adapter generation over HTTP on Ray Serve.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--example", action="store_true", help="a tiny random model written here (offline, CPU)")
    src.add_argument("--config", metavar="FILE", help="JSON serve config (models and options)")
    p.add_argument("--address", default=None, help="Ray cluster ('auto': the running one); default: start one")
    p.add_argument("--num-replicas", type=int, help="replicas per model")
    p.add_argument("--max-batch-size", type=int, help="serve.batch: requests per UNet batch")
    p.add_argument("--batch-wait-timeout-s", type=float, help="serve.batch: how long a batch waits to fill")
    p.add_argument("--max-queued-requests", type=int, help="queued requests per model before 503")
    p.add_argument("--max-ongoing-requests", type=int, help="requests a replica holds at once")
    p.add_argument("--num-gpus", type=float, help="GPUs per replica (1: each replica its own GPU)")
    p.add_argument("--num-cpus", type=float, help="CPUs per replica")
    p.add_argument("--threads", type=int, help="torch threads per replica")
    p.add_argument("--host", help="HTTP host (default 127.0.0.1; 0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' on every endpoint but /healthz (default: ${ENV}, else the config's "
        f"api_key; ${ENV} keeps the key out of the process list)",
    )
    return p


def api_key_from(args: argparse.Namespace) -> ApiKey | None:
    """``--api-key``, else ``$IPA_RT_API_KEY``; None leaves the config file's ``api_key`` (or none) in force. A set
    but empty variable is an error, not "no key": it is more likely an unset shell variable than a wish."""
    if args.api_key is not None:
        return ApiKey(args.api_key, where="--api-key")
    if ENV in os.environ:
        return ApiKey(os.environ[ENV], where=f"the environment variable {ENV}")
    return None


def config_from(args: argparse.Namespace, work: str) -> ServeConfig:
    overrides = {k: getattr(args, k) for k in OPTIONS if getattr(args, k) is not None}
    key = api_key_from(args)
    if key is not None:
        overrides["api_key"] = key
    if args.example:
        return example_config(work, **overrides)
    config = dataclasses.replace(ServeConfig.from_file(args.config), **overrides)
    config.check()
    return config


def banner(config: ServeConfig) -> tuple[str, str | None]:
    """The line that says the server is up (whether it requires a key, never the key), and a caution when anyone
    who reaches the port could use it: bound beyond loopback without a key."""
    models = ", ".join(config.models)
    guard = "; every endpoint but /healthz requires an API key" if config.api_key is not None else ""
    ready = f"ipa_rt serve: {models} on http://{config.host}:{config.port}/v1/generate{guard} (Ctrl-C stops)"
    caution = None
    if config.api_key is None and reachable_from_others(config.host):
        caution = (
            f"ipa_rt serve: listening on {config.host}, reachable from other machines, without an API key: anyone "
            f"who reaches port {config.port} can generate; set {ENV} (or --api-key), or bind 127.0.0.1"
        )
    return ready, caution


def start(config: ServeConfig, address: str | None = None, **ray_init: Any):
    """Connect to (or start) Ray, start Serve's HTTP proxy at the config's host and port, deploy the application.
    Returns the gateway's handle."""
    import ray
    from ray import serve

    from .app import build_app

    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, **ray_init)
    serve.start(http_options={"host": config.host, "port": config.port})
    return serve.run(build_app(config), name="ipa_rt", route_prefix="/")


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    try:
        require_extra("ipa_rt serve", "serve", ("ray", "fastapi"))
    except ConfigError as exc:
        print(f"ipa_rt serve: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="ipa_rt-serve-") as work:
        try:
            config = config_from(args, work)
            os.environ.pop(ENV, None)  # Ray's workers inherit this environment; the gateway needs only the digest
            start(config, args.address)
        except (IpaRtError, ConfigError) as exc:
            print(f"ipa_rt serve: error: {exc}", file=sys.stderr)
            return 2
        ready, caution = banner(config)
        print(ready, flush=True)
        if caution:
            print(caution, file=sys.stderr, flush=True)
        stop.wait()
        from ray import serve

        print("ipa_rt serve: shutting down (in-flight requests finish first)", flush=True)
        serve.shutdown()
    return 0
