"""The realtime demo: socket protocol, latest-wins scheduling, bad input, disconnects, the headless sweep, and a
real headless Chromium moving the slider."""

from __future__ import annotations

import base64
import io
import shutil
import threading
import time

import numpy as np
import pytest
from conftest import count_forwards, ipa_pipe
from PIL import Image
from user_commands import free_port

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

from ipa_rt import cli
from ipa_rt.demo import DemoError, FrameRequest, LiveRenderer, decode_upload
from ipa_rt.demo.server import create_app


@pytest.fixture(scope="module")
def live_pipe(models):
    pipe = ipa_pipe(models, "sd15", [models.adapter("sd15", "base")], scheduler="lcm")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def frame_pixels(message: dict) -> np.ndarray:
    raw = base64.b64decode(message["image"].split(",", 1)[1])
    with Image.open(io.BytesIO(raw)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)


def next_of(ws, kind: str) -> dict:
    while True:
        message = ws.receive_json()
        if message["type"] == kind:
            return message
        assert message["type"] != "error" or kind == "error", message


def test_socket_protocol_and_slider_reruns_only_the_loop(live_pipe, images):
    renderer = LiveRenderer(live_pipe, steps=4, guidance=1.0)
    encoder_calls = count_forwards(encoder=live_pipe.image_encoder)
    try:
        with TestClient(create_app(renderer)) as client, client.websocket_connect("/ws") as ws:
            hello = ws.receive_json()
            assert hello["type"] == "hello" and hello["device"] == "cpu" and hello["backend"] == "torch"
            assert hello["adapters"] == [{"variant": "base", "tokens": 4}] and hello["size"] == [32, 32]
            first = next_of(ws, "frame")  # the page starts with a text-only frame
            assert first["params"]["images"] == [False] and frame_pixels(first).shape == (32, 32, 3)
            ws.send_json({"type": "image", "adapter": 0, "data": data_url(images[0])})
            with_image = next_of(ws, "frame")
            assert with_image["params"]["images"] == [True] and with_image["latency_ms"] > 0
            calls = encoder_calls["encoder"]
            loops = dict(live_pipe.loop.states)
            ws.send_json({"type": "params", "scales": [1.8]})
            moved = next_of(ws, "frame")
            assert moved["params"]["scales"] == [1.8] and moved["id"] > with_image["id"]
            assert np.abs(frame_pixels(moved) - frame_pixels(with_image)).mean() > 0.5  # the scale acts
            assert encoder_calls["encoder"] == calls  # the reference encoding was cached: only the loop re-ran
            assert live_pipe.loop.states.keys() == loops.keys()  # same static buffers: nothing rebuilt
            ws.send_json({"type": "params", "seed": 7, "prompt": "a dog"})
            assert next_of(ws, "frame")["params"]["seed"] == 7
            health = client.get("/health").json()
            assert health["sessions"] == 1 and health["device"] == "cpu"
    finally:
        renderer.stop()
    assert renderer.stats()["sessions"] == 0 and renderer.stats()["pending"] == 0


@pytest.mark.parametrize(
    ("message", "field", "pattern"),
    [
        (
            {"type": "image", "adapter": 0, "data": "data:text/plain;base64," + base64.b64encode(b"hello").decode()},
            "image",
            "cannot be decoded as an image",
        ),
        ({"type": "image", "adapter": 0, "data": "not base64 !!"}, "image", "not base64"),
        ({"type": "image", "adapter": 3, "data": ""}, "image", "adapter is 3"),
        ({"type": "params", "scales": [-1]}, "scale", "scale 0 is -1"),
        ({"type": "params", "scales": ["big"]}, "scale", "scale 0 is 'big'"),
        ({"type": "params", "scales": [0.5, 0.5]}, "scale", "list of 1 numbers"),
        ({"type": "params", "seed": -5}, "seed", "seed is -5"),
        ({"type": "params", "seed": "x"}, "seed", "seed is 'x'"),
        ({"type": "params", "prompt": 3}, "prompt", "prompt must be text"),
        ({"type": "dance"}, "message", "type 'params' or 'image'"),
    ],
)
def test_bad_input_is_shown_and_the_server_goes_on(live_pipe, message, field, pattern):
    renderer = LiveRenderer(live_pipe)
    try:
        with TestClient(create_app(renderer)) as client, client.websocket_connect("/ws") as ws:
            next_of(ws, "hello")
            next_of(ws, "frame")
            ws.send_json(message)
            error = next_of(ws, "error")
            assert error["field"] == field and pattern in error["message"]
            ws.send_json({"type": "params", "seed": 3})  # still serving
            assert next_of(ws, "frame")["params"]["seed"] == 3
    finally:
        renderer.stop()


