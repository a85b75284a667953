"""Loading an engine directory back into a :class:`~ipa_rt.Pipeline` (``Pipeline.from_engine``): the manifest is
checked, one engine per network is created once, and engine-backed stand-ins take the torch modules' places."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .build import DTYPES
from .engines import OrtEngine, TrtEngine
from .manifest import check_engine_dir, read_manifest
from .openvino_engine import OvEngine, compute_precision
from .writer import SUFFIX


def load_engine_pipeline(folder: str | os.PathLike, device: torch.device | str, scheduler: Any, cls: type):
    """A pipeline of class ``cls`` (a :class:`~ipa_rt.core.PipelineCore`) whose networks run from the engines in
    ``folder``."""
    import diffusers
    from diffusers.configuration_utils import FrozenDict
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPTextConfig, CLIPVisionConfig

    from ..adapters.image import default_feature_extractor
    from ..adapters.variants import VARIANTS
    from ..models import FAMILIES, BaseModel
    from ..runtime.schedulers import make_scheduler
    from .modules import (
        EngineAdapters,
        EngineControlNet,
        EngineEntry,
        EngineImageEncoder,
        EngineT2IAdapter,
        EngineTextEncoder,
        EngineUNet,
        EngineVAE,
    )

    folder, device = Path(folder), torch.device(device)
    manifest = read_manifest(folder)
    check_engine_dir(folder, manifest, device)
    video, wants_video = bool(manifest["shapes"].get("frames")), bool(getattr(cls, "video", False))
    if video != wants_video:
        held = "video (AnimateDiff) engines" if video else "still-image engines"
        use = "ipa_rt.AnimateDiffPipeline.from_engine" if video else "ipa_rt.Pipeline.from_engine"
        raise ConfigError(f"'{folder}' holds {held}; load it with {use}")
    engines = {
        name: network_engine(folder, name, info, manifest, device) for name, info in manifest["networks"].items()
    }
    dtype = DTYPES[manifest["io_dtype"]]
    model = folder / "model"
    configs = json.loads((model / "configs.json").read_text())
    specs = {v.name: v for v in VARIANTS}
    entries = [EngineEntry(specs[a["variant"]], a["tokens"], a["origin"]) for a in manifest["adapters"]]
    projections = [engines[f"image_projection_{i}"] for i in range(len(entries))]
    adapters = EngineAdapters(entries, projections, manifest["layer_names"], manifest["token_width"], device, dtype)
    blocks = {side: {int(k): v for k, v in d.items()} for side, d in manifest["attention_blocks"].items()}
    unet = EngineUNet(engines["unet"], FrozenDict(configs["unet"]), dtype, device, adapters, blocks)
    family = FAMILIES[manifest["family"]]
    # without a VAE engine, a UNet-only base: no VAE, text encoders or tokenizers (its latent space: configs["vae"])
    full, vae = "vae_decoder" in engines, None
    if full:
        tiny = manifest.get("vae_class") == "AutoencoderTiny"
        vae_cfg, vae_dtype = FrozenDict(configs["vae"]), DTYPES[manifest["vae_dtype"]]
        vae = EngineVAE(engines["vae_decoder"], engines["vae_encoder"], vae_cfg, vae_dtype, device, tiny)
    text_encoders = [
        EngineTextEncoder(
            engines[f"text_encoder_{i}"], CLIPTextConfig.from_dict(configs[f"text_encoder_{i}"]), dtype, device
        )
        for i in range(len(family.text_encoders) if full else 0)
    ]
    tokenizers = [AutoTokenizer.from_pretrained(model / f"tokenizer_{i}") for i in range(len(text_encoders))]
    sched_name = json.loads((model / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    base_scheduler = getattr(diffusers, sched_name).from_pretrained(model / "scheduler")
    encoder = None
    if "image_encoder" in engines:
        enc_cfg = CLIPVisionConfig.from_dict(configs["image_encoder"])
        encoder = EngineImageEncoder(engines["image_encoder"], enc_cfg, dtype, device)
    fe_dir = model / "feature_extractor"
    fe = CLIPImageProcessor.from_pretrained(fe_dir) if fe_dir.is_dir() else None
    if fe is None and encoder is not None:
        fe = default_feature_extractor(encoder)
    base = BaseModel(
        family=family,
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        scheduler=make_scheduler(scheduler, base_scheduler) if scheduler is not None else base_scheduler,
        feature_extractor=fe,
        force_zeros_for_empty_prompt=manifest["force_zeros_for_empty_prompt"],
        origin=str(folder),
        vae_config=configs["vae"],
    )
    controlnets = [
        EngineControlNet(
            engines[f"controlnet_{i}"], FrozenDict(configs[f"controlnet_{i}"]), dtype, device, c["residuals"]
        )
        for i, c in enumerate(manifest.get("controlnets", []))
    ]
    t2i_adapters = [
        EngineT2IAdapter(engines[f"t2i_adapter_{i}"], FrozenDict(configs[f"t2i_adapter_{i}"]), dtype, device)
        for i in range(len(manifest.get("t2i_adapters", [])))
    ]
    return cls(
        base,
        adapters,
        encoder,
        fe,
        device=device,
        dtype=dtype,
        attention="sdpa",
        backend=manifest["backend"],
        controlnets=controlnets,
        t2i_adapters=t2i_adapters,
        engine_manifest=manifest,
    )


def network_engine(folder: Path, network: str, info: dict, manifest: dict, device: torch.device) -> ShapeChecked:
    backend = manifest["backend"]
    path = folder / next(f for f in info["files"] if f.endswith(SUFFIX[backend]))  # not .onnx.data, .bin
    if backend == "onnxruntime":
        engine = OrtEngine(path, device)
    elif backend == "tensorrt":
        engine = TrtEngine(path, device)
    else:
        engine = OvEngine(path, device, compute_precision(network, manifest.get("precision", "fp32")))
    return ShapeChecked(engine, network, info, folder)


class ShapeChecked:
    """An engine that refuses inputs outside the shapes it was built for, saying which and how to rebuild (the
    runtimes' own messages name neither the network nor the build)."""

    def __init__(self, engine: Any, network: str, info: dict, folder: Path) -> None:
        self.engine, self.network, self.folder = engine, network, folder
        self.profile = {name: spec["profile"] for name, spec in info["inputs"].items()}  # [min, opt, max] per input

    def __call__(self, feeds: dict[str, torch.Tensor], copy: bool = True) -> list[torch.Tensor]:
        for name, (lo, _, hi) in self.profile.items():
            shape = list(feeds[name].shape)
            if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True)):
                built = list(hi) if lo == hi else f"{lo} .. {hi}"
                raise ConfigError(
                    f"the {self.network} engine in '{self.folder}' was built for {name} of shape {built}; this call "
                    f"gives {shape}: call with the size and batch the engines were built for (`ipa_rt inspect`), or "
                    "build engines for this one (ipa_rt build ... --height H --width W --batch B, or "
                    "from_pretrained(..., engine_options={'height': H, 'width': W, 'batch': B}))"
                )
        return self.engine(feeds, copy)

    def prepare(self, rows: int) -> None:
        """Make an OpenVINO engine ready for calls of ``rows`` rows now (it compiles per shape, at first use
        otherwise); nothing when ``rows`` is outside the build or another dimension of an input may vary."""
        if not isinstance(self.engine, OvEngine):  # ONNX Runtime and TensorRT engines are ready once loaded
            return
        if all(lo[1:] == hi[1:] and lo[0] <= rows <= hi[0] for lo, _, hi in self.profile.values()):
            self.engine.prepare(tuple((rows, *self.profile[name][0][1:]) for name, _ in self.engine.inputs))

    def __getattr__(self, name: str) -> Any:  # the engine's own attributes (inputs, outputs, session, ...)
        return getattr(self.engine, name)
