"""Base models: family detection (one table) and component loading from a diffusers folder or hub id."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel

from .console import dropping, hushed
from .errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class BaseKind:
    """An SD base model's kind (SD1.5 or SDXL): how many text encoders, and how the prompt is encoded."""

    name: str
    text_encoders: tuple[str, ...]  # model_index.json component names, in encoding order
    tokenizers: tuple[str, ...]
    pooled_text: bool  # SDXL: pooled text embeds + time ids go to the UNet as added conditions
    honours_force_upcast: bool  # diffusers' pipelines of the family run an fp16 VAE with force_upcast in fp32
    taesd: str  # the hub id of the family's tiny autoencoder (vae="taesd": the fast decoder)


FAMILIES: dict[str, BaseKind] = {
    "sd15": BaseKind("sd15", ("text_encoder",), ("tokenizer",), False, False, "madebyollin/taesd"),
    "sdxl": BaseKind(
        "sdxl", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"), True, True, "madebyollin/taesdxl"
    ),
}


def detect_family(model_index: dict[str, Any], unet_config: dict[str, Any], origin: str) -> BaseKind:
    """SDXL if the UNet takes text-time added conditions (two text encoders), else SD1.5-style."""
    if unet_config.get("addition_embed_type") == "text_time":
        if not model_index.get("text_encoder_2") or model_index.get("text_encoder_2") == [None, None]:
            raise ConfigError(
                f"base model '{origin}' has an SDXL UNet (addition_embed_type='text_time') but no text_encoder_2; "
                "expected an SDXL-family diffusers folder"
            )
        return FAMILIES["sdxl"]
    if unet_config.get("addition_embed_type") not in (None, "text"):
        raise ConfigError(
            f"base model '{origin}': UNet addition_embed_type={unet_config.get('addition_embed_type')!r} is not "
            "supported; expected an SD1.5- or SDXL-family model"
        )
    return FAMILIES["sd15"]


@dataclass
class BaseModel:
    """The loaded components of a diffusers base model."""

    family: BaseKind
    unet: UNet2DConditionModel
    vae: AutoencoderKL | None  # None: a UNet-only base (its text encoders and tokenizers are empty lists too)
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    scheduler: Any
    feature_extractor: Any | None
    force_zeros_for_empty_prompt: bool
    origin: str
    image_encoder: Any | None = None  # a base model that ships one: diffusers uses it before the adapter's
    vae_config: dict[str, Any] | None = None  # a base without a VAE: the config of the VAE its latents belong to


def read_json(base: str, name: str, hub_kwargs: dict[str, Any], what: str = "base model") -> dict[str, Any]:
    local = Path(base) / name
    if Path(base).is_dir():
        if not local.exists():
            raise CheckpointError(f"{what} folder '{base}' has no {name}; expected a diffusers-format folder")
        path = local
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(base, name, **hub_kwargs))
        except Exception as exc:  # any hub failure: not a local folder and not fetchable
            raise CheckpointError(
                f"{what} '{base}' is neither a local diffusers folder nor a reachable hub id ({exc})"
            ) from exc
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{what} file '{path}' is not valid JSON: {exc}") from exc


