"""``ipa_rt serve`` end to end: the CLI starts Ray Serve on the tiny example (2 replicas, CPU), curl gets images,
bad requests get 4xx naming the field, a full queue gets 503 with Retry-After, a replica killed mid-run loses no
request, and SIGINT shuts the server down gracefully. Also the config errors, without Ray."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from user_commands import free_port

import ipa_rt
from ipa_rt.serving.config import ServeConfig

pytest.importorskip("ray.serve", reason="ipa_rt serve needs Ray Serve (pip install 'ipa_rt[serve]')")
httpx = pytest.importorskip("httpx")
REPO = Path(__file__).resolve().parent.parent
QUEUE = 4  # --max-queued-requests of the server under test
# serve.batch's wait for a batch to fill: with the default 0.05 s a loaded 2-core machine (the other test worker
# busy) dispatched a burst's requests further apart than that, and every batch held one request
BATCH_WAIT = 0.5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``ipa_rt serve --example`` in its own process, as a user starts it; stopped with SIGINT at the end."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    argv = [sys.executable, "-m", "ipa_rt", "serve", "--example", "--port", str(port), "--num-replicas", "2",
            "--max-batch-size", "4", "--max-ongoing-requests", "4", "--max-queued-requests", str(QUEUE),
            "--batch-wait-timeout-s", str(BATCH_WAIT)]  # fmt: skip
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 240
    while "Ctrl-C stops" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"ipa_rt serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    yield {"url": f"http://127.0.0.1:{port}", "proc": proc, "log": log}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def post(server, timeout: float = 120, **kw) -> httpx.Response:
    return httpx.post(server["url"] + "/v1/generate", timeout=timeout, **kw)


@pytest.mark.slow
def test_curl_gets_images_from_the_example_server(server, images, tmp_path):
    from PIL import Image

    ref = tmp_path / "ref.png"
    images[0].save(ref)
    png, jpeg = tmp_path / "out.png", tmp_path / "out.jpg"
    url = server["url"] + "/v1/generate"
    json_call = ["curl", "-sf", "-o", str(png), "-H", "content-type: application/json", "-d",
                 json.dumps({"prompt": "a cat", "steps": 2, "seed": 1}), url]  # fmt: skip
    form_call = ["curl", "-sf", "-o", str(jpeg), "-F", "prompt=a dog", "-F", f"image=@{ref}", "-F", "scale=0.6",
                 "-F", "format=jpeg", url]  # fmt: skip
    for call in (json_call, form_call):
        assert subprocess.run(call, timeout=120).returncode == 0
    with Image.open(png) as a, Image.open(jpeg) as b:
        assert (a.format, a.size, b.format, b.size) == ("PNG", (32, 32), "JPEG", (32, 32))
    assert httpx.get(server["url"] + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server["url"] + "/v1/models").json()["example"]["adapters"] == ["ip-adapter-base_sd15"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fields", "files", "status", "field"),
    [
        ({"prompt": "x"}, {"image": ("a.txt", b"not an image", "text/plain")}, 422, "image[0]"),
        ({"prompt": "x"}, {"image": ("big.png", b"\x89PNG" + bytes(9 << 20), "image/png")}, 413, "image[0]"),
        ({"prompt": "x", "scale": '{"style-adapter": 1.0}'}, {"image": "REF"}, 422, "scale"),
        ({"prompt": "x", "scale": "3.5"}, {"image": "REF"}, 422, "scale"),
        ({"prompt": "x", "steps": "0"}, None, 422, "steps"),
        ({"prompt": "x", "steps": "lots"}, None, 422, "steps"),
        ({"prompt": "x", "height": "30"}, None, 422, "height"),
        ({"prompt": "x", "model": "sdxl"}, None, 404, "model"),
        ({"prompt": "x", "colour": "red"}, None, 400, "colour"),
    ],
)
def test_bad_requests_get_4xx_naming_the_field_and_the_replica_keeps_serving(server, images, fields, files, status,
                                                                             field):  # fmt: skip
    if files and files["image"] == "REF":
        buf = io.BytesIO()
        images[0].save(buf, format="PNG")
        files = {"image": ("ref.png", buf.getvalue(), "image/png")}
    r = post(server, data=fields, files=files)
    assert r.status_code == status and r.json()["field"] == field, r.text
    assert post(server, json={"prompt": "fine", "steps": 1}).status_code == 200


@pytest.mark.slow
def test_without_a_key_nothing_asks_for_one(server):
    """No --api-key, no IPA_RT_API_KEY, no api_key in the config: every endpoint answers as before, whatever
    Authorization header comes (the key checks: test_serve_auth)."""
    for headers in ({}, {"Authorization": "Bearer anything"}, {"Authorization": "Basic eDp5"}):
        for path in ("/v1/models", "/docs", "/openapi.json", "/healthz"):
            r = httpx.get(server["url"] + path, headers=headers, timeout=60)
            assert r.status_code == 200 and "www-authenticate" not in r.headers, (path, headers, r.text[:200])
        assert post(server, json={"prompt": "x", "steps": 1}, headers=headers).status_code == 200
    assert "API key" not in server["log"].read_text()


@pytest.mark.slow
def test_bad_json_bodies(server):
    r = post(server, content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "body"
    r = post(server, json={"prompt": "x", "image": "%%%"})
    assert r.status_code == 422 and r.json()["field"] == "image[0]"


@pytest.mark.slow
def test_a_full_queue_gets_503_with_retry_after(server):
    """2 replicas x 4 ongoing + 4 queued: a burst of 32 overflows, the excess is refused at once, the rest served
    (20 steps: the first batches are still running when the burst has arrived, however fast the machine)."""
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda i: post(server, json={"prompt": f"p{i}", "steps": 20, "seed": i}), range(32)))
    refused = [r for r in answers if r.status_code == 503]
    assert refused and all(r.headers["retry-after"] == "2" and r.json()["field"] == "model" for r in refused)
    assert all(r.status_code in (200, 503) for r in answers)
    assert any(int(r.headers.get("x-batch-size", 0)) > 1 for r in answers)  # serve.batch formed real batches


def bench_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_serve", REPO / "benchmarks" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_killing_a_replica_mid_run_loses_no_request(server):
    """The load test's small version: 40 requests from 8 clients, one replica killed after 10 answers. Ray replaces
    it, the gateway retries what it held: every request gets an image or a clear JSON error."""
    import ray

    bench = bench_module()
    ray.init(address="auto", namespace="serve", log_to_driver=False)  # the server's cluster
    try:
        answers = bench.drive(server["url"] + "/v1/generate", 40, 8, 2, None, 120.0, kill_after=10)
    finally:
        ray.shutdown()
    assert len(answers) == 40 and not [a for a in answers if a["status"] == 0]  # none lost
    for a in answers:
        assert (a["status"] == 200 and a["png"]) or (a["status"] >= 500 and a["error"]["error"]), a
    summary = bench.summarize(answers, 1.0, 4)
    assert summary["lost"] == 0 and summary["ok"] >= 30


@pytest.mark.slow
def test_sigint_shuts_the_server_down_gracefully(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0
    assert "shutting down" in server["log"].read_text()


def test_serve_config_errors(tmp_path, capsys):
    from ipa_rt.cli import main

    assert main(["serve", "--config", str(tmp_path / "missing.json")]) == 2
    assert "serve config" in capsys.readouterr().err
    base = {"models": {"m": {"base": "b", "ip_adapter": "a.safetensors"}}}
    with pytest.raises(ipa_rt.ConfigError, match=r"unknown option\(s\) \['replicas'\]"):
        ServeConfig.from_dict({**base, "replicas": 2})
    with pytest.raises(ipa_rt.ConfigError, match="run on CUDA but num_gpus is 0"):
        ServeConfig.from_dict({"models": {"m": {"base": "b", "ip_adapter": "a", "device": "cuda"}}})
    with pytest.raises(ipa_rt.ConfigError, match="could never form a full batch"):
        ServeConfig.from_dict({**base, "max_batch_size": 8, "max_ongoing_requests": 4})
    with pytest.raises(ipa_rt.ConfigError, match="has no ip_adapter"):
        ServeConfig.from_dict({"models": {"m": {"base": "b"}}})


def test_a_multipart_body_over_the_part_limits_gets_400_naming_the_body():
    """More than 16 files or 32 fields: starlette's form parser refuses them; the gateway answers 400 naming the body
    (not a 500). The gateway's method without Ray, on the request FastAPI would hand it."""
    import asyncio

    from starlette.requests import Request

    from ipa_rt.serving.app import FORM_FIELDS, FORM_FILES, Gateway

    config = ServeConfig.from_dict({"models": {"m": {"base": "b", "ip_adapter": "a.safetensors"}}})
    gateway = Gateway(dataclasses.asdict(config), {})

    async def answer(**parts) -> tuple[int, dict]:
        built = httpx.Request("POST", "http://x/v1/generate", **parts)
        body = built.read()
        chunks = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            return chunks.pop(0) if chunks else {"type": "http.disconnect"}

        headers = [(k.lower().encode(), v.encode()) for k, v in built.headers.items()]
        scope = {"type": "http", "method": "POST", "path": "/v1/generate", "headers": headers, "app": object()}
        response = await gateway.generate(Request(scope, receive))
        return response.status_code, json.loads(response.body)

    files = [("image", (f"{i}.png", b"x", "image/png")) for i in range(FORM_FILES + 1)]
    status, error = asyncio.run(answer(files=files, data={"prompt": "x"}))
    assert status == 400 and error["field"] == "body" and "Too many files" in error["error"], error
    fields = {f"f{i}": "x" for i in range(FORM_FIELDS + 1)}
    status, error = asyncio.run(answer(files=[("image", ("a.png", b"x", "image/png"))], data=fields))
    assert status == 400 and error["field"] == "body" and "Too many fields" in error["error"], error


