"""Reading IP-Adapter checkpoints in the h94 layout, safely, with errors that name the file.

Sources as diffusers' ``load_ip_adapter`` takes them: ``.safetensors`` (flat keys; XLabs-AI's Flux names too),
``.bin`` read with ``torch.load(weights_only=True)`` (arbitrary pickled objects are refused), a state dict, or a hub
id (docs/reference/variants.md: the accepted files and their key layouts).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError

StateDict = dict[str, torch.Tensor]
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")  # hub download options


@dataclass(frozen=True)
class AdapterSource:
    """Where one IP-Adapter comes from, and the options diffusers leaves to attributes.

    ``source`` is a file path, a folder or hub id (with ``weight_name`` and optional ``subfolder``), or an
    already loaded state dict. ``shortcut`` / ``shortcut_scale`` select FaceID-PlusV2 behaviour, which the
    checkpoint keys cannot tell apart from FaceID-Plus v1.
    """

    source: str | os.PathLike | Mapping[str, Any]
    weight_name: str | None = None
    subfolder: str | None = None
    shortcut: bool = False
    shortcut_scale: float = 1.0


@dataclass
class RawAdapter:
    """A checkpoint split into its two parts, plus where it came from."""

    image_proj: StateDict
    ip_adapter: StateDict
    origin: str  # file path or description, used in every error message
    encoder_dir: str | None  # the default image_encoder/ location beside it (diffusers' rule)
    encoder_subfolder: str | None  # for a hub id: subfolder holding image_encoder/


# Flat-key prefixes -> part: h94's (SD1.5/SDXL/Kolors/SD3.5) and XLabs-AI's Flux layout, as diffusers'
# IPAdapterMixin / FluxIPAdapterMixin read them. XLabs' per-block names are renamed to diffusers' ones.
FLAT_PREFIXES = {
    "image_proj": "image_proj",
    "ip_adapter": "ip_adapter",
    "ip_adapter_proj_model": "image_proj",
    "double_blocks": "ip_adapter",
}
_XLABS_RENAMES = (
    ("ip_adapter_double_stream_k_proj", "to_k_ip"),
    ("ip_adapter_double_stream_v_proj", "to_v_ip"),
    ("processor.", ""),
)


def _split_flat(flat: Mapping[str, torch.Tensor]) -> dict[str, StateDict]:
    parts: dict[str, StateDict] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        part = FLAT_PREFIXES.get(head)
        if part is None or not rest:
            continue
        if head == "double_blocks":
            for old, new in _XLABS_RENAMES:
                rest = rest.replace(old, new)
        parts[part][rest] = value
    return parts


def _read_safetensors(path: Path) -> dict[str, StateDict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        flat = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"IP-Adapter file '{path}' is not a readable safetensors file (truncated or corrupt?): {exc}; "
            "expected a complete .safetensors file with image_proj.* and ip_adapter.* tensors"
        ) from exc
    return _split_flat(flat)


def _read_bin(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"IP-Adapter file '{path}' holds objects other than tensors and plain containers, which ipa_rt refuses "
            f"to unpickle ({str(exc).splitlines()[0]}); expected a dict of tensors (h94 .bin layout)"
        ) from exc
    except Exception as exc:  # torch.load raises many types on foreign bytes (IndexError, EOFError, ...)
        raise CheckpointError(
            f"IP-Adapter file '{path}' is not a PyTorch checkpoint ({type(exc).__name__}: {exc}); "
            "expected a .bin written by torch.save or a .safetensors file"
        ) from exc


def _validate(parts: Any, origin: str) -> tuple[StateDict, StateDict]:
    if not isinstance(parts, Mapping):
        raise CheckpointError(
            f"IP-Adapter '{origin}' holds a {type(parts).__name__}; expected a dict with 'image_proj' and 'ip_adapter'"
        )
    if "image_proj" not in parts or "ip_adapter" not in parts:
        if any(isinstance(k, str) and k.split(".", 1)[0] in FLAT_PREFIXES for k in parts):
            parts = _split_flat(parts)  # a flat dict, as in a .safetensors file
        missing = [k for k in ("image_proj", "ip_adapter") if not parts.get(k)]
        if missing:
            found = sorted(str(k) for k in parts)[:5]
            raise CheckpointError(
                f"IP-Adapter '{origin}' has no {' and no '.join(missing)} weights; found keys {found}; "
                "expected the h94 layout {'image_proj': {...}, 'ip_adapter': {...}}"
            )
    out = []
    for part in ("image_proj", "ip_adapter"):
        sd = parts[part]
        if not isinstance(sd, Mapping) or not sd:
            raise CheckpointError(f"IP-Adapter '{origin}': '{part}' is {type(sd).__name__}; expected a dict of tensors")
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(
                f"IP-Adapter '{origin}': '{part}.{bad[0]}' is a {type(sd[bad[0]]).__name__}; expected a tensor"
            )
        out.append(dict(sd))
    return out[0], out[1]


def read_adapter(spec: AdapterSource, **hub_kwargs: Any) -> RawAdapter:
    """Load one adapter checkpoint from a file, folder, hub id or dict."""
    src = spec.source
    if isinstance(src, Mapping):
        return RawAdapter(*_validate(src, "<state dict>"), "<state dict>", None, None)

    path = Path(os.fspath(src))
    if spec.weight_name is not None:
        path = path / (spec.subfolder or "") / spec.weight_name
    if not path.exists() and spec.weight_name is not None and not Path(os.fspath(src)).exists():
        return _read_from_hub(str(src), spec, **hub_kwargs)
    if not path.exists():
        raise CheckpointError(
            f"IP-Adapter file '{path}' does not exist; expected a .safetensors or .bin file in the h94 layout "
            "(or a hub id together with weight_name=)"
        )
    if path.is_dir():
        raise CheckpointError(
            f"IP-Adapter path '{path}' is a folder; pass the file itself, or the folder with weight_name= "
            "(e.g. weight_name='ip-adapter_sd15.safetensors')"
        )
    return _read_file(path, encoder_dir=str(path.parent / "image_encoder"), encoder_subfolder=None)


def _read_file(path: Path, encoder_dir: str | None, encoder_subfolder: str | None) -> RawAdapter:
    parts = _read_safetensors(path) if path.suffix == ".safetensors" else _read_bin(path)
    return RawAdapter(*_validate(parts, str(path)), str(path), encoder_dir, encoder_subfolder)


def _read_from_hub(repo_id: str, spec: AdapterSource, **hub_kwargs: Any) -> RawAdapter:
    from huggingface_hub import hf_hub_download

    try:
        file = hf_hub_download(repo_id, spec.weight_name, subfolder=spec.subfolder or None, **hub_kwargs)
    except Exception as exc:  # hub errors are many types; all mean "could not fetch"
        raise CheckpointError(
            f"IP-Adapter '{repo_id}' is neither a local path nor a downloadable hub file "
            f"(subfolder={spec.subfolder!r}, weight_name={spec.weight_name!r}): {exc}"
        ) from exc
    sub = f"{spec.subfolder}/image_encoder" if spec.subfolder else "image_encoder"
    raw = _read_file(Path(file), encoder_dir=None, encoder_subfolder=f"{repo_id}::{sub}")
    raw.origin = f"{repo_id}/{spec.subfolder + '/' if spec.subfolder else ''}{spec.weight_name}"
    return raw


def hub_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The hub options among ``load_ip_adapter``'s extra keyword arguments; ``low_cpu_mem_usage`` is ignored (ipa_rt
    builds its small modules from the checkpoint's tensors: nothing to save), anything else refused."""
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    kwargs.pop("low_cpu_mem_usage", None)
    if kwargs:
        raise ConfigError(f"load_ip_adapter: unknown argument(s) {sorted(kwargs)}")
    return hub