def _hub_id(name: str) -> bool:
    """Whether ``name`` reads as a hub id (``owner/repo``, e.g. openai/clip-vit-large-patch14) rather than a path."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def declared_pipeline(base: str | os.PathLike, **hub_kwargs: Any) -> str | None:
    """The pipeline class a diffusers folder or hub id declares (``model_index.json``'s ``_class_name``); None for a
    path that is neither (the loaders report it)."""
    base = os.fspath(base)
    if not os.path.isdir(base) and (os.path.exists(base) or not _hub_id(base)):
        return None
    return read_json(base, "model_index.json", hub_kwargs).get("_class_name")


def _component_class(model_index: dict[str, Any], name: str, origin: str) -> type:
    entry = model_index.get(name)
    if not entry or entry[1] is None:
        raise CheckpointError(f"base model '{origin}' has no '{name}' in model_index.json")
    library, cls = entry
    module = transformers if library == "transformers" else diffusers
    if not hasattr(module, cls):
        raise ConfigError(f"base model '{origin}': component '{name}' class {library}.{cls} is unknown")
    return getattr(module, cls)


def load_base_model(base: str | os.PathLike, dtype: torch.dtype, **hub_kwargs: Any) -> BaseModel:
    """Load UNet, VAE, text encoders, tokenizers, scheduler and feature extractor of a diffusers model."""
    base = os.fspath(base)
    if not Path(base).is_dir() and (Path(base).exists() or not _hub_id(base)):
        raise CheckpointError(
            f"base model '{base}' is not a folder; expected a diffusers-format folder (model_index.json, unet/, "
            "vae/, text_encoder/, ...) or a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'"
        )
    model_index = read_json(base, "model_index.json", hub_kwargs)
    unet_config = read_json(base, "unet/config.json", hub_kwargs)
    family = detect_family(model_index, unet_config, base)

    def load(name: str, **kw: Any) -> Any:
        cls = _component_class(model_index, name, base)
        if "torch_dtype" in kw and cls.__module__.startswith("transformers"):
            kw["dtype"] = kw.pop("torch_dtype")  # transformers >= 4.56 spells it dtype
        try:
            return cls.from_pretrained(base, subfolder=name, **kw, **hub_kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"base model '{base}': cannot load '{name}' ({cls.__name__}): {exc}") from exc

    unet = load("unet", torch_dtype=dtype).eval()
    vae = load("vae", torch_dtype=dtype).eval()  # upcast later as diffusers does (see vae_upcast)
    text_encoders = [load(n, torch_dtype=dtype).eval() for n in family.text_encoders]
    tokenizers = [load(n) for n in family.tokenizers]
    scheduler = load("scheduler")

    def optional(name: str, **kw: Any) -> Any:
        entry = model_index.get(name)
        return load(name, **kw) if entry and entry[1] is not None else None

    feature_extractor = optional("feature_extractor")
    image_encoder = optional("image_encoder", torch_dtype=dtype)
    return BaseModel(
        family=family,
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        scheduler=scheduler,
        feature_extractor=feature_extractor,
        force_zeros_for_empty_prompt=bool(model_index.get("force_zeros_for_empty_prompt", True)),
        origin=base,
        image_encoder=image_encoder.eval() if image_encoder is not None else None,
    )


VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")


def load_vae(vae: str | os.PathLike, family: BaseKind, dtype: torch.dtype, **hub_kwargs: Any) -> torch.nn.Module:
    """``vae=`` given as a folder or hub id of a diffusers autoencoder, or ``"taesd"`` for the family's tiny
    autoencoder (TAESD / TAESDXL: the fast decoder)."""
    name = family.taesd if os.fspath(vae) == "taesd" else os.fspath(vae)
    config = read_json(name, "config.json", hub_kwargs, what="vae")
    cls = config.get("_class_name")
    if cls not in VAE_CLASSES:
        raise ConfigError(f"vae '{name}' is a {cls!r}; expected one of {VAE_CLASSES} (or vae='taesd')")
    try:  # diffusers notes config keys its own AutoencoderTiny.save_pretrained writes (block_out_channels): not ours
        with dropping("diffusers.configuration_utils", "but are not expected and will be ignored"):
            return getattr(diffusers, cls).from_pretrained(name, torch_dtype=dtype, **hub_kwargs).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"vae '{name}' cannot be loaded as {cls}: {exc}") from exc


def pooled_text_width(unet_config: Any) -> int:
    """The width of SDXL's pooled text (diffusers' ``text_embeds``), from the UNet's config alone: its added
    embedding takes the pooled text and six ``addition_time_embed_dim``-wide size embeddings."""
    return int(unet_config.projection_class_embeddings_input_dim) - 6 * int(unet_config.addition_time_embed_dim)


def vae_upcast(family: BaseKind, vae: Any) -> bool:
    """Whether diffusers decodes (and encodes) with this VAE in fp32: its SDXL pipelines do so for an fp16 VAE whose
    config has ``force_upcast`` (diffusers' default: True; the fp16-fixed SDXL VAE sets False), since real SDXL VAE
    weights overflow fp16 (NaN, black images). Its SD1.5 pipelines never upcast."""
    params = next(vae.parameters(), None) if isinstance(vae, torch.nn.Module) else None
    fp16 = params is not None and params.dtype == torch.float16
    return fp16 and family.honours_force_upcast and bool(getattr(vae.config, "force_upcast", True))


def load_image_encoder(folder: str | os.PathLike, dtype: torch.dtype, subfolder: str | None = None, **hub_kwargs):
    """A ``CLIPVisionModelWithProjection`` from a folder (or hub id + subfolder)."""
    from transformers import CLIPVisionModelWithProjection

    folder = os.fspath(folder)
    if Path(folder).is_file():  # one file, as ComfyUI's models/clip_vision holds them
        from .single_file import load_encoder_file

        return load_encoder_file(folder, dtype)
    parts = folder.split("/")
    if subfolder is None and not Path(folder).exists() and len(parts) > 2 and not folder.startswith((".", "/", "~")):
        folder, subfolder = "/".join(parts[:2]), "/".join(parts[2:])  # hub form: owner/repo/sub/folder
    if subfolder is None and not Path(folder).is_dir() and not _hub_id(folder):
        raise CheckpointError(
            f"image encoder folder '{folder}' does not exist; expected a CLIPVisionModelWithProjection folder "
            "(config.json + weights), e.g. h94/IP-Adapter models/image_encoder"
        )
    kwargs = {"subfolder": subfolder} if subfolder else {}
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=dtype, **kwargs, **hub_kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"image encoder '{folder}' cannot be loaded as CLIPVisionModelWithProjection: {exc}"
        ) from exc
    return model.eval()


TORCH_ONLY = ("scheduler", "attention", "lora", "vae", "controlnet", "t2i_adapter")  # ipa_rt.Pipeline's own options


def load_pipeline(cls: type, base: str | os.PathLike, dtype: torch.dtype, device: Any, hub_kwargs: dict) -> Any:
    """``cls.from_pretrained(base)`` (an ipa_rt class that is a diffusers pipeline) on ``device``, refusing the options
    of ipa_rt's own pipeline that these take through diffusers' API instead."""
    for name in TORCH_ONLY:
        if hub_kwargs.pop(name, None) is not None:
            raise ConfigError(
                f"{name}= is not supported for {cls.__name__} by ipa_rt.Pipeline; load it with "
                f"{cls.__module__}.{cls.__name__}.from_pretrained and use diffusers' own API for it"
            )
    with hushed(bars=True):
        return cls.from_pretrained(os.fspath(base), dtype=dtype, **hub_kwargs).to(device)


@functools.cache  # one class per name: ``runtime_class(name) is ipa_rt.<family>.<name>``
def wrapped_pipeline_class(name: str, mixin: type, names: tuple[str, ...], module: str) -> type:
    """``class <name>(mixin, diffusers.<name>)`` for a name of ``names``: diffusers' pipeline with one of ipa_rt's
    adapter mixins in front (:mod:`ipa_rt.families`)."""
    with hushed():  # importing diffusers' pipelines makes transformers note a missing torchvision
        base = getattr(diffusers, name, None) if name in names else None
    if base is None:
        raise ConfigError(f"{module} has no {name} (diffusers {diffusers.__version__}); expected one of {names}")
    doc = f"diffusers' ``{name}`` with ipa_rt's IP-Adapter runtime (:class:`{mixin.__name__}`)."
    cls = type(name, (mixin, base), {"__module__": module, "__doc__": doc})
    cls.__qualname__ = name
    return cls


def drop_image_encoder(pipe: Any) -> None:
    """diffusers' ``unload_ip_adapter`` rule: the image encoder goes, and the feature extractor too unless a safety
    checker uses it."""
    if getattr(pipe, "image_encoder", None) is not None:
        pipe.image_encoder = None
        pipe.register_to_config(image_encoder=[None, None])
    if not hasattr(pipe, "safety_checker") and getattr(pipe, "feature_extractor", None) is not None:
        pipe.feature_extractor = None
        pipe.register_to_config(feature_extractor=[None, None])
