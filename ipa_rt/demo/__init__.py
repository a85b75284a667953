"""``ipa_rt demo``: the LCM 4-step realtime web demo (FastAPI + WebSocket) and its headless scale sweep."""

from .live import DemoError, FrameRequest, LiveRenderer, decode_upload, render_frame
from .sweep import sweep

__all__ = ["DemoError", "FrameRequest", "LiveRenderer", "decode_upload", "render_frame", "sweep"]