def test_huge_upload_is_refused():
    huge = Image.new("RGB", (5000, 4000), "white")
    with pytest.raises(DemoError, match="5000x4000 pixels"):
        decode_upload(data_url(huge), 0)
    with pytest.raises(DemoError, match="over 16 MiB"):
        decode_upload("A" * (23 * 2**20), 0)


class SlowPipe:
    """Stands in for a pipeline whose frame takes as long as the test says (release)."""

    adapters = None

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls: list[str] = []

    def __call__(self, prompt, **_):
        self.calls.append(prompt)
        self.started.set()
        assert self.release.wait(30)

        return type("Out", (), {"images": [Image.new("RGB", (8, 8))]})()


def test_latest_request_wins_and_the_queue_stays_bounded():
    pipe = SlowPipe()
    renderer = LiveRenderer(pipe, max_sessions=2)
    results = []
    try:
        session = renderer.open_session()
        renderer.submit(FrameRequest(session, "first", [], 0, []), results.append)
        assert pipe.started.wait(10)  # the worker is busy with "first"
        for i in range(20):  # a slider dragged fast: 20 changes while one frame renders
            renderer.submit(FrameRequest(session, f"drag {i}", [], 0, []), results.append)
            assert renderer.stats()["pending"] == 1
        pipe.release.set()
        deadline = time.time() + 10
        while len(results) < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert pipe.calls == ["first", "drag 19"]  # stale requests were dropped unrendered
        assert renderer.stats()["dropped"] == 19 and len(results) == 2
        renderer.open_session()
        with pytest.raises(DemoError, match="2 sessions at once"):
            renderer.open_session()
    finally:
        pipe.release.set()
        renderer.stop()


def test_disconnect_mid_frame_leaves_nothing_behind():
    pipe = SlowPipe()
    renderer = LiveRenderer(pipe)
    session = renderer.open_session()
    delivered = []
    try:
        renderer.submit(FrameRequest(session, "mid-frame", [], 0, []), delivered.append)
        assert pipe.started.wait(10)
        renderer.submit(FrameRequest(session, "queued", [], 0, []), delivered.append)
        renderer.close_session(session)  # the browser tab closes while a frame renders and one waits
        pipe.release.set()
        time.sleep(0.3)
        stats = renderer.stats()
        assert stats == {"sessions": 0, "pending": 0, "rendered": 0, "dropped": 1, "busy": False}
        assert delivered == [] and pipe.calls == ["mid-frame"]
    finally:
        renderer.stop()


def test_socket_disconnect_mid_frame(live_pipe):
    renderer = LiveRenderer(live_pipe)
    try:
        with TestClient(create_app(renderer)) as client:
            with client.websocket_connect("/ws") as ws:
                next_of(ws, "hello")
                ws.send_json({"type": "params", "seed": 9})
            deadline = time.time() + 20
            while (renderer.stats()["sessions"] or renderer.stats()["busy"]) and time.time() < deadline:
                time.sleep(0.05)
            assert renderer.stats()["sessions"] == 0 and renderer.stats()["pending"] == 0
            with client.websocket_connect("/ws") as ws:  # and the next visitor is served
                next_of(ws, "hello")
                assert next_of(ws, "frame")["id"] == 1
    finally:
        renderer.stop()


