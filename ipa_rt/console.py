"""What reaches the terminal: ipa_rt's own progress lines for the long stages, and none of the third-party chatter a
user cannot act on (docs/getting-started.md lists it; also diffusers' notes on scheduler configs ipa_rt converts).
Library code hushes only around its own operations (:func:`hushed`); the command line hushes the whole process
(:func:`quiet_process`) unless ``-v`` is given. ``IPA_RT_VERBOSE=1`` does what ``-v`` does, for the library too.
"""

from __future__ import annotations

import contextlib
import importlib
import ipaddress
import logging
import os
import sys
import warnings
from collections.abc import Iterator

VERBOSE_ENV = "IPA_RT_VERBOSE"
_TORCHVISION = ".*torchvision.*"  # transformers' and torch.onnx's notes that it is missing
THIRD_PARTY = ("transformers", "diffusers", "torch.onnx", "onnxscript", "onnx_ir", "huggingface_hub", "nncf")
_LIBRARY_LOGGING = ("transformers.utils.logging", "diffusers.utils.logging")  # with progress-bar switches


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def reachable_from_others(host: str) -> bool:
    """Whether a server bound to ``host`` can be reached from other machines: any address but loopback (a host name
    may resolve to anything, so it counts as reachable)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return True


def say(message: str) -> None:
    """One progress line of a long stage (an engine build, a conversion), on stderr so stdout stays the result."""
    print(f"ipa_rt: {message}", file=sys.stderr, flush=True)


def _bars(enabled: bool) -> list:
    """Turn transformers', diffusers' (loading, not its denoising bar) and huggingface_hub's progress bars on or off;
    returns the undo callables."""
    undo = []
    for name in _LIBRARY_LOGGING:
        with contextlib.suppress(ImportError):
            lib = importlib.import_module(name)
            was = lib.is_progress_bar_enabled()
            (lib.enable_progress_bar if enabled else lib.disable_progress_bar)()
            undo.append(lib.enable_progress_bar if was else lib.disable_progress_bar)
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        was_off = are_progress_bars_disabled()
        (enable_progress_bars if enabled else disable_progress_bars)()
        undo.append(disable_progress_bars if was_off else enable_progress_bars)
    return undo


def _configure_libraries() -> None:
    """transformers and diffusers set their loggers' levels when first imported: import them first, so the levels
    set here are not reset by that."""
    for name in _LIBRARY_LOGGING:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


@contextlib.contextmanager
def hushed(*loggers: str, bars: bool = False) -> Iterator[None]:
    """Within the block, only errors from these third-party loggers (default: all of :data:`THIRD_PARTY`) and, with
    ``bars``, no transformers / huggingface_hub progress bars; everything restored after. A no-op when verbose."""
    if verbose():
        yield
        return
    _configure_libraries()
    saved = {name: logging.getLogger(name).level for name in loggers or THIRD_PARTY}
    for name in saved:
        logging.getLogger(name).setLevel(logging.ERROR)
    undo = _bars(False) if bars else []
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TORCHVISION)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        for fn in undo:
            fn()


@contextlib.contextmanager
def dropping(logger: str, text: str) -> Iterator[None]:
    """Within the block, the records logged on ``logger`` whose message contains ``text`` are dropped; everything
    else it logs still shows (a narrower :func:`hushed`, for one known note)."""
    target = logging.getLogger(logger)

    def keep(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    target.addFilter(keep)
    try:
        yield
    finally:
        target.removeFilter(keep)


def quiet_process(verbose_flag: bool) -> None:
    """The command line's default: third-party loggers at errors only, their progress bars off (ipa_rt's own
    denoising and build progress stays), torchvision-fallback warnings dropped. ``-v`` keeps all of it."""
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"
        return
    if verbose():
        return
    _configure_libraries()
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    _bars(False)
    if not any(f[1] is not None and f[1].pattern == _TORCHVISION for f in warnings.filters):  # once per process
        warnings.filterwarnings("ignore", message=_TORCHVISION)
