"""``ipa_rt build``: export every network of a pipeline to ONNX, build ONNX Runtime or TensorRT engines, and
write them with their manifest into an engine directory; :func:`load_engine_pipeline` reads one back.

A build is named by its identity (request, sources' sha256, versions): the same build rewrites nothing, a different
or broken one is refused unless ``rebuild`` is set; files move into place from a private folder, the manifest last,
under a file lock (docs/reference/manifest.md: the identity, the directory, when a directory is refused).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import console
from ..adapters.checkpoint import AdapterSource
from ..cache import cache_root
from ..controls.t2i import feature_layout
from ..core import PipelineCore
from ..errors import ConfigError
from .contracts import Contract, all_contracts, residual_names
from .engines import check_tensorrt, require_backend, tensorrt_version
from .manifest import FORMAT, gpu_info, hashed_sources, reuse_or_build, versions
from .onnx_export import check_exporter
from .writer import write_engines

ENGINE_BACKENDS = ("onnxruntime", "tensorrt", "openvino")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
BASE_PARTS = (
    "model_index.json",
    "unet",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
    "feature_extractor",
    "image_encoder",
)


@dataclass
class BuildRequest:
    """What ``ipa_rt build`` is asked for; with the sources' hashes, this names the engines."""

    base: str
    ip_adapter: list[str]
    image_encoder: str | None = None
    backend: str = "onnxruntime"
    height: int = 512
    width: int = 512
    batch: int = 1
    dtype: str = "fp32"
    precision: str = "fp32"  # OpenVINO's compute precision: fp32 (faithful), bf16, int8 or int8-weights
    lora: list[str] = field(default_factory=list)
    controlnet: list[str] = field(default_factory=list)  # diffusers ControlNetModel folders
    t2i_adapter: list[str] = field(default_factory=list)  # diffusers T2IAdapter folders
    vae: str | None = None  # another autoencoder folder or hub id, or "taesd" (the fast decoder)
    weight_name: list[str | None] = field(default_factory=list)  # hub / folder form of ip_adapter
    subfolder: list[str | None] = field(default_factory=list)
    motion_adapter: str | None = None  # AnimateDiff MotionAdapter folder or hub id: a video build
    frames: int = 0  # frames per clip of a video build (static), 0 for stills
    exporter: str = "torchscript"  # the ONNX exporter (onnx_export.EXPORTERS): the tracer, or torch.export's
    calibration_prompts: list[str] = field(default_factory=list)  # int8: the UNet's calibration (else built-in)
    calibration_images: list[str] = field(default_factory=list)  # int8: image files or folders of them
    # int8: weights kept to half the int8 range for CPUs without VNNI/AMX (NNCF's overflow fix; ipa_rt.cpu); None:
    # as the building CPU needs
    int8_overflow_fix: bool | None = None
    # a single-file base: a diffusers folder whose configs (and tokenizer) to use, and CLIP's tokenizer folder
    config: str | None = None
    tokenizer: str | None = None

    def overflow_fix(self) -> bool:
        """Whether this int8 build keeps its weights to half the range (see ``int8_overflow_fix``)."""
        from ..cpu import int8_saturates

        return int8_saturates() if self.int8_overflow_fix is None else bool(self.int8_overflow_fix)

    def __post_init__(self) -> None:
        if self.backend == "openvino":  # "auto": the fastest precision measured for this CPU's class, named as such
            from .openvino_engine import resolve_precision

            self.precision = resolve_precision(self.precision)

    def check(self) -> None:
        if self.backend not in ENGINE_BACKENDS:
            raise ConfigError(f"backend {self.backend!r} is unknown; expected one of {ENGINE_BACKENDS}")
        check_exporter(self.exporter)
        allowed = {"tensorrt": sorted(DTYPES), "onnxruntime": ["fp16", "fp32"], "openvino": ["fp32"]}[self.backend]
        if self.dtype not in allowed:
            hint = " (OpenVINO engines are exported in fp32: choose --precision fp32|bf16|int8|int8-weights)" * (
                self.backend == "openvino"
            )
            raise ConfigError(
                f"dtype {self.dtype!r} is not supported by {self.backend}; expected one of {allowed}{hint}"
            )
        if self.backend != "openvino" and self.precision != "fp32":
            raise ConfigError(
                f"precision {self.precision!r} applies to backend 'openvino'; {self.backend} engines take their "
                "precision from dtype (--dtype)"
            )
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % 8:
                raise ConfigError(f"{name} is {value!r}; expected a positive multiple of 8")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ConfigError(f"batch is {self.batch!r}; expected a positive integer")
        if not self.ip_adapter:
            raise ConfigError("an engine build needs at least one IP-Adapter (--ip-adapter FILE)")
        if self.motion_adapter is not None and (not isinstance(self.frames, int) or self.frames < 1):
            raise ConfigError(f"frames is {self.frames!r}; a video build (motion_adapter) needs a positive count")
        if self.motion_adapter is not None and (self.controlnet or self.t2i_adapter):
            raise ConfigError(
                "video engines with ControlNets or T2I-Adapters are not supported yet; use backend='torch'"
            )
        self._check_calibration()
        if self.motion_adapter is None and self.frames:
            raise ConfigError("frames applies to video builds; pass the motion adapter too (--motion-adapter DIR)")
        if self.backend == "openvino":  # what this CPU can run: after the request's own consistency
            from .openvino_engine import check_precision

            check_precision(self.precision)

    def _check_calibration(self) -> None:
        calibrated = self.calibration_prompts or self.calibration_images
        if self.precision != "int8" and calibrated:
            raise ConfigError(
                f"calibration prompts/images apply to precision 'int8' (calibrated int8); got precision "
                f"{self.precision!r}"
            )
        if self.precision == "int8" and (self.controlnet or self.t2i_adapter or self.motion_adapter):
            raise ConfigError(
                "precision 'int8' calibrates a stills UNet without ControlNets or T2I-Adapters (its calibration "
                "does not draw their residuals); use precision 'int8-weights' or 'bf16' for this build"
            )
        if any(not isinstance(p, str) or not p.strip() for p in self.calibration_prompts):
            raise ConfigError("calibration_prompts holds an empty or non-text entry; expected prompt strings")

    def calibration_files(self) -> list[Path]:
        from .calibration import image_files

        return [f for entry in self.calibration_images for f in image_files(entry)]

    def sources(self) -> list[AdapterSource]:
        none = [None] * len(self.ip_adapter)
        rows = zip(self.ip_adapter, self.weight_name or none, self.subfolder or none, strict=True)
        return [AdapterSource(a, weight_name=w, subfolder=s) for a, w, s in rows]


