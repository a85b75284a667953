"""Reading and writing clips: GIF through Pillow, MP4/WebM/MOV through PyAV (``pip install 'ipa_rt[video]'``).
Writes are atomic (a temporary file beside the target, then a rename): a failed write leaves nothing behind."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, ImageSequence

from ..cache import atomic_path, atomic_write_bytes
from ..errors import ConfigError, ImageInputError

CONTAINERS = {".mp4": ("mp4", "libx264"), ".webm": ("webm", "libvpx-vp9"), ".mov": ("mov", "libx264")}
FORMATS = (".gif", *CONTAINERS)


def _av(what: str):
    try:
        import av
    except ImportError as exc:
        raise ConfigError(f"{what} needs PyAV: pip install 'ipa_rt[video]' (or av), or use a .gif") from exc
    return av


def read_video(path: str | os.PathLike) -> list[Image.Image]:
    """Every frame of a GIF or a video file as RGB images."""
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"video '{path}' does not exist; expected a .gif, .mp4, .webm or .mov file")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ImageInputError(f"video '{path}' has the extension {suffix!r}; expected one of {FORMATS}")
    try:
        if suffix == ".gif":
            with Image.open(path) as im:
                frames = [f.convert("RGB") for f in ImageSequence.Iterator(im)]
        else:
            av = _av(f"reading '{path}'")
            with av.open(str(path)) as container:
                frames = [f.to_image().convert("RGB") for f in container.decode(video=0)]
    except (OSError, ValueError) as exc:  # PyAV's errors derive from these; Pillow raises OSError
        raise ImageInputError(f"video '{path}' cannot be read: {exc}") from exc
    if not frames:
        raise ImageInputError(f"video '{path}' has no frames")
    return frames


def write_video(path: str | os.PathLike, frames: list[Image.Image], fps: float = 8.0) -> Path:
    """Write ``frames`` as a looping GIF or a video (H.264 MP4/MOV, VP9 WebM), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"output '{path}' has the extension {suffix!r}; expected one of {FORMATS}")
    if not frames:
        raise ConfigError("write_video: no frames to write")
    if suffix == ".gif":
        buf = io.BytesIO()
        rgb = [f.convert("RGB") for f in frames]
        rgb[0].save(buf, format="GIF", save_all=True, append_images=rgb[1:], duration=round(1000 / fps), loop=0)
        atomic_write_bytes(path, buf.getvalue())
        return path
    av = _av(f"writing '{path}'")
    container_format, codec = CONTAINERS[suffix]
    with atomic_path(path, suffix) as tmp, av.open(tmp, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=round(fps))
        w, h = frames[0].size
        stream.width, stream.height = w + w % 2, h + h % 2  # 4:2:0 needs even sides
        stream.pix_fmt = "yuv420p"
        for image in frames:
            frame = av.VideoFrame.from_image(image.convert("RGB").resize((stream.width, stream.height)))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path
