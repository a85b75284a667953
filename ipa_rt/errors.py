"""ipa_rt's exception types.

Every error a user can cause names the argument or file, what was found and what was expected.
All derive from :class:`IpaRtError`, so ``except ipa_rt.IpaRtError`` catches everything ipa_rt raises
on purpose.
"""

from __future__ import annotations


class IpaRtError(Exception):
    """Base class of every error ipa_rt raises on purpose."""


class CheckpointError(IpaRtError):
    """A weight file or folder is missing, unreadable, truncated or not the expected format."""


class IncompatibleAdapterError(IpaRtError):
    """An IP-Adapter checkpoint does not fit the base model or the image encoder."""


class ImageInputError(IpaRtError):
    """An image argument cannot be decoded or has the wrong shape or count."""


class ScaleError(IpaRtError):
    """A value given to ``set_ip_adapter_scale`` has the wrong type, length or keys."""


class ConfigError(IpaRtError):
    """A base model folder, scheduler name or call argument is not one ipa_rt supports."""


class EngineError(IpaRtError):
    """An engine directory is missing, broken (truncated file) or stale (other GPU, TensorRT version or weights)."""


class RequestError(IpaRtError):
    """A serving request (``ipa_rt serve``'s HTTP API) has a field that is missing, malformed or out of range:
    ``status`` is the HTTP status it answers with, ``field`` the field it names."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


def require_extra(what: str, extra: str, modules: tuple[str, ...]) -> None:
    """A :class:`ConfigError` naming the extra to install when a module ``what`` needs is missing: checked before any
    work, so a user without the extra never meets an ImportError half way through."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"{what} needs {', '.join(missing)}, which this Python lacks: pip install 'ipa_rt[{extra}]'")


def reject_engine_options(engine_options: object) -> None:
    """``engine_options`` given with ``backend='torch'``: the one message every constructor gives."""
    if engine_options:
        raise ConfigError("engine_options apply to backend='onnxruntime', 'openvino' or 'tensorrt'; it is 'torch'")