# --- source files ------------------------------------------------------------------------------------------------
def hub_snapshot(repo: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as exc:
        raise ConfigError(f"'{repo}' is neither a local path nor a reachable hub id ({exc})") from exc


def files_under(root: Path, parts: Sequence[str]) -> list[Path]:
    out = []
    for part in parts:
        p = root / part
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    return out


def adapter_file(src: AdapterSource) -> Path:
    path = Path(os.fspath(src.source))
    if path.is_file():
        return path
    if path.is_dir() and src.weight_name:
        return path / (src.subfolder or "") / src.weight_name
    if not path.exists() and src.weight_name:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(str(src.source), src.weight_name, subfolder=src.subfolder))
        except Exception as exc:
            raise ConfigError(
                f"IP-Adapter '{src.source}' is neither a local file nor a reachable hub id ({exc})"
            ) from exc
    raise ConfigError(
        f"IP-Adapter '{src.source}' does not exist; expected a .safetensors/.bin file (or a folder/hub id with "
        "weight_name)"
    )


def source_records(req: BuildRequest) -> dict[str, dict[str, Any]]:
    """``{role: {path, size, mtime_ns, sha256}}`` of every file the engines are made from (hashes memoised)."""
    roles: dict[str, Path] = {}
    base = Path(req.base)
    if base.is_file():  # a single-file checkpoint: the file is the base model's only source
        roles[f"base/{base.name}"] = base
    elif not base.is_dir():
        base = hub_snapshot(req.base, [f"{p}/*" if "." not in p else p for p in BASE_PARTS])
    if not base.is_file() and not (base / "model_index.json").is_file():
        raise ConfigError(f"base model '{req.base}' has no model_index.json; expected a diffusers-format folder")
    for f in files_under(base, BASE_PARTS) if base.is_dir() else []:
        roles[f"base/{f.relative_to(base).as_posix()}"] = f
    adapters = req.sources()
    for a, src in enumerate(adapters):
        roles[f"ip_adapter_{a}/{adapter_file(src).name}"] = adapter_file(src)
    encoder = Path(req.image_encoder) if req.image_encoder else None
    if encoder is None:  # diffusers' default: the base's own encoder, else image_encoder/ beside the adapter
        beside = adapter_file(adapters[0]).parent / "image_encoder"
        encoder = beside if beside.is_dir() and not (base / "image_encoder").is_dir() else None
    elif encoder.is_file():  # a single-file encoder (ComfyUI's models/clip_vision)
        roles[f"image_encoder/{encoder.name}"], encoder = encoder, None
    elif not encoder.is_dir():
        encoder = hub_snapshot("/".join(encoder.parts[:2]), ["/".join(encoder.parts[2:]) + "/*"]).joinpath(
            *encoder.parts[2:]
        )
    if encoder is not None:
        for f in files_under(encoder, ["."]):
            roles[f"image_encoder/{f.relative_to(encoder).as_posix()}"] = f
    for i, lora in enumerate(req.lora):
        roles[f"lora_{i}/{Path(lora).name}"] = Path(lora)
    if req.vae is not None:
        vae = (
            Path(req.vae)
            if Path(req.vae).is_dir()
            else hub_snapshot(_vae_repo(req.vae, base), ["*.json", "*.safetensors"])
        )
        if not (vae / "config.json").is_file():
            raise ConfigError(f"vae '{req.vae}' has no config.json; expected a diffusers autoencoder folder")
        for f in files_under(vae, ["."]):
            roles[f"vae_override/{f.relative_to(vae).as_posix()}"] = f
    for kind, items, cls in (
        ("controlnet", req.controlnet, "ControlNetModel"),
        ("t2i_adapter", req.t2i_adapter, "T2IAdapter"),
        ("motion_adapter", [req.motion_adapter] if req.motion_adapter else [], "MotionAdapter"),
    ):
        for i, item in enumerate(items):
            folder = Path(item) if Path(item).is_dir() else hub_snapshot(item, ["*.json", "*.safetensors"])
            if not (folder / "config.json").is_file():
                raise ConfigError(f"{kind} '{item}' has no config.json; expected a diffusers {cls} folder")
            for f in files_under(folder, ["."]):
                roles[f"{kind}_{i}/{f.relative_to(folder).as_posix()}"] = f
    for key in ("config", "tokenizer"):  # a single file's configs and tokenizer name the engines too (not weights)
        folder = getattr(req, key)
        for f in sorted(Path(folder).rglob("*")) if folder else ():
            if f.suffix in {".json", ".txt"} and f.is_file():
                roles[f"{key}/{f.relative_to(folder).as_posix()}"] = f
    for i, image in enumerate(req.calibration_files()):  # int8: calibration images name the engines too
        roles[f"calibration_{i}/{image.name}"] = image
    for role, path in roles.items():
        if not path.is_file():
            raise ConfigError(f"source file '{path}' ({role}) does not exist")
    return hashed_sources(roles)


