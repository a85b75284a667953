"""A diffusers SD1.5 / SDXL folder written as one checkpoint file in the original LDM layout (what A1111 and ComfyUI
load), for the single-file tests: the inverse of diffusers' ``single_file_utils`` conversion, generalised from
diffusers' ``scripts/convert_diffusers_to_original_{stable_diffusion,sdxl}.py`` to any level count and depth (the
tests check the round trip through diffusers' own forward conversion)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"))
RESNET += (("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
VAE_ATTN = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return load_file(str(folder / name))
    raise FileNotFoundError(f"no safetensors weights in {folder}")


def _resnet(key: str) -> str:
    for new, old in RESNET:
        key = key.replace(f".{new}.", f".{old}.")
    return key


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    per = config["layers_per_block"]
    attn_up = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    out = {}
    for key, value in state.items():
        p = key.split(".")
        if key in fixed:
            new = fixed[key]
        elif p[0] == "down_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "downsamplers":
                new = f"input_blocks.{(b + 1) * (per + 1)}.0.op." + ".".join(p[5:])
            else:
                idx = b * (per + 1) + int(p[3]) + 1
                new = f"input_blocks.{idx}.{0 if kind == 'resnets' else 1}." + ".".join(p[4:])
        elif p[0] == "up_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "upsamplers":
                new = f"output_blocks.{b * (per + 1) + per}.{2 if attn_up[b] else 1}." + ".".join(p[4:])
            else:
                idx = b * (per + 1) + int(p[3])
                new = f"output_blocks.{idx}.{0 if kind == 'resnets' else 1}." + ".".join(p[4:])
        elif p[0] == "mid_block":
            new = f"middle_block.{2 * int(p[2]) if p[1] == 'resnets' else 1}." + ".".join(p[3:])
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        if "resnets" in key:
            new = _resnet("." + new)[1:]
        out[new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n = len(config["block_out_channels"])
    out = {}
    for key, value in state.items():
        p = key.split(".")
        if key in fixed:
            new = fixed[key]
        elif p[1] in ("down_blocks", "up_blocks"):
            i = int(p[2]) if p[1] == "down_blocks" else n - 1 - int(p[2])
            side = "down" if p[1] == "down_blocks" else "up"
            if p[3] in ("downsamplers", "upsamplers"):
                new = f"{p[0]}.{side}.{i}.{side}sample." + ".".join(p[5:])
            else:
                new = f"{p[0]}.{side}.{i}.block.{p[4]}." + ".".join(p[5:])
        elif p[1] == "mid_block" and p[2] == "resnets":
            new = f"{p[0]}.mid.block_{int(p[3]) + 1}." + ".".join(p[4:])
        elif p[1] == "mid_block":
            rest = ".".join(p[4:])
            for a, b in VAE_ATTN:
                rest = rest.replace(a, b) if rest.startswith(a) else rest
            new = f"{p[0]}.mid.attn_1.{rest}"
            value = value.reshape(*value.shape, 1, 1) if value.ndim == 2 else value  # LDM: 1x1 convs
        else:
            raise KeyError(f"no LDM name for VAE key {key}")
        out[new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def open_clip_text(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' ``CLIPTextModelWithProjection`` keys as OpenCLIP's (fused q/k/v, transposed projection)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T.contiguous(),
    }
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    for i in sorted(layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state.pop(f"{src}self_attn.{q}_proj.{kind}") for q in "qkv"])
            out[f"{dst}attn.out_proj.{kind}"] = state.pop(f"{src}self_attn.out_proj.{kind}")
            out[f"{dst}ln_1.{kind}"] = state.pop(f"{src}layer_norm1.{kind}")
            out[f"{dst}ln_2.{kind}"] = state.pop(f"{src}layer_norm2.{kind}")
            out[f"{dst}mlp.c_fc.{kind}"] = state.pop(f"{src}mlp.fc1.{kind}")
            out[f"{dst}mlp.c_proj.{kind}"] = state.pop(f"{src}mlp.fc2.{kind}")
    state.pop("embeddings.position_ids", None)
    if state:
        raise KeyError(f"no OpenCLIP name for {sorted(state)[:3]}")
    return out


def write_single_file(
    folder: str | os.PathLike,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    vae: bool = True,
    ema: bool = False,
) -> Path:
    """The diffusers model in ``folder`` as one ``.safetensors`` or ``.ckpt`` (by ``path``'s suffix) file in the
    original layout; ``dtype`` casts every tensor (fp16 files), ``vae=False`` leaves the autoencoder out, ``ema``
    adds an LDM EMA copy of the UNet (``model_ema.*``, other values) that loaders must ignore."""
    folder, path = Path(folder), Path(path)
    index = json.loads((folder / "model_index.json").read_text())
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    state = {f"model.diffusion_model.{k}": v for k, v in unet_to_ldm(_weights(folder / "unet"), unet_cfg).items()}
    if vae:
        vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
        state |= {f"first_stage_model.{k}": v for k, v in vae_to_ldm(_weights(folder / "vae"), vae_cfg).items()}
    text = {
        k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in _weights(folder / "text_encoder").items()
    }
    if index.get("text_encoder_2"):
        state |= {f"conditioner.embedders.0.transformer.{k}": v for k, v in text.items()}
        bigg = open_clip_text(_weights(folder / "text_encoder_2"))
        state |= {f"conditioner.embedders.1.model.{k}": v for k, v in bigg.items()}
    else:
        state |= {f"cond_stage_model.transformer.{k}": v for k, v in text.items()}
    if ema:  # LDM's flattened EMA names, with other values: a loader that took them would not match the folder
        for k, v in list(state.items()):
            if k.startswith("model.diffusion_model."):
                state["model_ema." + "".join(k.split(".")[1:])] = v + 1
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path
