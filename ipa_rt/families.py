"""The model families ipa_rt serves inside diffusers' own pipeline classes (Flux.1/Chroma, Kolors, SD3.5): which
ipa_rt module runs a folder's declared pipeline class, and loading one on PyTorch (``ipa_rt.Pipeline.from_pretrained``
routes such folders here; SD1.5/SDXL folders run on ipa_rt's own pipeline)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from .checkpoint import HUB_KWARGS
from .console import hushed
from .errors import ConfigError
from .models import load_pipeline


def constructor_for(name: str | None) -> Callable[..., Any] | None:
    """``(base, ip_adapter, image_encoder, *, backend, engine_options, **kwargs) -> pipeline`` for a declared
    pipeline class of these families, else None."""
    from .flux.pipelines import PIPELINES as FLUX
    from .kolors.pipelines import PIPELINES as KOLORS
    from .sd3.pipelines import PIPELINES as SD3

    if name in FLUX:
        from .flux.entry import from_pretrained

        return from_pretrained
    if name in KOLORS:
        return lambda *a, **k: _load_kolors(name, *a, **k)
    if name in SD3:
        return lambda *a, **k: _load_sd3(name, *a, **k)
    return None


def _load_sd3(name: str, base, ip_adapter, image_encoder, *, backend: str, engine_options: Any = None, subfolder=None,
              weight_name=None, device="cpu", dtype=torch.float32, **hub_kwargs) -> Any:  # fmt: skip
    """An ipa_rt SD3 pipeline with its adapter: the SigLIP encoder is the folder's own, or ``image_encoder``; on
    PyTorch, or with its transformer as an engine of ``backend`` (built into the cache once, then reused)."""
    from .sd3.pipelines import runtime_class

    if backend != "torch":
        extra = sorted(k for k, v in hub_kwargs.items() if v is not None)
        if dtype != torch.float32 or extra:  # engines are built from files and take float32 inputs
            raise ConfigError(
                f"from_pretrained(backend={backend!r}) of an SD3.5 model takes ip_adapter, image_encoder, subfolder, "
                f"weight_name, device and engine_options; got {extra or 'dtype=' + str(dtype)}"
            )
        from .sd3.engine import load_sd3_engine, sd3_engines

        options = dict(class_name=name, subfolder=subfolder, weight_name=weight_name)
        return load_sd3_engine(sd3_engines(base, ip_adapter, image_encoder, backend, engine_options, **options), device)
    if engine_options:
        raise ConfigError("engine_options apply to backend='onnxruntime', 'openvino' or 'tensorrt'; it is 'torch'")

    pipe = load_pipeline(runtime_class(name), base, dtype, device, hub_kwargs)
    if image_encoder is not None:
        if not isinstance(image_encoder, torch.nn.Module):
            from transformers import SiglipVisionModel

            with hushed(bars=True):
                image_encoder = SiglipVisionModel.from_pretrained(os.fspath(image_encoder), dtype=dtype)
        pipe.register_modules(image_encoder=image_encoder.to(device=device, dtype=dtype).eval())
    if ip_adapter is not None:
        hub = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS}
        if isinstance(ip_adapter, (list, tuple)) and len(ip_adapter) == 1:  # SD3 takes one adapter (the CLI's list)
            ip_adapter = ip_adapter[0]
        source = os.fspath(ip_adapter) if isinstance(ip_adapter, os.PathLike) else ip_adapter
        kw = {"weight_name": weight_name} if weight_name is not None else {}  # else diffusers' default file name
        pipe.load_ip_adapter(source, subfolder=subfolder, **kw, **hub)
    return pipe


def _load_kolors(name: str, base, ip_adapter, image_encoder, *, backend: str, engine_options: Any = None,
                 subfolder=None, weight_name=None, device="cpu", dtype=torch.float32, **kwargs) -> Any:  # fmt: skip
    """An ipa_rt Kolors pipeline with its adapter(s): on PyTorch, or with its UNet as an engine of ``backend``."""
    if backend == "torch":
        if engine_options:
            raise ConfigError("engine_options apply to backend='onnxruntime', 'openvino' or 'tensorrt'; it is 'torch'")
        from .kolors.pipelines import load_pretrained

        return load_pretrained(base, ip_adapter, image_encoder, class_name=name, subfolder=subfolder,
                               weight_name=weight_name, device=device, dtype=dtype, **kwargs)  # fmt: skip
    given = sorted(k for k, v in kwargs.items() if v is not None)
    if dtype != torch.float32 or given:
        raise ConfigError(
            f"from_pretrained(backend={backend!r}) of a Kolors model takes ip_adapter, image_encoder, subfolder, "
            f"weight_name, device and engine_options; got {given or 'dtype=' + str(dtype)}"
        )
    from .kolors.engine import kolors_engines, load_kolors_engine

    folder = kolors_engines(
        base, ip_adapter, image_encoder, backend, engine_options, None, name, subfolder, weight_name
    )
    return load_kolors_engine(folder, device)


def engine_builder(name: str | None) -> Callable[..., Any] | None:
    """``(base, ip_adapter, image_encoder, backend, engine_options, out) -> folder`` for a declared pipeline class of
    these families (``ipa_rt build``'s route for them), else None."""
    from .flux.pipelines import PIPELINES as FLUX
    from .kolors.pipelines import PIPELINES as KOLORS
    from .sd3.pipelines import PIPELINES as SD3

    if name in FLUX:
        from .flux.build import flux_engines

        return flux_engines
    if name in KOLORS:
        from .kolors.engine import kolors_engines

        return lambda base, *args, out=None: kolors_engines(base, *args, out=out, class_name=name)
    if name in SD3:
        from .sd3.engine import sd3_engines

        return lambda base, *args, out=None: sd3_engines(base, *args, out=out, class_name=name)
    return None