def _vae_repo(vae: str, base: Path) -> str:
    """``"taesd"`` as the base family's tiny-autoencoder hub id; anything else as given."""
    if vae != "taesd":
        return vae
    from ..models import FAMILIES, detect_family

    if base.is_file():
        from ..single_file import checkpoint_family, read_checkpoint

        return FAMILIES[checkpoint_family(read_checkpoint(base), str(base))].taesd
    index = json.loads((base / "model_index.json").read_text())
    return detect_family(index, json.loads((base / "unet" / "config.json").read_text()), str(base)).taesd


def build_identity(req: BuildRequest, sources: dict[str, dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Everything the engines depend on (the scale is not: it is an engine input)."""
    v = versions()
    keep = ["ipa_rt", "torch", "onnx", "diffusers", "transformers"]
    keep += {"tensorrt": ["tensorrt"], "openvino": ["openvino", "nncf"]}.get(req.backend, [])
    request = asdict(req)
    paths = (
        "base",
        "ip_adapter",
        "image_encoder",
        "lora",
        "controlnet",
        "t2i_adapter",
        "vae",
        "weight_name",
        "subfolder",
        "motion_adapter",
        "calibration_images",
        "config",
        "tokenizer",
    )
    for key in paths:
        request.pop(key)  # paths do not name a build; the files' hashes do
    if not req.motion_adapter:
        request.pop("frames")  # stills builds keep the identity they had before video existed
    if req.precision != "int8":
        request.pop("calibration_prompts")  # likewise builds without calibration
        request.pop("int8_overflow_fix")
    else:
        request["int8_overflow_fix"] = req.overflow_fix()  # as decided, whoever decided it
    return {
        "format": FORMAT,
        "request": request,
        "versions": {k: v[k] for k in keep},
        "gpu": gpu_info(device) if req.backend == "tensorrt" else None,
        "sources": {k: s["sha256"] for k, s in sources.items()},
    }


def cache_key(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


# --- the build ---------------------------------------------------------------------------------------------------
def build_engines(
    req: BuildRequest,
    out: str | os.PathLike,
    rebuild: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Build (or find already built) the engines of ``req`` in ``out``; returns ``out``."""
    req.check()
    require_backend(req.backend)  # the packages, named by their extra, before any work
    say = progress or console.say  # one line per stage: a build takes minutes, a reuse should say it is one
    out = Path(out)
    device = torch.device("cuda" if req.backend == "tensorrt" else "cpu")
    if req.backend == "tensorrt":
        check_tensorrt(tensorrt_version())
    sources = source_records(req)
    ident = build_identity(req, sources, device)
    build = lambda folder: _build(req, folder, sources, ident, device, say)  # noqa: E731
    # the engine files are about the size of the weights they are made from; a build holds its temporary copy too
    needed = 2 * sum(record["size"] for record in sources.values())
    return reuse_or_build(out, ident, rebuild, device, build, say, "engines", needed)


# The classes that load a build's models, by kind. ipa_rt.video.pipeline registers the video one when it is
# imported (`ipa_rt build --motion-adapter` and `ipa_rt.AnimateDiffPipeline` import it): the export layer serves the
# pipelines and never imports them.
_PIPELINES: dict[str, type[PipelineCore]] = {"stills": PipelineCore}


def register_video_pipeline(cls: type[PipelineCore]) -> type[PipelineCore]:
    """Class decorator: ``cls.from_pretrained(..., motion_adapter=...)`` loads the models of video builds."""
    _PIPELINES["video"] = cls
    return cls


def _pipeline_class(req: BuildRequest) -> type[PipelineCore]:
    kind = "video" if req.motion_adapter else "stills"
    if kind not in _PIPELINES:  # build_engines(...) in a process without ipa_rt.video.pipeline
        raise ConfigError(
            "a video build (motion_adapter) loads its models through ipa_rt.AnimateDiffPipeline: import "
            "ipa_rt.video.pipeline before build_engines(...), or use "
            "ipa_rt.AnimateDiffPipeline.from_pretrained(..., backend=...)"
        )
    return _PIPELINES[kind]


def _build(req, out: Path, sources, ident, device, say) -> None:
    started = time.perf_counter()
    say(f"[load] {req.base} + {len(req.ip_adapter)} IP-Adapter(s) ({req.dtype})")
    video = {"motion_adapter": req.motion_adapter} if req.motion_adapter else {}
    pipe = _pipeline_class(req).from_pretrained(  # in the engine's dtype: strongly typed engines keep the ONNX's types
        req.base,
        req.sources(),
        req.image_encoder,
        dtype=DTYPES[req.dtype],
        lora=req.lora or None,
        attention="sdpa",
        controlnet=req.controlnet or None,
        t2i_adapter=req.t2i_adapter or None,
        vae=req.vae,
        **video,
        **{k: v for k in ("config", "tokenizer") if (v := getattr(req, k))},  # a single-file base's
    )
    contracts = all_contracts(pipe, req.batch, req.height, req.width, req.frames)
    manifest = dict(format=FORMAT, identity=ident, request=ident["request"])
    manifest.update(
        sources=sources,
        backend=req.backend,
        dtype=req.dtype,
        precision=req.precision,
        io_dtype=DTYPE_NAMES[pipe.dtype],
        vae_dtype=DTYPE_NAMES[next(pipe.vae.parameters()).dtype] if pipe.vae is not None else None,
        vae_class=type(pipe.vae).__name__ if pipe.vae is not None else None,  # None: a UNet-only base
        versions=versions(),
        gpu=gpu_info(device),
        family=pipe.family.name,
        shapes={"batch": req.batch, "height": req.height, "width": req.width, "text_tokens": 77, "frames": req.frames},
        motion_adapter=req.motion_adapter,
        adapters=[
            {"variant": e.spec.name, "tokens": t, "origin": e.origin}
            for e, t in zip(pipe.adapters.entries, contracts[0].meta["tokens"], strict=True)
        ],
        controlnets=[
            {"origin": origin, "residuals": len(residual_names(contracts[0].inputs))} for origin in req.controlnet
        ],
        t2i_adapters=[
            {"origin": origin, "type": a.config["adapter_type"], "features": len(feature_layout(a.config))}
            for origin, a in zip(req.t2i_adapter, pipe.t2i.adapters if pipe.t2i is not None else [], strict=True)
        ],
        layers=len(pipe.adapters.layer_names),
        layer_names=pipe.adapters.layer_names,
        attention_blocks=_blocks(pipe),
        token_width=pipe.unet.config.cross_attention_dim,
        force_zeros_for_empty_prompt=pipe.base.force_zeros_for_empty_prompt,
    )
    calibration = _calibrate(req, pipe, contracts[0], say)
    extra = lambda folder: _write_model_files(pipe, folder / "model")  # noqa: E731
    written = write_engines(out, contracts, manifest, ident, say, exporter=req.exporter, calibration=calibration,
                            overflow_fix=req.overflow_fix(), extra=extra, started=started)  # fmt: skip
    say(f"engines written to '{out}' ({written['built_seconds']} s)")


def _calibrate(req: BuildRequest, pipe, unet: Contract, say) -> dict[str, Any] | None:
    """An int8 build's UNet calibration inputs (:mod:`.calibration`) and what the manifest says of them."""
    if req.backend != "openvino" or req.precision != "int8":
        return None
    from .calibration import calibration_set, encoder_feeds, unet_feeds

    start = time.perf_counter()
    calib = calibration_set(req.calibration_prompts, [str(f) for f in req.calibration_files()])
    feeds = {"unet": unet_feeds(pipe, unet.inputs, calib)}
    if pipe.image_encoder is not None:
        feeds["image_encoder"] = encoder_feeds(pipe, calib)
    record = {"source": calib.source, "prompts": len(calib.prompts), "images": len(calib.images),
              "sha256": calib.identity()}  # fmt: skip
    say(f"[calibrate] {len(feeds['unet'])} UNet input sets from {len(calib.prompts)} prompts and {len(calib.images)} "
        f"images ({calib.source}) {time.perf_counter() - start:.1f} s")  # fmt: skip
    return {"feeds": feeds, "record": record}


def _blocks(pipe) -> dict:
    from ..adapters.scale import attention_blocks

    return {side: {str(k): v for k, v in d.items()} for side, d in attention_blocks(pipe.unet).items()}


def _write_model_files(pipe, folder: Path) -> None:
    """Configs, tokenizers, scheduler and feature extractor: what the engine pipeline needs besides engines."""
    folder.mkdir(parents=True)
    configs = {
        "unet": dict(pipe.unet.config),
        "vae": dict(pipe.vae_config),  # a UNet-only base's too: its latent space
        **{f"text_encoder_{i}": e.config.to_dict() for i, e in enumerate(pipe.text_encoders)},
    }
    if pipe.image_encoder is not None:
        configs["image_encoder"] = pipe.image_encoder.config.to_dict()
    for i, net in enumerate(pipe.control.nets if pipe.control is not None else []):
        configs[f"controlnet_{i}"] = dict(net.config)
    for i, adapter in enumerate(pipe.t2i.adapters if pipe.t2i is not None else []):
        configs[f"t2i_adapter_{i}"] = dict(adapter.config)
    (folder / "configs.json").write_text(json.dumps(configs, indent=1, sort_keys=True, default=_jsonable))
    for i, tok in enumerate(pipe.tokenizers):
        tok.save_pretrained(folder / f"tokenizer_{i}")
    pipe.scheduler.save_pretrained(folder / "scheduler")
    if pipe.feature_extractor is not None:
        pipe.feature_extractor.save_pretrained(folder / "feature_extractor")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


# --- the cache behind from_pretrained(..., backend=...) ----------------------------------------------------------
def request_for_pretrained(
    base, sources, image_encoder, backend, dtype, lora, structure, options, vae=None, motion_adapter=None,
    config=None, tokenizer=None,
) -> BuildRequest:  # fmt: skip
    """The :class:`BuildRequest` behind ``Pipeline.from_pretrained(..., backend=...)``."""
    if vae is not None and not isinstance(vae, (str, os.PathLike)):
        raise ConfigError(f"backend {backend!r} needs vae as a folder, hub id or 'taesd'; got a {type(vae).__name__}")
    allowed = {"height", "width", "batch", "precision", "rebuild", "frames", "exporter"}
    unknown = set(options) - allowed - {"calibration_prompts", "calibration_images"}
    if unknown:
        raise ConfigError(
            f"engine_options has {sorted(unknown)}; expected height, width, batch, precision, exporter, rebuild "
            "(frames for video; calibration_prompts, calibration_images for int8)"
        )
    if any(isinstance(s.source, dict) for s in sources) or not sources:
        raise ConfigError(f"backend {backend!r} builds engines from IP-Adapter files; got no file paths")
    if isinstance(image_encoder, torch.nn.Module):
        raise ConfigError(f"backend {backend!r} needs image_encoder as a folder, not a loaded module")
    size = _sample_pixels(base)
    loras = lora if isinstance(lora, (list, tuple)) else ([lora] if lora is not None else [])
    paths = {}  # controlnet / t2i_adapter: folders (or hub ids) as a list
    for key, value in structure.items():
        items = value if isinstance(value, (list, tuple)) else ([value] if value is not None else [])
        if any(isinstance(x, torch.nn.Module) for x in items):
            raise ConfigError(f"backend {backend!r} needs {key} as folders, not loaded modules")
        paths[key] = [os.fspath(x) for x in items]
    return BuildRequest(
        base=os.fspath(base),
        ip_adapter=[os.fspath(s.source) for s in sources],
        image_encoder=os.fspath(image_encoder) if image_encoder is not None else None,
        backend=backend,
        height=int(options.get("height", size)),
        width=int(options.get("width", size)),
        batch=int(options.get("batch", 1)),
        dtype=DTYPE_NAMES.get(dtype, str(dtype)),
        precision=str(options.get("precision", "fp32")),
        lora=[os.fspath(x) for x in loras],
        vae=os.fspath(vae) if vae is not None else None,
        **paths,
        weight_name=[s.weight_name for s in sources],
        subfolder=[s.subfolder for s in sources],
        motion_adapter=os.fspath(motion_adapter) if motion_adapter is not None else None,
        frames=int(options.get("frames", 16)) if motion_adapter is not None else 0,
        exporter=str(options.get("exporter", "torchscript")),
        calibration_prompts=list(options.get("calibration_prompts", [])),
        calibration_images=[os.fspath(f) for f in options.get("calibration_images", [])],
        config=os.fspath(config) if config is not None else None,
        tokenizer=os.fspath(tokenizer) if tokenizer is not None else None,
    )


def _sample_pixels(base: str | os.PathLike) -> int:
    """The base model's native resolution (UNet sample size x VAE scale factor), from its configs."""
    folder = Path(base)
    if folder.is_file():  # a single-file checkpoint: its family's native size
        from ..single_file import sample_pixels

        return sample_pixels(folder)
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"cannot read the sample size of '{base}' ({exc}); pass engine_options={{'height': H, 'width': W}}"
        ) from exc
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def cached_engines(req: BuildRequest, rebuild: bool = False, progress=None) -> Path:
    """Build ``req`` into the cache (a directory named by what the engines depend on), or reuse it."""
    req.check()
    ident = build_identity(req, source_records(req), torch.device("cuda" if req.backend == "tensorrt" else "cpu"))
    folder = cache_root() / f"{req.backend}-{cache_key(ident)}"
    return build_engines(req, folder, rebuild, progress)  # the hashes just taken are memoised: not taken again
