"""The engine directory's ``manifest.json``: what was built, from which files, for which shapes and machine. Engines
are named by what they depend on (the TensorRT demo's rule), never by the adapter scale (an engine input);
:func:`check_engine_dir` turns every way an engine dir can be stale or broken into an
:class:`~ipa_rt.errors.EngineError` that names what differs (docs/reference/manifest.md).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..cache import atomic_write_bytes, cache_root
from ..errors import CheckpointError, EngineError

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
    names = ("onnx", "onnxruntime", "tensorrt", "openvino", "nncf", "diffusers", "transformers")
    return {"ipa_rt": __version__, "torch": torch.__version__} | {name: _installed(name) for name in names}


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
    _check_shape(path, data)
    return data


def _check_shape(path: Path, data: dict[str, Any]) -> None:
    """The parts every reader of a manifest relies on, as written by a build (a hand edit that broke them is named)."""

    def bad(where: str, expected: str) -> EngineError:
        return EngineError(f"'{path}' is not as a build writes it: {where} {expected} (edited by hand?); {REBUILD}")

    for key, kind, expected in (("networks", dict, "a table of networks"), ("sources", dict, "a table of files"),
                                ("backend", str, "a backend name"), ("shapes", dict, "a table of shapes")):  # fmt: skip
        if not isinstance(data.get(key), kind):
            raise bad(f"'{key}' is {_short(data.get(key, '<absent>'))}; expected", expected)
    if not data["networks"]:
        raise bad("'networks' is empty; expected", "at least one network")
    for network, info in data["networks"].items():
        files = info.get("files") if isinstance(info, dict) else None
        if not isinstance(files, dict) or not files:
            raise bad(f"'networks.{network}.files' is {_short(files)}; expected", "a table of engine files")
        for name, record in files.items():
            size = record.get("size") if isinstance(record, dict) else None
            if not isinstance(size, int) or isinstance(size, bool) or not isinstance(record.get("sha256"), str):
                raise bad(f"'networks.{network}.files.{name}' is {_short(record)}; expected", "{size, sha256}")


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    try:
        atomic_write_bytes(folder / MANIFEST, data)
    except OSError as exc:
        raise write_error(folder, exc, f"writing {folder / MANIFEST}", len(data)) from exc


FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space left, a file past the size limit, a quota
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n} bytes"


class WriteError(EngineError):
    """A full disk or a folder that cannot be written, named (so it is not wrapped again)."""


def write_error(folder: Path, exc: OSError, what: str, needed: int | None = None) -> Exception:
    """A build's ``OSError`` as the error to raise: a full disk (or file size limit) and a folder that cannot be written
    become an :class:`EngineError` naming the folder, what was being written and what to do; any other is kept."""
    if exc.errno in FULL:
        try:
            free = f"{_megabytes(shutil.disk_usage(folder if folder.exists() else folder.parent).free)} free there"
        except OSError:
            free = "free space unknown"
        size = f"needs about {_megabytes(needed)}" if needed else "needs about the size of the source weights"
        limit = " (a file size limit: ulimit -f)" * (exc.errno == errno.EFBIG)
        return WriteError(
            f"no space left for the engines in '{folder}' while {what} ({exc.strerror}{limit}); a build {size} "
            f"(its engine files and their temporary copies; {free}); nothing partial was kept. Free some space, or "
            "build into another folder (-o DIR, or IPA_RT_CACHE for the cache), then build again"
        )
    if exc.errno in DENIED:
        return WriteError(
            f"cannot write the engines in '{folder}' ({what}: {exc.strerror}); a build writes its engine files and a "
            "lock file there. Give this user write permission to it, or build into another folder (-o DIR, or "
            "IPA_RT_CACHE for the cache)"
        )
    return exc


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
            st = path.stat()
            if st.st_size != record["size"]:
                raise EngineError(
                    f"engine file '{path}' ({network}) has {st.st_size} bytes; the manifest recorded {record['size']} "
                    f"(truncated or overwritten); {REBUILD}"
                )
            # the file the build placed (same mtime) is trusted as make does; any other is hashed, once per size and
            # mtime (the cache's hash memo: a copied folder is not hashed again at every load)
            if record.get("mtime_ns") is not None and st.st_mtime_ns != record["mtime_ns"]:
                digest = hashed_sources({name: path})[name]["sha256"]
                if digest != record["sha256"]:
                    raise EngineError(
                        f"engine file '{path}' ({network}) is not the one this folder's engines were built with "
                        f"(sha256 {digest[:12]}..., the manifest recorded {record['sha256'][:12]}...: replaced by "
                        f"another engine's file or edited); copy the whole engine folder, never single files; {REBUILD}"
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


LOCK = ".ipa_rt.lock"


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` for the whole build: a second build waits, then finds the work done."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK, "a+")  # closed by the with below
    except OSError as exc:
        if exc.errno not in DENIED or not (folder / LOCK).is_file():
            raise write_error(folder, exc, f"creating its lock file {folder / LOCK}") from exc
        handle = open(folder / LOCK)  # a read-only folder: flock needs no write access to reuse
    with handle:
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
    try:
        atomic_write_bytes(memo_path, json.dumps(memo, sort_keys=True).encode())
    except (OSError, CheckpointError):  # a read-only or full cache: the memo saves time only, the hashes are taken
        pass
    return records


def reuse_or_build(
    folder: Path, ident: dict[str, Any], rebuild: bool, device: torch.device, build: Callable[[Path], None],
    say: Callable[[str], None], what: str, needed: int | None = None,
) -> Path:  # fmt: skip
    """The one way every engine folder is made: reused when its manifest names ``ident`` (and its files check out),
    an :class:`EngineError` saying what differs when it holds other engines, else ``build(folder)`` under the folder's
    lock (a second builder waits, then reuses); a failed first build leaves no folder behind. What a killed build left
    (its private folder, a temporary manifest) is removed under the lock; a full disk or a folder that cannot be written
    is an :class:`EngineError` naming the folder (``needed``: the bytes a build takes, for that message)."""
    fresh = not folder.exists()
    with build_lock(folder):
        _remove_leftovers(folder)
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
        except BaseException as exc:
            if fresh:
                shutil.rmtree(folder, ignore_errors=True)
            cause = None if isinstance(exc, WriteError) else _os_error(exc)  # a WriteError names the folder already
            if cause is not None:
                what = f"writing {cause.filename}" if cause.filename else "writing the engine files"
                error = write_error(folder, cause, what, needed)
                if error is not cause:
                    raise error from exc
            raise
    return folder


def _os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind ``exc``: itself, or the cause of an error a stage wrapped it in (an export's)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _remove_leftovers(folder: Path) -> None:
    """A killed build's private folder (``.build-*``) and temporary files (``.*.tmp``): nobody else writes them while
    the lock is held, so they are a dead process's. Best effort: a read-only folder keeps them (and is still read)."""
    for path in folder.glob(".build-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            path.unlink()
