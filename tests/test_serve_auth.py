"""``ipa_rt serve``'s API key: where it comes from (``--api-key``, ``IPA_RT_API_KEY``, the config's ``api_key``), the
gate every request passes (401 without ``Authorization: Bearer KEY``, ``/healthz`` open, nothing asked without a
key), and that the key shows up nowhere: reprs, pickles Ray receives, errors, the printed lines, the logs. The gate
and the sources are tested in-process (fast); one real server started with a key is marked slow."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import sys
from pathlib import Path

import pytest
from user_commands import free_port, running, user_env

import ipa_rt
from ipa_rt.serving import auth
from ipa_rt.serving.auth import ENV, ApiKey, RequireKey, refusal
from ipa_rt.serving.cli import banner, config_from, parser
from ipa_rt.serving.config import ServeConfig

KEY = "k3y-Sx9T2vQ7mZ4pL8rW1nB6"  # what a test server requires: unique enough to grep logs for
OTHER = "0ther-Fq5Hc3Jd8Ye2Wu7Ra1"
MODELS = {"m": {"base": "b", "ip_adapter": "a.safetensors"}}


def config_file(tmp_path: Path, **options) -> Path:
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"models": MODELS, **options}))
    return path


# --- the key as held: a digest, nothing that prints or pickles it -------------------------------------------------
def test_the_key_is_held_as_a_digest_and_compared_in_constant_time(monkeypatch):
    key = ApiKey(KEY)
    assert key.matches(KEY) and not key.matches(OTHER) and not key.matches(KEY[:-1]) and not key.matches("")
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    assert key.matches(KEY) and not key.matches("x" * 500)
    assert calls == [(32, 32), (32, 32)]  # digests of equal length, whatever was presented

    config = ServeConfig.from_dict({"models": MODELS, "api_key": KEY})
    assert isinstance(config.api_key, ApiKey) and config.api_key.matches(KEY)
    as_sent = dataclasses.asdict(config)  # what build_app binds: Ray pickles it to the controller and the gateway
    for shown in (repr(key), str(key), repr(config), str(as_sent)):
        assert KEY not in shown
    for blob in (pickle.dumps(config), pickle.dumps(as_sent)):
        assert KEY.encode() not in blob
    again = ServeConfig.from_dict(copy.deepcopy(as_sent))  # the gateway's own copy still checks the key
    assert again.api_key.matches(KEY) and not again.api_key.matches(OTHER)
    assert ServeConfig(models=config.models, api_key=KEY).api_key.matches(KEY)  # constructed in Python too


@pytest.mark.parametrize(
    ("value", "pattern"),
    [("", "is empty"), ("two words", "has spaces"), ("clé-secrète", "outside printable ASCII"), (12345, "is a int")],
)
def test_a_bad_key_is_a_config_error_naming_its_source_and_not_quoting_it(tmp_path, monkeypatch, value, pattern):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ipa_rt.ConfigError, match=pattern) as caught:
        ServeConfig.from_file(config_file(tmp_path, api_key=value))
    assert "serve.json': api_key" in str(caught.value) and (not value or str(value) not in str(caught.value))
    if not isinstance(value, str):
        return
    argv = ["--config", str(config_file(tmp_path))]
    for source, args in (("--api-key", [*argv, "--api-key", value]), (f"the environment variable {ENV}", argv)):
        if source != "--api-key":
            monkeypatch.setenv(ENV, value)
        with pytest.raises(ipa_rt.ConfigError, match=pattern) as caught:
            config_from(parser().parse_args(args), "")
        message = str(caught.value)
        assert message.startswith(source) and (not value or value not in message), message


def test_the_cli_exits_2_on_a_bad_key_before_starting_ray(tmp_path, monkeypatch, capsys):
    from ipa_rt.cli import main

    monkeypatch.setenv(ENV, "")  # e.g. IPA_RT_API_KEY=$UNSET_VARIABLE: an error, not a server without a key
    assert main(["serve", "--config", str(config_file(tmp_path))]) == 2
    assert f"the environment variable {ENV} is empty" in capsys.readouterr().err


def test_key_sources_in_order_flag_then_environment_then_config_file(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    (tmp_path / "plain").mkdir()
    (tmp_path / "keyed").mkdir()
    plain, keyed = str(config_file(tmp_path / "plain")), str(config_file(tmp_path / "keyed", api_key=KEY))

    def key_of(*argv: str) -> ApiKey | None:
        return config_from(parser().parse_args(list(argv)), str(tmp_path)).api_key

    assert key_of("--config", plain) is None  # no key anywhere: nothing required, as before
    assert key_of("--config", keyed).matches(KEY)
    monkeypatch.setenv(ENV, OTHER)
    assert key_of("--config", plain).matches(OTHER)
    assert key_of("--config", keyed).matches(OTHER) and not key_of("--config", keyed).matches(KEY)
    assert key_of("--config", keyed, "--api-key", "flag-key").matches("flag-key")


def test_the_printed_lines_say_whether_a_key_is_required_and_never_show_it():
    keyed = ServeConfig.from_dict({"models": MODELS, "api_key": KEY, "host": "0.0.0.0"})
    ready, caution = banner(keyed)
    assert "requires an API key" in ready and KEY not in ready and caution is None
    ready, caution = banner(dataclasses.replace(keyed, api_key=None, host="127.0.0.1"))
    assert "API key" not in ready and caution is None  # loopback without a key: as it always was
    ready, caution = banner(dataclasses.replace(keyed, api_key=None))
    assert "reachable from other machines" in caution and ENV in caution and "127.0.0.1" in caution


# --- the gate ------------------------------------------------------------------------------------------------------
def gated(key: ApiKey | None):
    """A FastAPI app shaped like the gateway (the same paths), behind the same middleware."""
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    app = fastapi.FastAPI()
    app.get("/healthz")(lambda: {"status": "ok"})
    app.get("/v1/models")(lambda: {"m": {}})
    app.post("/v1/generate")(lambda: {"image": "..."})
    app.add_middleware(RequireKey, key=lambda: key)
    return TestClient(app)


def test_with_a_key_every_endpoint_but_health_answers_401_without_it():
    client = gated(ApiKey(KEY))
    assert client.get("/healthz").json() == {"status": "ok"}
    cases = {
        None: ("no Authorization header", "Bearer"),
        f"Basic {KEY}": ("not of the Bearer scheme", "Bearer"),
        KEY: ("not of the Bearer scheme", "Bearer"),  # the key without its scheme
        "Bearer": ("no key after 'Bearer'", "Bearer"),
        "Bearer    ": ("no key after 'Bearer'", "Bearer"),
        f"Bearer {OTHER}": ("not this server's key", 'Bearer error="invalid_token"'),
        f"Bearer {KEY}x": ("not this server's key", 'Bearer error="invalid_token"'),
    }
    for header, (message, challenge) in cases.items():
        headers = {} if header is None else {"Authorization": header}
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/generate"), ("GET", "/docs"), ("GET", "/nope")):
            r = client.request(method, path, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == challenge, (header, path, r.text)
            assert r.json()["field"] == "authorization" and message in r.json()["error"], (header, r.text)
            assert KEY not in r.text and OTHER not in r.text  # what was sent is never echoed
    for header in (f"Bearer {KEY}", f"bearer {KEY}", f"  Bearer   {KEY}  "):  # the scheme's case does not matter
        assert client.get("/v1/models", headers={"Authorization": header}).status_code == 200
        assert client.post("/v1/generate", headers={"Authorization": header}).status_code == 200
    assert refusal(ApiKey(KEY), f"Bearer {KEY}") is None and refusal(ApiKey(KEY), None) is not None
    from starlette.websockets import WebSocketDisconnect

    with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect("/ws"):  # a socket is refused too
        pass
    assert closed.value.code == 1008  # policy violation


def test_without_a_key_the_gate_changes_nothing():
    client = gated(None)
    for headers in ({}, {"Authorization": "Bearer anything"}):
        assert client.get("/v1/models", headers=headers).status_code == 200
        r = client.post("/v1/generate", headers=headers)
        assert r.status_code == 200 and "www-authenticate" not in r.headers
    assert client.get("/nope").status_code == 404


@pytest.mark.parametrize(("root", "path"), [("", "/healthz"), ("/", "/healthz"), ("/api", "/api/healthz")])
def test_health_stays_open_under_a_route_prefix(root, path):
    import asyncio

    passed, sent = [], []

    async def app(scope, receive, send) -> None:
        passed.append(scope["path"])

    async def send(message) -> None:
        sent.append(message)

    gate = RequireKey(app, key=lambda: ApiKey(KEY))
    asyncio.run(gate({"type": "http", "path": path, "root_path": root, "headers": []}, None, send))
    asyncio.run(gate({"type": "http", "path": path.replace("healthz", "v1/models"), "root_path": root}, None, send))
    assert passed == [path] and sent[0]["status"] == 401


def test_the_gateway_app_is_behind_the_gate():
    pytest.importorskip("ray.serve", reason="ipa_rt serve needs Ray Serve (pip install 'ipa_rt[serve]')")
    from ipa_rt.serving import app

    gates = [m for m in app.api.user_middleware if m.cls is RequireKey]
    assert len(gates) == 1 and gates[0].kwargs["key"] is app.gateway_key


# --- a real server with a key ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_server_with_a_key_refuses_requests_without_it_and_never_logs_it(tmp_path):
    """``ipa_rt serve --config`` whose file holds one key while ``IPA_RT_API_KEY`` holds another (the variable wins):
    401 without a key, with a wrong one, with the file's; 200 with the right one; /healthz open. Then neither key
    (nor the wrong one sent) is in what the server printed or in any file of Ray's session folder."""
    pytest.importorskip("ray.serve", reason="ipa_rt serve needs Ray Serve (pip install 'ipa_rt[serve]')")
    httpx = pytest.importorskip("httpx")
    import shutil
    import tempfile

    from ipa_rt.testing import write_example

    files = write_example(tmp_path / "example")
    models = {"example": {"base": str(files["base"]), "ip_adapter": [str(files["adapter"])], "default_steps": 2}}
    (tmp_path / "serve.json").write_text(json.dumps({"models": models, "num_replicas": 1, "api_key": OTHER}))
    wrong = "wr0ng-Gt6Kp2Zs9Xe4Nb"
    port = free_port()
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # its own: the logs read below are this server's
    env = user_env(tmp_path / "cache", RAY_TMPDIR=str(ray_dir), RAY_DEDUP_LOGS="0", **{ENV: KEY})
    argv = [sys.executable, "-m", "ipa_rt", "serve", "--config", str(tmp_path / "serve.json"), "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    try:
        with running(argv, tmp_path, env, "Ctrl-C stops", port) as server:
            assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
            body = {"prompt": "a cat", "steps": 2, "seed": 1}
            for headers in ({}, {"Authorization": f"Bearer {wrong}"}, {"Authorization": f"Bearer {OTHER}"}):
                for r in (httpx.get(f"{url}/v1/models", headers=headers),
                          httpx.post(f"{url}/v1/generate", json=body, headers=headers, timeout=120),
                          httpx.get(f"{url}/docs", headers=headers)):  # fmt: skip
                    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), r.text
                    assert r.json()["field"] == "authorization", r.text
            right = {"Authorization": f"Bearer {KEY}"}
            assert httpx.get(f"{url}/v1/models", headers=right).json()["example"]["default_steps"] == 2
            r = httpx.post(f"{url}/v1/generate", json=body, headers=right, timeout=120)
            assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
            r = httpx.post(f"{url}/v1/generate", json={**body, "steps": 0}, headers=right, timeout=120)
            assert r.status_code == 422 and r.json()["field"] == "steps"  # past the gate, the API as before
            holders = []  # processes started with the key in their environment: the command itself only
            for environ in Path("/proc").glob("[0-9]*/environ"):
                try:
                    if f"{ENV}={KEY}".encode() in environ.read_bytes():
                        holders.append(int(environ.parent.name))
                except OSError:  # gone, or not ours
                    pass
            assert holders == [server.proc.pid], holders  # Ray's processes, started after it dropped the variable
        said = server.said()
        assert server.proc.returncode == 0, said[-3000:]
        assert "every endpoint but /healthz requires an API key" in said and "is ready at" in said
        logs = [p for p in ray_dir.rglob("*") if p.is_file() and not p.is_symlink()]
        assert any("gateway" in p.name or "proxy" in p.name for p in logs), sorted(p.name for p in logs)
        for secret in (KEY, OTHER, wrong):
            assert secret not in said
            leaked = [p for p in logs if secret.encode() in p.read_bytes()]
            assert not leaked, f"{secret} found in {leaked}"
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
