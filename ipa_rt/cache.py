"""Where ipa_rt keeps what it builds for a machine: engines, the TensorRT timing cache, kernel tuning results."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "IPA_RT_CACHE"


def cache_root() -> Path:
    """``$IPA_RT_CACHE`` or ``~/.cache/ipa_rt/engines``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "ipa_rt" / "engines"
