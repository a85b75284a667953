"""Engines for the one heavy network of a pipeline ipa_rt runs inside diffusers' own classes (Flux's and Chroma's
transformer, Kolors' UNet): what the engine depends on, a cached build that appears whole or not at all, the
manifest, and opening the engine again.

The folder's name in the cache (``$IPA_RT_CACHE``) is a hash of the identity: the network's and the adapters' files
(sha256, memoised by size and mtime), the image encoder, the static shapes, backend, precision and the versions that
shape the export. A build happens under a lock, its files written by :mod:`.writer` (every build's writer).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import console
from ..cache import cache_root
from ..errors import ConfigError

BACKENDS = ("onnxruntime", "openvino", "tensorrt")


def check_backend(backend: str, what: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} has no {what} engines; expected one of {BACKENDS}")
    from .engines import require_backend

    require_backend(backend)  # the extra named before any work


def shape_options(
    engine_options: dict[str, Any] | None, defaults: dict[str, int], what: str, backend: str
) -> dict[str, Any]:
    """``engine_options`` → ``{"shapes", "precision", "rebuild"}``: every shape a positive whole number."""
    options = dict(engine_options or {})
    allowed = (*defaults, "precision", "rebuild")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"engine_options {unknown} are unknown for {what} engines; expected some of {allowed}")
    shapes = {}
    for key, default in defaults.items():
        value = options.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"engine_options['{key}'] is {value!r}; expected a positive whole number")
        shapes[key] = value
    precision = options.get("precision", "fp32")
    if backend == "openvino":  # "auto": no int8 calibration for these networks, so bf16 where the CPU has it, else fp32
        from .openvino_engine import check_precision, resolve_precision

        precision = resolve_precision(precision, int8=False)
        check_precision(precision)
    elif precision != "fp32":
        raise ConfigError(f"precision {precision!r} is OpenVINO's; {backend} engines of {what} models are fp32")
    return {"shapes": shapes, "precision": precision, "rebuild": bool(options.get("rebuild"))}


def source_records(base: str, parts: tuple[str, ...], adapters: list, encoder: Any) -> dict[str, dict[str, Any]]:
    """sha256 records of every file the engine's numbers come from: ``parts`` of the base model, the adapters and
    the image encoder's folder."""
    from .build import adapter_file, files_under, hub_snapshot
    from .manifest import hashed_sources

    patterns = [p if "." in p else f"{p}/*" for p in parts]
    root = Path(base) if Path(base).is_dir() else hub_snapshot(base, patterns)
    files = {f"base/{p.relative_to(root).as_posix()}": p for p in files_under(root, list(parts))}
    files |= {f"ip_adapter_{i}": adapter_file(src) for i, src in enumerate(adapters)}
    if isinstance(encoder, (str, os.PathLike)) and Path(encoder).is_dir():
        files |= {f"image_encoder/{p.name}": p for p in files_under(Path(encoder), ["."])}
    return hashed_sources(files)


def identity(kind: str, pipeline: str, backend: str, options: dict, sources: dict, encoder: Any) -> dict[str, Any]:
    from .manifest import FORMAT, versions

    keep = ("ipa_rt", "torch", "diffusers", "transformers", "onnx", backend)
    return {
        "format": FORMAT,
        "kind": kind,
        "pipeline": pipeline,
        "backend": backend,
        "precision": options["precision"],
        "shapes": options["shapes"],
        "sources": {role: r["sha256"] for role, r in sources.items()},
        "image_encoder": os.fspath(encoder) if isinstance(encoder, (str, os.PathLike)) else None,
        "versions": {k: v for k, v in versions().items() if k in keep},
    }


def cached_build(
    ident: dict[str, Any], out: str | os.PathLike | None, rebuild: bool, build: Callable[[Path], None]
) -> Path:
    """The folder for ``ident`` (``out``, else the cache): reused when it holds these engines, else ``build`` into it
    (:func:`~ipa_rt.export.manifest.reuse_or_build`)."""
    from .build import cache_key
    from .manifest import reuse_or_build

    backend, kind = ident["backend"], ident["kind"]
    folder = Path(out) if out is not None else cache_root() / f"{backend}-{kind}-{cache_key(ident)}"
    device = torch.device("cuda" if backend == "tensorrt" else "cpu")
    return reuse_or_build(folder, ident, rebuild, device, build, console.say, f"{kind} engine")


def open_engine(folder: str | os.PathLike, device: torch.device | str, kind: str) -> tuple[dict[str, Any], Any]:
    """``(manifest, engine)`` of a folder a family's build wrote for ``kind`` (checked: files, sources)."""
    from .loader import network_engine
    from .manifest import check_engine_dir, read_manifest

    folder, device = Path(folder), torch.device(device)
    manifest = read_manifest(folder)
    if manifest.get("kind") != kind:
        found = manifest.get("kind") or "UNet (SD1.5/SDXL)"
        raise ConfigError(
            f"'{folder}' holds {found} engines, not {kind} ones; load it with ipa_rt.Pipeline.from_engine"
        )
    check_engine_dir(folder, manifest, device)
    name = next(iter(manifest["networks"]))
    return manifest, network_engine(folder, name, manifest["networks"][name], manifest, device)


def built_shapes(manifest: dict[str, Any]) -> dict[str, list[int]]:
    """Each engine input's static shape (the profile's optimum)."""
    info = next(iter(manifest["networks"].values()))
    return {name: spec["profile"][1] for name, spec in info["inputs"].items()}
