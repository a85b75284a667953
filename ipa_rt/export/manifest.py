"""The engine directory's ``manifest.json``: what was built, from which files, for which shapes and machine.

Engines are named by what they depend on (the TensorRT demo's rule): source weight files (sha256), shapes and
profile, dtype, backend, adapter variants and token counts, and for TensorRT the GPU and TensorRT version. The
adapter scale is not among them: it is an engine input. :func:`check_engine_dir` turns every way an engine dir
can be stale or broken into an :class:`~ipa_rt.errors.EngineError` that names what differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..adapters.checkpoint import atomic_write_bytes
from ..cache import cache_root
from ..errors import EngineError

MANIFEST = "manifest.json"
FORMAT = 2  # 2: the UNet's ip_scale has a row axis ([rows, adapters, layers]: a scale per batch row)
REBUILD = "`ipa_rt build ... --rebuild` (or engine_options={'rebuild': True}) rebuilds it"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{path, size, mtime_ns, sha256}``; the hash is reused from ``known`` while size and mtime match
    (as make does), so checking multi-GB weights is free when nothing changed."""
    st = path.stat()
    if known and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
        digest = known["sha256"]
    else:
        digest = sha256_file(path)
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}


# the distributions a module can come from (ONNX Runtime's GPU and OpenVINO builds install the same module)
DISTRIBUTIONS = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino")}


def _installed(module: str) -> str | None:
    """The installed version, read from package metadata: importing nncf, OpenVINO or ONNX Runtime just to ask
    costs a second or two of every build. TensorRT is asked itself: its wheels come under several names."""
    if module == "tensorrt":
        try:
            return __import__("tensorrt").__version__
        except ImportError:
            return None
    for dist in DISTRIBUTIONS.get(module, (module,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str | None]:
    """Versions of everything an engine's bytes or numerics depend on."""
    out: dict[str, str | None] = {"ipa_rt": __version__, "torch": torch.__version__}
    for name in ("onnx", "onnxruntime", "tensorrt", "openvino", "nncf", "diffusers", "transformers"):
        out[name] = _installed(name)
    return out


def gpu_info(device: torch.device | None = None) -> dict[str, str] | None:
    if not torch.cuda.is_available():
        return None
    index = device.index if device is not None and device.type == "cuda" and device.index is not None else 0
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}"}


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise EngineError(
            f"'{folder}' is not an ipa_rt engine directory: {MANIFEST} is missing; build one with `ipa_rt build`"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"'{path}' is not valid JSON ({exc}); {REBUILD}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise EngineError(f"'{path}' has format {found!r}; expected {FORMAT} (this ipa_rt's layout); {REBUILD}")
    return data


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable ``key: old -> new`` lines between two nested dicts."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {_short(a)} -> {_short(b)}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def check_engine_dir(folder: Path, manifest: dict[str, Any], device: torch.device) -> None:
    """Raise :class:`EngineError` if an engine file is missing or truncated, the machine differs from the one a
    TensorRT engine was built for, or a source weight file still on disk was edited since the build."""
    for network, info in manifest["networks"].items():
        for name, record in info["files"].items():
            path = folder / name
            if not path.is_file():
                raise EngineError(f"engine file '{path}' ({network}) is missing; {REBUILD}")
            size = path.stat().st_size
            if size != record["size"]:
                raise EngineError(
                    f"engine file '{path}' ({network}) has {size} bytes; the manifest recorded {record['size']} "
                    f"(truncated or overwritten); {REBUILD}"
                )
    if manifest["backend"] == "tensorrt":
        have = {"tensorrt": versions()["tensorrt"], "gpu": gpu_info(device)}
        want = {"tensorrt": manifest["versions"]["tensorrt"], "gpu": manifest["gpu"]}
        diff = differences(want, have)
        if diff:
            raise EngineError(
                f"TensorRT engines in '{folder}' were built for another machine: {'; '.join(diff)} (built -> here); "
                f"{REBUILD}"
            )
    for role, record in manifest["sources"].items():
        path = Path(record["path"])
        if path.is_file():
            now = file_record(path, record)
            if now["sha256"] != record["sha256"]:
                raise EngineError(
                    f"source file '{path}' ({role}) changed since the engines in '{folder}' were built "
                    f"(sha256 {record['sha256'][:12]}... -> {now['sha256'][:12]}...); {REBUILD}"
                )


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` for the whole build: a second build waits, then finds the work done."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".ipa_rt.lock", "a+") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: msvcrt locks a byte range instead
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
            try:
                yield
            finally:
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def hashed_sources(roles: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """``{role: file_record}`` of every file an engine is made from; the hashes are memoised across builds in the
    cache (``source-hashes.json``, by path, size and mtime), so a reuse check of multi-GB weights costs a stat each."""
    memo_path = cache_root() / "source-hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    records = {role: file_record(path, memo.get(str(path.resolve()))) for role, path in roles.items()}
    memo.update({r["path"]: r for r in records.values()})
    atomic_write_bytes(memo_path, json.dumps(memo, sort_keys=True).encode())
    return records


def reuse_or_build(
    folder: Path, ident: dict[str, Any], rebuild: bool, device: torch.device, build: Callable[[Path], None],
    say: Callable[[str], None], what: str,
) -> Path:  # fmt: skip
    """The one way every engine folder is made: reused when its manifest names ``ident`` (and its files check out),
    an :class:`EngineError` saying what differs when it holds other engines, else ``build(folder)`` under the folder's
    lock (a second builder waits, then reuses); a failed first build leaves no folder behind."""
    fresh = not folder.exists()
    with build_lock(folder):
        old = None
        if (folder / MANIFEST).exists():
            try:
                old = read_manifest(folder)
            except EngineError:
                if not rebuild:
                    raise
        if old is not None and not rebuild:
            diff = differences(old.get("identity", {}), ident)
            if diff:
                raise EngineError(
                    f"'{folder}' holds other engines; what differs (built -> requested): {'; '.join(diff[:8])}"
                    f"{' ...' if len(diff) > 8 else ''}. {REBUILD}"
                )
            check_engine_dir(folder, old, device)
            say(f"reusing the {what} built in '{folder}' (up to date: {', '.join(old.get('networks', {}))})")
            return folder
        try:
            build(folder)
        except BaseException:
            if fresh:
                shutil.rmtree(folder, ignore_errors=True)
            raise
    return folder
