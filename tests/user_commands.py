"""``ipa_rt`` run as a user types it, in a process of its own: the environment it gets, a free port, a server started
and waited for (then stopped with Ctrl-C), and the clients that ask the demo and the HTTP server. The clients are
scripts, run with whichever Python has the extra (this one, or an extra's clean venv: tests/test_extras.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# what the suite sets for itself (conftest, the session's kept exports) and a clean venv's user would not have
SUITE_ONLY = ("IPA_RT_", "PYTHON", "VIRTUAL_ENV", "TRITON")
# kept in this Python's runs: two xdist workers share two cores, and conftest's thread limit keeps a command's
# process to one of them
KEEP = ("IPA_RT_CPU_THREADS",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_on(port: int) -> set[str]:
    """The addresses this machine listens on at TCP ``port`` (Linux: read from /proc/net/tcp and tcp6), so a test
    can tell a server bound to loopback from one bound to every interface."""
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path("/proc/net") / table
        for line in path.read_text().splitlines()[1:] if path.exists() else []:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host order (little-endian here)
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(family, words))
    return found


def user_env(cache: Path, bin_dir: Path | None = None, clean: bool = False, **extra: str) -> dict[str, str]:
    """A user's environment with its own engine cache; ``clean`` drops the suite's settings as well (a fresh venv's
    user: no Triton interpreter, no kept exports); ``bin_dir`` goes first on ``PATH``."""
    drop = SUITE_ONLY if clean else ("IPA_RT_",)
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) or (not clean and k in KEEP)}
    env["IPA_RT_CACHE"] = str(cache)
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    return env | extra


def run(
    command: Sequence[str], argv: Sequence[str], cwd: Path, env: Mapping[str, str], timeout: float = 600
) -> subprocess.CompletedProcess:
    """``command`` (``[python, "-m", "ipa_rt"]`` or a console script) with ``argv``; output captured as text."""
    return subprocess.run(
        [*command, *argv], cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=timeout
    )  # fmt: skip


@dataclass
class Server:
    proc: subprocess.Popen
    log: Path
    port: int

    def said(self) -> str:
        return self.log.read_text(errors="replace")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def running(
    command: Sequence[str], cwd: Path, env: Mapping[str, str], ready: str, port: int, timeout: float = 300
) -> Iterator[Server]:
    """A server command started as a user starts it, waited for until it prints ``ready`` and its port answers;
    stopped with SIGINT (Ctrl-C: a clean shutdown) on leaving, killed if that takes over a minute."""
    log = cwd / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            list(command), cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(proc, log, port)
    try:
        deadline = time.monotonic() + timeout
        while ready not in server.said() or not _listening(port):  # the demo's page server starts after its line
            assert proc.poll() is None, f"{command} exited {proc.returncode}:\n{server.said()[-3000:]}"
            assert time.monotonic() < deadline, f"{command} did not start in {timeout} s:\n{server.said()[-3000:]}"
            time.sleep(0.5)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# the demo's page and one generation over its socket: the page's scale slider, the hello, the first frame (text
# only) and the frame for a moved slider; prints what it saw as JSON
DEMO_CLIENT = """
import asyncio, base64, io, json, sys, urllib.request
import websockets
from PIL import Image
port = int(sys.argv[1])
page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
slider = 'class="scale"' in page and 'type="range"' in page
def pixels(message):
    with Image.open(io.BytesIO(base64.b64decode(message["image"].split(",", 1)[1]))) as im:
        im.load()
        extrema = [list(e) for e in im.convert("RGB").getextrema()]
        return {"format": im.format, "size": list(im.size), "extrema": extrema}
async def frame(ws):
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 300))
        assert msg["type"] != "error", msg
        if msg["type"] == "frame":
            return {"id": msg["id"], "latency_ms": msg["latency_ms"], "params": msg["params"], **pixels(msg)}
async def main():
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws", max_size=None) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 60))
        first = await frame(ws)
        moved = [hello["max_scale"] / 2] * len(hello["scales"])
        await ws.send(json.dumps({"type": "params", "scales": moved}))
        second = await frame(ws)
        print(json.dumps({"page_has_scale_slider": slider, "hello": hello, "frames": [first, second], "moved": moved}))
asyncio.run(main())
"""

# one generation over HTTP, the JSON body from argv; prints what came back as JSON
SERVE_CLIENT = """
import io, json, sys, urllib.request
from PIL import Image
port, body = int(sys.argv[1]), sys.argv[2].encode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/generate", body, {"content-type": "application/json"})
with urllib.request.urlopen(req, timeout=300) as answer:
    kind, png = answer.headers["content-type"], answer.read()
with Image.open(io.BytesIO(png)) as im:
    im.load()
    print(json.dumps({"content_type": kind, "bytes": len(png), "format": im.format, "size": list(im.size),
                      "extrema": [list(e) for e in im.convert("RGB").getextrema()]}))
"""


def ask(python: str | Path, client: str, server: Server, *args: str, timeout: float = 600) -> dict:
    """Run a client script against ``server`` with ``python``; what it printed, parsed."""
    argv = [str(python), "-c", client, str(server.port), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"client failed:\n{done.stdout}{done.stderr}\nserver log:\n{server.said()[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])