def test_replica_groups_by_signature_and_answers_a_refused_request_alone(tmp_path, images):
    """The replica's work without Ray: requests with other steps form their own UNet batch, and a request the
    pipeline refuses (here a per-block scale naming no block) gets its 422 while its batch mates get images."""
    from ipa_rt.serving import protocol
    from ipa_rt.serving.app import ModelServer
    from ipa_rt.serving.config import example_config

    config = example_config(tmp_path)
    server = ModelServer(dataclasses.asdict(config.models["example"]), 8, 0.01, None)

    def job(seed: int, steps: int = 2, **fields):
        return protocol.parse({"prompt": f"p{seed}", "steps": steps, "seed": seed, **fields}, [], config)

    bad = job(3)
    bad.args.update(ip_adapter_image=[images[0]], ip_adapter_scale={"up": {"block_9": 1.0}})
    answers = server._run([job(1), job(2, steps=3), bad, job(4)])
    assert [a["status"] for a in answers] == [200, 200, 422, 200]
    assert [a.get("batch") for a in answers] == [1, 1, None, 1]  # the refused group's members answered alone
    assert "block_9" in answers[2]["error"]
    again = server._run([job(1), job(4)])
    assert [a["batch"] for a in again] == [2, 2]
    import numpy as np
    from PIL import Image

    pixels = [np.asarray(Image.open(io.BytesIO(a["image"])), dtype=np.int16) for a in (again[0], answers[0])]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1  # the same request batched or alone: the same image (8-bit)
