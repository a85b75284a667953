"""``ipa_rt.Pipeline``: the pipeline users import, shaped like diffusers.

It adds to :class:`~ipa_rt.core.PipelineCore` the constructors that need the engine layer (``from_pretrained(...,
backend=...)``, ``from_engine``); :mod:`ipa_rt.export` never imports this module (docs/design.md, "Code map").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .adapters.checkpoint import HUB_KWARGS, adapter_sources
from .core import PipelineCore, PipelineOutput
from .errors import CheckpointError, ConfigError, reject_engine_options
from .families import family_of, family_of_engine
from .models import FAMILIES, declared_pipeline
from .runtime.loop import static_call
from .single_file import is_single_file

BACKENDS = ("torch", "onnxruntime", "tensorrt", "openvino")
# what from_pretrained passes on to an engine build (the rest of its arguments are torch-backend only)
ENGINE_ARGUMENTS = {
    "subfolder",
    "weight_name",
    "device",
    "dtype",
    "scheduler",
    "lora",
    "controlnet",
    "t2i_adapter",
    "vae",
    "config",  # a single-file base's configs and tokenizer
    "tokenizer",
}


class Pipeline(PipelineCore):
    """IP-Adapter generation for SD1.5- and SDXL-family diffusers models, on PyTorch or on engines."""

    @classmethod
    @static_call
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        ip_adapter: Any = None,
        image_encoder: str | os.PathLike | torch.nn.Module | None = None,
        *,
        backend: str = "torch",
        engine_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Pipeline:
        """Load a diffusers base model and IP-Adapter checkpoint(s); the other arguments are
        :meth:`PipelineCore.from_pretrained`'s. ``backend``: ``"torch"``, or ``"onnxruntime"`` / ``"tensorrt"`` /
        ``"openvino"`` to build engines into the cache (``$IPA_RT_CACHE``, default ``~/.cache/ipa_rt/engines``) or
        reuse them; ``engine_options``: ``height``, ``width``, ``batch`` of the engines (default: the UNet's sample
        size, 1), ``precision`` (OpenVINO: ``fp32``, ``bf16``, ``int8``) and ``rebuild``. A Flux/Chroma, Kolors or SD3.5
        folder (``model_index.json``'s ``FluxPipeline``, ``KolorsPipeline``, ``StableDiffusion3Pipeline``, ...)
        gives :mod:`ipa_rt.flux`'s, :mod:`ipa_rt.kolors`' or :mod:`ipa_rt.sd3`'s pipeline of that class instead
        (:mod:`ipa_rt.families`)."""
        if backend not in BACKENDS:
            raise ConfigError(f"backend {backend!r} is unknown; expected one of {BACKENDS}")
        name = declared_pipeline(base, **{k: v for k, v in kwargs.items() if k in HUB_KWARGS})
        family = family_of(name)
        if family is not None:  # a family ipa_rt serves inside diffusers' own pipeline classes
            return family.from_pretrained(name, base, ip_adapter, image_encoder, backend=backend,
                                          engine_options=engine_options, **kwargs)  # fmt: skip
        if backend == "torch":
            reject_engine_options(engine_options)
            return super().from_pretrained(base, ip_adapter, image_encoder, **kwargs)
        folder = engines_for(base, ip_adapter, image_encoder, backend, engine_options, kwargs)
        return cls.from_engine(folder, device=kwargs.get("device", "cpu"), scheduler=kwargs.get("scheduler"))

    @classmethod
    @static_call
    def from_single_file(
        cls,
        path: str | os.PathLike,
        ip_adapter: Any = None,
        image_encoder: str | os.PathLike | torch.nn.Module | None = None,
        *,
        backend: str = "torch",
        engine_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Pipeline:
        """Load an SD1.5 or SDXL checkpoint file in the original layout (``.safetensors``, or ``.ckpt`` read with
        ``weights_only``; fp16 or fp32; with or without a baked-in VAE, then ``vae=`` names one), offline: diffusers'
        own conversion with configs shipped with ipa_rt and completed from the weights' shapes (``config=``: a
        diffusers folder with the model's configs instead) and CLIP's tokenizer from ``tokenizer=`` or the hub cache
        (:mod:`ipa_rt.single_file`). The other arguments are :meth:`from_pretrained`'s, which takes such a file too."""
        if not is_single_file(path):
            raise CheckpointError(
                f"single-file checkpoint '{path}' is not a file; expected a .safetensors or .ckpt checkpoint (a "
                "diffusers folder or hub id goes to Pipeline.from_pretrained)"
            )
        return cls.from_pretrained(path, ip_adapter, image_encoder, backend=backend, engine_options=engine_options,
                                   **kwargs)  # fmt: skip

    @classmethod
    @static_call
    def from_engine(
        cls, folder: str | os.PathLike, device: torch.device | str = "cpu", scheduler: Any = None
    ) -> Pipeline:
        """A pipeline whose networks run from the engines ``ipa_rt build`` wrote into ``folder``: the same call
        API and live controls (``set_ip_adapter_scale`` writes an engine input: nothing is rebuilt)."""
        from .export.loader import load_engine_pipeline
        from .export.manifest import read_manifest

        family = family_of_engine(read_manifest(Path(folder)).get("kind"))
        if family is not None:  # a Flux-family, Kolors or SD3.5 engine
            return family.open_engine(folder, device)
        return load_engine_pipeline(folder, device, scheduler, cls)


def engines_for(
    base, ip_adapter, image_encoder, backend: str, engine_options: dict | None, kwargs: dict, motion_adapter=None
) -> os.PathLike:
    """The cached engine directory for ``from_pretrained(..., backend=...)``'s arguments: built once, then reused
    (``motion_adapter``: video engines, for :class:`ipa_rt.video.pipeline.AnimateDiffPipeline`)."""
    unknown = sorted(set(kwargs) - ENGINE_ARGUMENTS)
    if unknown:
        raise ConfigError(
            f"from_pretrained(backend={backend!r}) does not take {unknown}: engines are built from files; "
            f"expected only {sorted(ENGINE_ARGUMENTS)} (or backend='torch')"
        )
    from .export.build import cached_engines, request_for_pretrained

    get = kwargs.get
    sources = adapter_sources(ip_adapter, get("subfolder"), get("weight_name"))
    options = dict(engine_options or {})
    structure = {"controlnet": get("controlnet"), "t2i_adapter": get("t2i_adapter")}
    dtype = get("dtype", torch.float32)
    req = request_for_pretrained(
        base, sources, image_encoder, backend, dtype, get("lora"), structure, options, get("vae"), motion_adapter,
        get("config"), get("tokenizer"),
    )  # fmt: skip
    return cached_engines(req, rebuild=bool(options.get("rebuild", False)))


def from_diffusers(pipe: Any, attention: str = "auto") -> Pipeline:
    """``ipa_rt.from_diffusers(pipe)``: see :meth:`PipelineCore.from_diffusers`."""
    return Pipeline.from_diffusers(pipe, attention=attention)


__all__ = ["FAMILIES", "Pipeline", "PipelineOutput", "from_diffusers"]
