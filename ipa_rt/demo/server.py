"""The demo's web app: the page at ``/``, the live socket at ``/ws``, counters at ``/health``.

Socket protocol (JSON text messages):

- server -> client ``{"type": "hello", "device", "backend", "runtime", "adapters": [{"variant", "tokens"}],
  "size": [h, w], "steps", "scales", "max_scale"}`` on connect;
- client -> server ``{"type": "params", "prompt"?, "scales"?, "seed"?}`` and
  ``{"type": "image", "adapter": i, "data": "<data URL>"}``; each valid change schedules a frame (latest wins);
- server -> client ``{"type": "frame", "id", "image": "data:image/jpeg;base64,...", "latency_ms", "params"}`` and
  ``{"type": "error", "field", "message"}`` (bad input; the session and the server go on).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
from importlib import resources
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse

from .live import DemoError, FrameRequest, LiveRenderer, check_prompt, check_scales, check_seed, decode_upload

DEFAULT_PROMPT = "a photo"


def _jpeg(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def create_app(renderer: LiveRenderer, default_scale: float = 0.6) -> FastAPI:
    pipe = renderer.pipe
    count = pipe.adapters.num_adapters if pipe.adapters is not None else 0
    adapters = [
        {"variant": e.spec.name, "tokens": e.tokens_per_image} for e in (pipe.adapters.entries if count else [])
    ]
    hello = {
        "type": "hello",
        "device": str(pipe.device),
        "backend": pipe.backend,
        "runtime": pipe.runtime_summary(),  # backend, precision, decoder
        "adapters": adapters,
        "size": list(pipe.default_size),
        "steps": renderer.steps,
        "scales": [default_scale] * count,
        "max_scale": 2.0,
    }
    page = resources.files(__package__).joinpath("page.html").read_text()
    app = FastAPI(title="ipa_rt demo")

    @app.get("/")
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"device": hello["device"], "backend": hello["backend"], **renderer.stats()})

    @app.websocket("/ws")
    async def live(ws: WebSocket) -> None:
        await ws.accept()
        try:
            session = renderer.open_session()
        except DemoError as exc:
            await ws.send_json({"type": "error", "field": exc.field, "message": str(exc)})
            await ws.close()
            return
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue = asyncio.Queue(maxsize=4)  # results only come for the latest request
        state: dict[str, Any] = {"prompt": DEFAULT_PROMPT, "scales": list(hello["scales"]), "seed": 0}
        images: list = [None] * count
        frame_id = 0

        def schedule() -> None:
            nonlocal frame_id
            frame_id += 1
            req = FrameRequest(session, state["prompt"], list(state["scales"]), state["seed"], list(images))
            params = {**state, "id": frame_id, "images": [im is not None for im in images]}

            def done(result: Any, params=params) -> None:
                loop.call_soon_threadsafe(_offer, outbox, (params, result))

            renderer.submit(req, done)

        async def sender() -> None:
            while True:
                params, result = await outbox.get()
                if isinstance(result, Exception):
                    await ws.send_json({"type": "error", "field": "render", "message": f"rendering failed: {result}"})
                    continue
                image, latency = result
                encoded = await asyncio.to_thread(_jpeg, image)
                await ws.send_json(
                    {
                        "type": "frame",
                        "id": params["id"],
                        "image": encoded,
                        "latency_ms": latency * 1e3,
                        "params": params,
                    }
                )

        send_task = asyncio.create_task(sender())
        try:
            await ws.send_json(hello)
            schedule()
            while True:
                message = await ws.receive_json()
                try:
                    changed = await _apply(message, state, images, count)
                except DemoError as exc:
                    await ws.send_json({"type": "error", "field": exc.field, "message": str(exc)})
                    continue
                if changed:
                    schedule()
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client went away (mid-frame too): nothing of its session is kept
        finally:
            renderer.close_session(session)
            send_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await send_task

    return app


def _offer(queue: asyncio.Queue, item: Any) -> None:
    with contextlib.suppress(asyncio.QueueFull):
        queue.put_nowait(item)


async def _apply(message: Any, state: dict[str, Any], images: list, count: int) -> bool:
    """Validate one client message into the session state; True when a new frame is needed."""
    if not isinstance(message, dict) or message.get("type") not in ("params", "image"):
        raise DemoError("message must be a JSON object with type 'params' or 'image'", "message")
    if message["type"] == "image":
        index = message.get("adapter")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise DemoError(f"adapter is {index!r}; expected 0..{count - 1}", "image")
        data = message.get("data")
        if not isinstance(data, str):
            raise DemoError("image data must be a data URL string", "image")
        images[index] = await asyncio.to_thread(decode_upload, data, index)
        return True
    new = dict(state)
    if "prompt" in message:
        new["prompt"] = check_prompt(message["prompt"])
    if "scales" in message:
        new["scales"] = check_scales(message["scales"], count)
    if "seed" in message:
        new["seed"] = check_seed(message["seed"])
    changed = new != state
    state.update(new)
    return changed


def serve(renderer: LiveRenderer, host: str = "127.0.0.1", port: int = 7860) -> None:
    import uvicorn

    uvicorn.run(create_app(renderer), host=host, port=port, log_level="warning")