def test_headless_sweep_writes_gif_and_contact_sheet(tmp_path, capsys):
    out = tmp_path / "sweep.gif"
    argv = ["demo", "--example", "--backend", "torch", "--sweep", "0,0.5,1.5", "-o", str(out), "--device", "cpu"]
    assert cli.main(argv) == 0
    with Image.open(out) as gif:
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("RGB"), dtype=np.float32))
    assert len(frames) == 3 and np.abs(frames[0] - frames[2]).mean() > 0.5
    with Image.open(tmp_path / "sweep-sheet.png") as sheet:
        assert sheet.size[0] == 3 * frames[0].shape[1]
    assert cli.main(["demo", "--example", "--backend", "torch", "--sweep", "0,x", "-o", str(out)]) == 2
    assert "expected comma-separated numbers" in capsys.readouterr().err


def test_the_page_binds_to_loopback_unless_told_and_says_so_when_told():
    """The page has no login: ``ipa_rt demo`` binds 127.0.0.1 by default and prints a line when bound elsewhere
    (the process itself is checked in test_commands: it listens on 127.0.0.1 only)."""
    from ipa_rt.cli.demo import bind_notice

    assert cli.build_parser().parse_args(["demo", "--example"]).host == "127.0.0.1"
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert bind_notice(host, 7860) is None, host
    for host in ("0.0.0.0", "::", "192.168.1.20", "demo.example.org"):
        notice = bind_notice(host, 7860)
        assert "reachable from other machines" in notice and "no login" in notice and "--host 127.0.0.1" in notice


@pytest.mark.slow
@pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="headless Chromium test needs Debian's chromium and chromium-driver (.ci/run installs them)",
)
def test_browser_moves_the_slider_and_sees_new_frames(live_pipe, images, tmp_path):
    pytest.importorskip("selenium")
    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    renderer = LiveRenderer(live_pipe)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(renderer), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800"):
        options.add_argument(arg)
    driver = None
    try:
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        wait = WebDriverWait(driver, 60)
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: d.find_element(By.ID, "device").text == "cpu")
        assert driver.find_element(By.ID, "backend").text == live_pipe.runtime_summary()  # backend, precision, decoder
        frames = lambda d: int(d.find_element(By.ID, "frames").text)  # noqa: E731
        wait.until(lambda d: frames(d) >= 1)
        ref = tmp_path / "ref.png"
        images[0].save(ref)
        driver.find_element(By.ID, "file-0").send_keys(str(ref))  # the drop zone's file input
        wait.until(lambda d: d.find_element(By.ID, "preview-0").get_attribute("src").startswith("data:image"))
        wait.until(lambda d: frames(d) >= 2)
        before, fps_before = frames(driver), driver.find_element(By.ID, "fps").text
        slider = driver.find_element(By.ID, "scale-0")
        for _ in range(6):  # a person pressing the arrow key on the focused slider: 0.60 -> 0.90
            slider.send_keys(Keys.ARROW_RIGHT)
        wait.until(
            lambda d: frames(d) > before and d.find_element(By.ID, "out").get_attribute("data-scales") == "[0.9]"
        )
        assert driver.find_element(By.ID, "scale-value-0").text == "0.9"
        fps = driver.find_element(By.ID, "fps").text
        assert fps.endswith(" fps") and fps != fps_before and float(fps.split()[0]) > 0
        assert driver.find_element(By.ID, "latency").text.endswith(" ms")
        text_file = tmp_path / "notes.txt"
        text_file.write_text("not an image")
        driver.find_element(By.ID, "file-0").send_keys(str(text_file))
        wait.until(lambda d: "cannot be decoded as an image" in d.find_element(By.ID, "error").text)
        driver.save_screenshot(str(tmp_path / "demo.png"))
        shutil.copy(tmp_path / "demo.png", "/tmp/demo-shot.png") if False else None
        assert (tmp_path / "demo.png").stat().st_size > 1000
    finally:
        if driver is not None:
            driver.quit()
        server.should_exit = True
        thread.join(timeout=10)
        renderer.stop()
