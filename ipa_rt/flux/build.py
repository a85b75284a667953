"""Building Flux engines into a folder with a manifest, reusing them, and loading a pipeline that runs them.

The folder's name in the cache (``$IPA_RT_CACHE``) is a hash of what the engines depend on: the transformer's and the
adapters' files (sha256), the image encoder, the static shapes, backend, precision and the versions that shape the
export. A build happens under a lock, writes into a private folder and appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .. import console
from ..cache import cache_root
from ..checkpoint import adapter_sources, atomic_write_bytes
from ..errors import ConfigError, EngineError
from ..models import _read_json
from .engine import INPUTS, NETWORK, EngineTransformer, ExportedTransformer, check_backend, example_inputs, input_names

DEFAULT_SAMPLE_SIZE = 128  # diffusers' Flux and Chroma pipelines: latent size of the default image (1024² for FLUX.1)
SHAPE_OPTIONS = ("height", "width", "batch", "max_sequence_length", "images")
OPTIONS = (*SHAPE_OPTIONS, "precision", "rebuild")


def _options(vae_config: dict[str, Any], engine_options: dict[str, Any] | None) -> dict[str, Any]:
    options = dict(engine_options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"engine_options {unknown} are unknown for Flux engines; expected some of {OPTIONS}")
    size = DEFAULT_SAMPLE_SIZE * 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)  # diffusers' default
    shapes = {"height": size, "width": size, "batch": 1, "max_sequence_length": 512, "images": 1}
    for key in SHAPE_OPTIONS:
        value = options.get(key, shapes[key])
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"engine_options['{key}'] is {value!r}; expected a positive whole number")
        shapes[key] = value
    return {"shapes": shapes, "precision": options.get("precision", "fp32"), "rebuild": bool(options.get("rebuild"))}


def _sources(base: str, adapters: list, encoder: Any) -> dict[str, dict[str, Any]]:
    """sha256 records of every file the engine's numbers come from (hashes memoised by size and mtime)."""
    from ..export.build import adapter_file, files_under, hub_snapshot
    from ..export.manifest import file_record

    memo_path = cache_root() / "source-hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    root = Path(base) if Path(base).is_dir() else hub_snapshot(base, ["model_index.json", "transformer/*"])
    files = {
        f"base/{p.relative_to(root).as_posix()}": p for p in files_under(root, ["model_index.json", "transformer"])
    }
    files |= {f"ip_adapter_{i}": adapter_file(src) for i, src in enumerate(adapters)}
    if isinstance(encoder, (str, os.PathLike)) and Path(encoder).is_dir():
        files |= {f"image_encoder/{p.name}": p for p in files_under(Path(encoder), ["."])}
    records = {role: file_record(path, memo.get(str(path.resolve()))) for role, path in files.items()}
    memo.update({r["path"]: r for r in records.values()})
    atomic_write_bytes(memo_path, json.dumps(memo, sort_keys=True).encode())
    return records


def _identity(cls_name: str, backend: str, options: dict, sources: dict, encoder: Any) -> dict[str, Any]:
    from ..export.manifest import FORMAT, versions

    keep = ("ipa_rt", "torch", "diffusers", "transformers", "onnx", backend if backend != "tensorrt" else "tensorrt")
    return {
        "format": FORMAT,
        "kind": "flux",
        "pipeline": cls_name,
        "backend": backend,
        "precision": options["precision"],
        "shapes": options["shapes"],
        "sources": {role: r["sha256"] for role, r in sources.items()},
        "image_encoder": os.fspath(encoder) if isinstance(encoder, (str, os.PathLike)) else None,
        "versions": {k: v for k, v in versions().items() if k in keep},
    }


def flux_engines(
    base: str | os.PathLike,
    ip_adapter: Any,
    image_encoder: Any,
    backend: str,
    engine_options: dict[str, Any] | None = None,
    out: str | os.PathLike | None = None,
    subfolder: Any = None,
    weight_name: Any = None,
) -> Path:
    """Build the transformer engine for ``base`` with ``ip_adapter`` (into ``out``, else the cache) or find it built;
    returns the folder."""
    from ..export.build import cache_key
    from ..export.manifest import build_lock, check_engine_dir, differences, read_manifest
    from .pipelines import pipeline_class_of, runtime_class

    check_backend(backend)
    if ip_adapter is None:
        raise ConfigError("Flux engines are built with their IP-Adapter(s): give ip_adapter")
    base = os.fspath(base)
    cls = runtime_class(pipeline_class_of(base) or "FluxPipeline")
    adapters = adapter_sources(ip_adapter, subfolder, weight_name)
    encoder = image_encoder if image_encoder is not None else "image_encoder"
    transformer_class = _read_json(base, "transformer/config.json", {}).get("_class_name")
    if transformer_class not in INPUTS:
        raise ConfigError(
            f"engines for a {transformer_class} are not supported yet (Flux engines: {sorted(INPUTS)}); use "
            "backend='torch'"
        )
    options = _options(_read_json(base, "vae/config.json", {}), engine_options)
    sources = _sources(base, adapters, encoder)
    ident = _identity(cls.__name__, backend, options, sources, encoder)
    folder = Path(out) if out is not None else cache_root() / f"{backend}-flux-{cache_key(ident)}"
    fresh = not folder.exists()
    with build_lock(folder):
        if (folder / "manifest.json").exists() and not options["rebuild"]:
            old = read_manifest(folder)
            diff = differences(old.get("identity", {}), ident)
            if diff:
                raise EngineError(
                    f"'{folder}' holds other engines; what differs (built -> requested): {'; '.join(diff[:8])}; "
                    "rebuild with --rebuild (or engine_options={'rebuild': True})"
                )
            check_engine_dir(folder, old, torch.device("cuda" if backend == "tensorrt" else "cpu"))
            console.say(f"reusing the Flux engine built in '{folder}'")
            return folder
        try:
            _build(cls, base, adapters, encoder, backend, options, ident, sources, folder)
        except BaseException:
            if fresh:  # a failed first build leaves no folder behind
                shutil.rmtree(folder, ignore_errors=True)
            raise
    return folder


def _build(cls, base, adapters, encoder, backend, options, ident, sources, folder: Path) -> None:
    from ..export.build import SUFFIX, network_record
    from ..export.contracts import Contract
    from ..export.manifest import FORMAT, write_manifest
    from ..export.onnx_export import export_onnx
    from .pipelines import load_pretrained

    shapes = options["shapes"]
    pipe = load_pretrained(base, adapters, encoder, dtype=torch.float32)
    names = input_names(pipe.transformer)
    inputs = example_inputs(
        pipe, shapes["height"], shapes["width"], shapes["batch"], shapes["max_sequence_length"], shapes["images"]
    )
    module = ExportedTransformer(pipe.transformer, pipe.transformer.encoder_hid_proj, names).eval()
    batch = (shapes["batch"],) * 3
    contract = Contract(NETWORK, module, inputs, ("noise_pred",), batch=batch, meta={"shapes": shapes})
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=folder))
    try:
        console.say(f"exporting the {cls.__name__} transformer to ONNX ({shapes['height']}x{shapes['width']})")
        onnx_path = export_onnx(contract, work / f"{NETWORK}.onnx")
        files = [onnx_path, *(p for p in work.iterdir() if p.name.startswith(f"{NETWORK}.onnx."))]
        if backend == "openvino":
            from ..export.openvino_engine import check_precision, convert_onnx

            check_precision(options["precision"])
            files, _ = convert_onnx(onnx_path, work / "openvino" / f"{NETWORK}.xml", NETWORK, options["precision"])
        elif backend == "tensorrt":
            from ..export.engines import build_trt_engine, tensorrt_version, timing_cache_path
            from ..export.manifest import gpu_info

            plan = work / f"{NETWORK}{SUFFIX['tensorrt']}"
            cache = timing_cache_path(cache_root(), tensorrt_version() or "", gpu_info(torch.device("cuda")))
            files = [build_trt_engine(onnx_path, plan, contract.profile(), cache)]
        elif options["precision"] != "fp32":
            raise ConfigError(f"precision {options['precision']!r} is OpenVINO's; ONNX Runtime engines are fp32")
        if (folder / "manifest.json").exists():  # a rebuild: the old engine's files go, nothing else of the folder's
            old = json.loads((folder / "manifest.json").read_text())
            for name in old.get("networks", {}).get(NETWORK, {}).get("files", {}):
                (folder / name).unlink(missing_ok=True)
        placed = []
        for f in files:
            dst = folder / f.relative_to(work)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dst)
            placed.append(dst)
        record = network_record(contract, placed, folder)
        manifest = {
            "format": FORMAT,
            "kind": "flux",
            "backend": backend,
            "precision": options["precision"],
            "identity": ident,
            "sources": sources,
            "shapes": shapes,
            "pipeline": cls.__name__,
            "base": os.path.abspath(base) if os.path.isdir(base) else base,
            "adapters": [sources[f"ip_adapter_{i}"]["path"] for i in range(len(adapters))],
            "image_encoder": pipe.image_encoder.config.name_or_path if pipe.image_encoder is not None else None,
            "inputs": list(names),
            "networks": {NETWORK: record},
        }
        write_manifest(folder, manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    console.say(f"Flux engine written to '{folder}'")


def load_flux_engine(folder: str | os.PathLike, device: torch.device | str = "cpu") -> Any:
    """The folder's pipeline class (``ipa_rt.flux``'s) whose transformer runs the engine in ``folder``."""
    from diffusers.configuration_utils import FrozenDict

    from ..export.loader import _engine
    from ..export.manifest import check_engine_dir, read_manifest
    from .pipelines import runtime_class

    folder, device = Path(folder), torch.device(device)
    manifest = read_manifest(folder)
    if manifest.get("kind") != "flux":
        raise ConfigError(f"'{folder}' holds UNet engines; load it with ipa_rt.Pipeline.from_engine")
    check_engine_dir(folder, manifest, device)
    info = manifest["networks"][NETWORK]
    engine = _engine(folder, NETWORK, info, manifest, device)
    cls = runtime_class(manifest["pipeline"])
    base = manifest["base"]
    config = FrozenDict(_read_json(base, "transformer/config.json", {}))
    shapes = {name: spec["profile"][0] for name, spec in info["inputs"].items()}
    transformer = EngineTransformer(engine, config, tuple(manifest["inputs"]), shapes, manifest["shapes"])
    with console.hushed(bars=True):
        pipe = cls.from_pretrained(base, transformer=transformer, dtype=torch.float32).to(device)
    pipe.load_ip_adapter(
        manifest["adapters"],
        weight_name=None,
        image_encoder_pretrained_model_name_or_path=manifest["image_encoder"],
        image_encoder_dtype=torch.float32,
    )
    return pipe