def adapter_sources(ip_adapter: Any, subfolder: Any, weight_name: Any) -> list[AdapterSource]:
    """``from_pretrained``'s ``ip_adapter`` / ``subfolder`` / ``weight_name`` as one :class:`AdapterSource` per adapter
    (diffusers' forms: one value shared, or one per adapter; one repo with several files)."""
    if ip_adapter is None:
        return []
    items = list(ip_adapter) if isinstance(ip_adapter, (list, tuple)) else [ip_adapter]
    names = weight_name if isinstance(weight_name, (list, tuple)) else [weight_name] * len(items)
    subs = subfolder if isinstance(subfolder, (list, tuple)) else [subfolder] * len(items)
    if len(items) == 1 and len(names) > 1:  # one repo, several files (diffusers' broadcast)
        items = items * len(names)
        subs = subs * len(names) if len(subs) == 1 else subs
    if not len(items) == len(names) == len(subs):
        raise ConfigError(
            f"ip_adapter has {len(items)} entries but weight_name has {len(names)} and subfolder {len(subs)}; "
            "expected one each per adapter (or a single value to share)"
        )
    out = []
    for item, name, sub in zip(items, names, subs, strict=True):
        if isinstance(item, AdapterSource):
            out.append(item)
        elif isinstance(item, (str, os.PathLike, dict)):
            out.append(AdapterSource(item, weight_name=name, subfolder=sub))
        else:
            raise ConfigError(
                f"ip_adapter entry is a {type(item).__name__}; expected a path, hub id, dict or AdapterSource"
            )
    return out
