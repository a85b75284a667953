"""ComfyUI's model folders (``folder_paths``) for the loader's dropdowns: ``checkpoints``, ``diffusers``,
``ipadapter``, ``clip_vision``, ``loras``. Imports ComfyUI's ``folder_paths`` only (no torch): loaded with the pack.
``ipadapter`` is registered as ComfyUI_IPAdapter_plus registers it, keeping the paths of an existing registration
(docs/guides/comfyui.md, model folders).
"""

from __future__ import annotations

import os
from typing import Any

import folder_paths

from ..errors import ConfigError

NONE = "None"
IPADAPTER = "ipadapter"


def register_ipadapter_folder() -> None:
    """``folder_paths``' ``ipadapter`` entry: ``models/ipadapter`` unless already registered (its paths kept), with
    the weight-file extensions (an ``extra_model_paths.yaml`` entry is registered without any)."""
    registered = folder_paths.folder_names_and_paths.get(IPADAPTER)
    paths = registered[0] if registered is not None else [os.path.join(folder_paths.models_dir, IPADAPTER)]
    folder_paths.folder_names_and_paths[IPADAPTER] = (paths, folder_paths.supported_pt_extensions)


def files(folder: str) -> list[str]:
    """The weight files ComfyUI lists for ``folder`` (names relative to its model folders)."""
    if folder == IPADAPTER:
        register_ipadapter_folder()
    return folder_paths.get_filename_list(folder)


def diffusers_folders() -> list[str]:
    """Folders with a ``model_index.json`` under ComfyUI's ``diffusers`` model folders (as its Diffusers loader
    lists them), relative to the folder they were found in."""
    found: set[str] = set()
    for root in folder_paths.get_folder_paths("diffusers"):
        for here, _, names in os.walk(root, followlinks=True):
            if "model_index.json" in names:
                found.add(os.path.relpath(here, root))
    return sorted(found)


def full_path(folder: str, name: str, input_name: str) -> str:
    """The file ``name`` of ComfyUI's ``folder`` (``folder_paths.get_full_path_or_raise``), or a
    :class:`ConfigError` naming the input and the folders searched."""
    if folder == IPADAPTER:
        register_ipadapter_folder()
    try:
        return folder_paths.get_full_path_or_raise(folder, name)
    except FileNotFoundError:
        searched = folder_paths.get_folder_paths(folder)
        raise ConfigError(
            f"{input_name}: '{name}' is not a file in ComfyUI's {folder!r} model folders {searched}; expected one "
            "of the dropdown's names (refresh the page after adding files)"
        ) from None


def diffusers_path(name: str, input_name: str) -> str:
    """The diffusers folder ``name`` under ComfyUI's ``diffusers`` model folders, or a :class:`ConfigError`."""
    searched = folder_paths.get_folder_paths("diffusers")
    for root in searched:
        path = os.path.join(root, os.path.relpath(os.path.join("/", name), "/"))  # no way out of the root
        if os.path.isfile(os.path.join(path, "model_index.json")):
            return path
    raise ConfigError(
        f"{input_name}: '{name}' is not a folder with model_index.json in ComfyUI's 'diffusers' model folders "
        f"{searched}; expected one of the dropdown's names"
    )


def unknown_name(names: dict[str, str]) -> str | None:
    """Why one of the loader's dropdown values is not a file of its folder (None: all are), for validation at queue
    time: ComfyUI 0.3.64 does not check a V3 combo's value against its options itself."""
    folders = {"checkpoint": "checkpoints", "ip_adapter": IPADAPTER, "ip_adapter_2": IPADAPTER}
    folders |= {"clip_vision": "clip_vision", "lora": "loras"}
    for input_name, name in names.items():
        if name == NONE and input_name != "ip_adapter":
            continue
        listed = diffusers_folders() if input_name == "diffusers" else files(folders[input_name])
        if name not in listed:
            where = "diffusers" if input_name == "diffusers" else folders[input_name]
            return f"{input_name}: '{name}' is not in ComfyUI's {where!r} model folders; expected one of {listed[:20]}"
    return None


def adapter_paths(ip_adapter: str, ip_adapter_2: str) -> tuple[str, ...]:
    """The two adapter dropdowns (``models/ipadapter``) as full paths, a ``None`` second one left out."""
    named = (("ip_adapter", ip_adapter), ("ip_adapter_2", ip_adapter_2))
    return tuple(full_path(IPADAPTER, name, key) for key, name in named if name != NONE)


def load_spec(
    checkpoint: str, diffusers: str, adapters: tuple[str, ...], clip_vision: str, lora: str, lora_strength: float
) -> Any:
    """The :class:`~ipa_rt.comfyui.pipelines.LoadSpec` (torch backend, fp32, CPU: the node sets those) for the
    dropdowns' names, resolved to full paths; ``None`` entries are left out. ``checkpoint`` is the base when set
    (``diffusers`` then gives its configs and tokenizer), else ``diffusers``."""
    from .pipelines import LoadSpec

    if checkpoint == NONE and diffusers == NONE:
        raise ConfigError(
            "checkpoint / diffusers: both None; expected a checkpoint file (models/checkpoints) or a diffusers "
            "folder (models/diffusers) as the base"
        )
    folder = diffusers_path(diffusers, "diffusers") if diffusers != NONE else ""
    if checkpoint != NONE:
        base, config = full_path("checkpoints", checkpoint, "checkpoint"), folder
    else:
        base, config = folder, ""
    files_ = adapter_paths(*adapters)
    encoder = full_path("clip_vision", clip_vision, "clip_vision") if clip_vision != NONE else ""
    lora_path = full_path("loras", lora, "lora") if lora != NONE else ""
    return LoadSpec(
        base=base,
        ip_adapters=files_,
        image_encoder=encoder,
        lora=lora_path,
        lora_strength=lora_strength,
        config=config,
    )
