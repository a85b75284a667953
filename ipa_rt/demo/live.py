"""The live loop: one worker thread owns the pipeline, each browser session has at most one pending frame
request (the latest wins), so the queue is bounded by the session count. A frame is an LCM few-step generation; a
slider only writes the scale tensor and a known reference hits the encoding cache (docs/guides/demo.md).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import IpaRtError

MAX_UPLOAD_BYTES = 16 * 2**20
MAX_UPLOAD_PIXELS = 4096 * 4096
REFERENCE_SIDE = 1024  # references are shrunk to this (CLIP sees 224 px anyway)
MAX_SCALE = 5.0
MAX_SEED = 2**63 - 1
MAX_PROMPT = 1000


class DemoError(IpaRtError):
    """A demo input (upload, scale, seed, prompt) is not acceptable; shown on the page, the server goes on."""

    def __init__(self, message: str, field_name: str = "") -> None:
        super().__init__(message)
        self.field = field_name


def decode_upload(data: str, index: int) -> Image.Image:
    """A data URL or base64 string -> RGB PIL image, refusing non-images and huge ones."""
    where = f"reference image {index}"
    payload = data.split(",", 1)[1] if data.startswith("data:") else data
    if len(payload) * 3 // 4 > MAX_UPLOAD_BYTES:
        raise DemoError(f"{where} is over {MAX_UPLOAD_BYTES // 2**20} MiB; expected a smaller PNG/JPEG/WebP", "image")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DemoError(f"{where} is not base64 data ({exc}); expected an image file", "image") from exc
    try:
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
            if w * h > MAX_UPLOAD_PIXELS:
                raise DemoError(f"{where} is {w}x{h} pixels; expected at most {MAX_UPLOAD_PIXELS} pixels", "image")
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DemoError(
            f"{where} cannot be decoded as an image ({exc}); expected a PNG, JPEG or WebP", "image"
        ) from exc
    im.thumbnail((REFERENCE_SIDE, REFERENCE_SIDE))
    return im


def check_scales(values: Any, count: int) -> list[float]:
    if not isinstance(values, list) or len(values) != count:
        raise DemoError(f"scales must be a list of {count} numbers (one per adapter); got {values!r}", "scale")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= MAX_SCALE:
            raise DemoError(f"scale {i} is {v!r}; expected a number from 0 to {MAX_SCALE}", "scale")
        out.append(float(v))
    return out


def check_seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise DemoError(f"seed is {value!r}; expected an integer from 0 to 2^63-1", "seed")
    return value


def check_prompt(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_PROMPT:
        raise DemoError(f"prompt must be text of at most {MAX_PROMPT} characters", "prompt")
    return value


@dataclass
class FrameRequest:
    session: int
    prompt: str
    scales: list[float]
    seed: int
    images: list[Image.Image | None]
    submitted: float = field(default_factory=time.perf_counter)


def render_frame(pipe, req: FrameRequest, steps: int, guidance: float) -> Image.Image:
    """One frame. Adapters without a reference image get scale 0 (exactly no contribution) and borrow another
    adapter's image so the pipeline's shapes stay the same; with no image at all the frame is text only."""
    present = [im for im in req.images if im is not None]
    scales = [s if im is not None else 0.0 for s, im in zip(req.scales, req.images, strict=True)]
    images = [im if im is not None else present[0] for im in req.images] if present else None
    if pipe.adapters is not None:
        pipe.set_ip_adapter_scale(scales)
    generator = torch.Generator("cpu").manual_seed(req.seed)
    return pipe(
        req.prompt,
        ip_adapter_image=images,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        output_type="pil",
    ).images[0]


class LiveRenderer:
    """Latest-wins frame scheduling around one pipeline-owning worker thread."""

    def __init__(self, pipe, steps: int = 4, guidance: float = 1.0, max_sessions: int = 8) -> None:
        self.pipe, self.steps, self.guidance, self.max_sessions = pipe, steps, guidance, max_sessions
        self._cv = threading.Condition()
        self._pending: dict[int, tuple[FrameRequest, Callable[[Any], None]]] = {}
        self._sessions: set[int] = set()
        self._next = 0
        self._stop = False
        self.rendered = self.dropped = 0
        self.busy_session: int | None = None
        self._thread = threading.Thread(target=self._run, name="ipa_rt-demo-worker", daemon=True)
        self._thread.start()

    # --- sessions ---------------------------------------------------------------------------------------------
    def open_session(self) -> int:
        with self._cv:
            if len(self._sessions) >= self.max_sessions:
                raise DemoError(f"the demo serves {self.max_sessions} sessions at once; try again later", "session")
            self._next += 1
            self._sessions.add(self._next)
            return self._next

    def close_session(self, session: int) -> None:
        """Forget a session: its pending request is dropped and a frame being rendered for it is discarded."""
        with self._cv:
            self._sessions.discard(session)
            if self._pending.pop(session, None) is not None:
                self.dropped += 1

    def submit(self, req: FrameRequest, done: Callable[[Any], None]) -> None:
        """Schedule ``req``; it replaces the session's pending request. ``done(result)`` is called from the
        worker with ``(image, latency_s)`` or an exception."""
        with self._cv:
            if req.session not in self._sessions:
                return
            if self._pending.pop(req.session, None) is not None:
                self.dropped += 1
            self._pending[req.session] = (req, done)
            self._cv.notify()

    def stats(self) -> dict[str, Any]:
        with self._cv:
            return {
                "sessions": len(self._sessions),
                "pending": len(self._pending),
                "rendered": self.rendered,
                "dropped": self.dropped,
                "busy": self.busy_session is not None,
            }

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # --- the worker -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                session = min(self._pending, key=lambda s: self._pending[s][0].submitted)  # oldest first: fair
                req, done = self._pending.pop(session)
                self.busy_session = session
            try:
                image = render_frame(self.pipe, req, self.steps, self.guidance)
                result: Any = (image, time.perf_counter() - req.submitted)
            except Exception as exc:  # reported to that session's page; the worker goes on
                result = exc
            with self._cv:
                self.busy_session = None
                alive = session in self._sessions
                if alive and not isinstance(result, Exception):
                    self.rendered += 1
            if alive:
                done(result)
