"""The one engine writer of every build (SD1.5/SDXL's ``ipa_rt build`` and the families' heavy network): each
contract exported to ONNX (kept between builds with ``IPA_RT_KEEP_EXPORTS=1``), converted to the backend's engine,
recorded; the files placed into the folder and the manifest written last. Everything is written into a private
folder first (``.build-*``, removed by the next build if this one is killed), so a folder never holds half an engine.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..cache import cache_root
from .contracts import Contract
from .engines import build_trt_engine, tensorrt_version, timing_cache_path
from .export_cache import export_cached
from .manifest import gpu_info, sha256_file, write_manifest
from .onnx_export import export_onnx
from .openvino_engine import convert_onnx

SUFFIX = {"onnxruntime": ".onnx", "tensorrt": ".plan", "openvino": ".xml"}
OWNED = ("onnx", "tensorrt", "openvino", "model")  # the folders a build replaces whole


def write_engines(
    out: Path, contracts: Sequence[Contract], manifest: dict[str, Any], ident: dict[str, Any],
    say: Callable[[str], None], *, exporter: str = "torchscript", calibration: dict | None = None,
    overflow_fix: bool = False, extra: Callable[[Path], None] | None = None, started: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write ``contracts``' engines of ``manifest["backend"]`` at ``manifest["precision"]`` into ``out`` with
    ``manifest`` plus their ``networks`` records. ``calibration``: an int8 build's ``{"feeds", "record"}``;
    ``extra(folder)``: other files of the build (the SD pipeline's configs under ``model/``); ``started``: when the
    build began (``time.perf_counter()``), for the manifest's ``built_seconds``. Returns the manifest written."""
    backend, precision = manifest["backend"], manifest["precision"]
    started = time.perf_counter() if started is None else started
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        networks: dict[str, dict[str, Any]] = {}
        for i, contract in enumerate(contracts, 1):
            start, name = time.perf_counter(), contract.name
            target = tmp / "onnx" / f"{name}.onnx"
            export = lambda c=contract, t=target: export_onnx(c, t, exporter=exporter)  # noqa: E731
            onnx_path, kept = export_cached(contract, ident, target, export)
            stages = [f"ONNX export {'reused (kept exports)' if kept else f'{time.perf_counter() - start:.1f} s'}"]
            start = time.perf_counter()
            feeds = calibration["feeds"] if calibration else None
            files, report = _convert(contract, onnx_path, tmp, backend, precision, feeds, overflow_fix)
            took = f"{time.perf_counter() - start:.1f} s"
            if backend == "openvino":
                stages.append(f"OpenVINO IR{' + int8 quantisation' if report else ''} {took}")
            elif backend == "tensorrt":
                stages.append(f"TensorRT build {took}")
            networks[name] = network_record(contract, files, tmp)
            if report is not None:
                calib = calibration["record"] | {"samples": len(calibration["feeds"][name])}
                networks[name]["quantization"] = report | {"calibration": calib}
            say(f"[{i}/{len(contracts)}] {name}: {' -> '.join(stages)}")
        if extra is not None:
            extra(tmp)
        _place(tmp, out)
        manifest = {**manifest, "networks": networks, "built_seconds": round(time.perf_counter() - started, 1)}
        write_manifest(out, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _convert(
    contract: Contract, onnx_path: Path, tmp: Path, backend: str, precision: str, feeds: dict | None,
    overflow_fix: bool,
) -> tuple[list[Path], dict | None]:  # fmt: skip
    """One network's engine files from its ONNX and, for a quantised network, its precision report."""
    name = contract.name
    if backend == "tensorrt":
        timing = timing_cache_path(cache_root(), tensorrt_version() or "", gpu_info(torch.device("cuda")))
        return [build_trt_engine(onnx_path, tmp / "tensorrt" / f"{name}.plan", contract.profile(), timing)], None
    if backend == "openvino":
        return convert_onnx(onnx_path, tmp / "openvino" / f"{name}.xml", name, precision, feeds, overflow_fix)
    return [onnx_path, *onnx_path.parent.glob(onnx_path.name + ".data")], None


def _place(tmp: Path, out: Path) -> None:
    """The new files into ``out``: the old manifest goes first (the old engines are no longer vouched for), then the
    old build's folders and files (a folder an earlier ipa_rt wrote keeps its files by the manifest's names)."""
    old = out / "manifest.json"
    try:
        files = [f for record in json.loads(old.read_text())["networks"].values() for f in record["files"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none, or a broken one (a rebuild)
        files = []
    old.unlink(missing_ok=True)
    for file in files:
        if isinstance(file, str) and ".." not in Path(file).parts:
            (out / file).unlink(missing_ok=True)
    for sub in OWNED:
        if (out / sub).exists():
            shutil.rmtree(out / sub)
        if (tmp / sub).exists():
            os.replace(tmp / sub, out / sub)


def network_record(contract: Contract, files: list[Path], root: Path) -> dict[str, Any]:
    return {
        # mtime: moving a file into place keeps it, so a load hashes only a file that is not the one the build wrote
        "files": {f.relative_to(root).as_posix(): _file_record(f) for f in files},
        "inputs": {
            name: {"dtype": str(x.dtype).removeprefix("torch."), "profile": [list(s) for s in prof]}
            for (name, x), prof in zip(contract.inputs.items(), contract.profile().values(), strict=True)
        },
        "outputs": list(contract.outputs),
        "batch": list(contract.batch),
    }


def _file_record(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}
