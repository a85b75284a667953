"""Flux and Chroma transformer engines: the family's part of a build (defaults, the export contract, what the
manifest records) and loading a pipeline whose transformer runs the engine; the mechanics (identity, cache, lock,
manifest) are :mod:`ipa_rt.export.wrapped`'s."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .. import console
from ..checkpoint import adapter_sources
from ..errors import ConfigError
from ..export import wrapped
from ..export.contracts import Contract
from ..models import _read_json
from .engine import INPUTS, NETWORK, EngineTransformer, ExportedTransformer, example_inputs, input_names

DEFAULT_SAMPLE_SIZE = 128  # diffusers' Flux and Chroma pipelines: latent size of the default image (1024² for FLUX.1)
BASE_PARTS = ("model_index.json", "transformer")  # what of the base model the engine's numbers come from


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
    returns the folder. ``engine_options``: ``height``, ``width`` (default: the pipeline's), ``batch`` (1),
    ``max_sequence_length`` (512), ``images`` per adapter (1), ``precision`` (OpenVINO) and ``rebuild``."""
    from .pipelines import pipeline_class_of, runtime_class

    wrapped.check_backend(backend, "Flux")
    if ip_adapter is None:
        raise ConfigError("Flux engines are built with their IP-Adapter(s): give ip_adapter")
    base = os.fspath(base)
    cls = runtime_class(pipeline_class_of(base) or "FluxPipeline")
    transformer_class = _read_json(base, "transformer/config.json", {}).get("_class_name")
    if transformer_class not in INPUTS:
        raise ConfigError(
            f"engines for a {transformer_class} are not supported yet (Flux engines: {sorted(INPUTS)}); use "
            "backend='torch'"
        )
    vae = _read_json(base, "vae/config.json", {})
    size = DEFAULT_SAMPLE_SIZE * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)  # diffusers' default
    defaults = {"height": size, "width": size, "batch": 1, "max_sequence_length": 512, "images": 1}
    options = wrapped.shape_options(engine_options, defaults, "Flux")
    adapters = adapter_sources(ip_adapter, subfolder, weight_name)
    encoder = image_encoder if image_encoder is not None else "image_encoder"
    sources = wrapped.source_records(base, BASE_PARTS, adapters, encoder)
    ident = wrapped.identity("flux", cls.__name__, backend, options, sources, encoder)

    def build(folder: Path) -> None:
        from .pipelines import load_pretrained

        shapes = options["shapes"]
        pipe = load_pretrained(base, adapters, encoder, dtype=torch.float32)
        names = input_names(pipe.transformer)
        sizes = (shapes["height"], shapes["width"], shapes["batch"], shapes["max_sequence_length"], shapes["images"])
        module = ExportedTransformer(pipe.transformer, pipe.transformer.encoder_hid_proj, names).eval()
        batch = (shapes["batch"],) * 3
        contract = Contract(NETWORK, module, example_inputs(pipe, *sizes), ("noise_pred",), batch=batch)
        record = {
            "kind": "flux",
            "identity": ident,
            "sources": sources,
            "shapes": shapes,
            "pipeline": cls.__name__,
            "base": os.path.abspath(base) if os.path.isdir(base) else base,
            "adapters": [sources[f"ip_adapter_{i}"]["path"] for i in range(len(adapters))],
            "image_encoder": pipe.image_encoder.config.name_or_path if pipe.image_encoder is not None else None,
            "inputs": list(names),
        }
        wrapped.write_engine(folder, contract, backend, options["precision"], record)

    return wrapped.cached_build(ident, out, options["rebuild"], build)


def load_flux_engine(folder: str | os.PathLike, device: torch.device | str = "cpu") -> Any:
    """The folder's pipeline class (``ipa_rt.flux``'s) whose transformer runs the engine in ``folder``."""
    from diffusers.configuration_utils import FrozenDict

    from .pipelines import runtime_class

    manifest, engine = wrapped.open_engine(folder, device, "flux")
    cls = runtime_class(manifest["pipeline"])
    base = manifest["base"]
    config = FrozenDict(_read_json(base, "transformer/config.json", {}))
    names = tuple(manifest["inputs"])
    transformer = EngineTransformer(engine, config, names, wrapped.built_shapes(manifest), manifest["shapes"])
    with console.hushed(bars=True):
        pipe = cls.from_pretrained(base, transformer=transformer, dtype=torch.float32).to(device)
    pipe.load_ip_adapter(
        manifest["adapters"],
        weight_name=None,
        image_encoder_pretrained_model_name_or_path=manifest["image_encoder"],
        image_encoder_dtype=torch.float32,
    )
    return pipe
