"""Headless scale sweep: the same prompt, references and seed at each scale, as a GIF and a contact sheet."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from ..cache import atomic_write_bytes
from .live import FrameRequest, render_frame


def sweep(
    pipe,
    images: Sequence[Image.Image | None],
    scales: Sequence[float],
    out: str | os.PathLike,
    prompt: str = "a photo",
    seed: int = 0,
    steps: int = 4,
    guidance: float = 1.0,
    frame_ms: int = 400,
) -> tuple[Path, Path]:
    """Render one frame per scale (every adapter at that scale); write ``out`` (GIF) and ``<out>-sheet.png``."""
    count = pipe.adapters.num_adapters if pipe.adapters is not None else 0
    frames = [
        render_frame(pipe, FrameRequest(0, prompt, [float(s)] * count, seed, list(images)), steps, guidance)
        for s in scales
    ]
    out = Path(out)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    atomic_write_bytes(out, buf.getvalue())
    w, h = frames[0].size
    label = 14
    sheet = Image.new("RGB", (w * len(frames), h + label), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (frame, s) in enumerate(zip(frames, scales, strict=True)):
        sheet.paste(frame, (i * w, label))
        draw.text((i * w + 2, 1), f"scale {s:g}", fill="black")
    sheet_path = out.with_name(out.stem + "-sheet.png")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(sheet_path, buf.getvalue())
    return out, sheet_path
