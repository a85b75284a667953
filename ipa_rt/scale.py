"""``set_ip_adapter_scale`` inputs → the ``[adapters, cross-attention layers]`` scale tensor.

Accepted, as diffusers accepts them: a number (every adapter, every layer), a list with one entry per
adapter, and per adapter InstantStyle's per-block dict ``{"down": ..., "mid": ..., "up": {"block_i": ...}}``
expanded with diffusers' rules (``loaders/unet_loader_utils.py::_maybe_expand_lora_scales``): ``mid`` and any
unnamed block default to 0.0, a number for ``up``/``down`` or a block covers all its attentions, a block's
list gives one value per attention (a one-element list is repeated). Unlike diffusers, keys that name no
block are an error rather than silently ignored. A single config with several adapters applies to all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import torch
from torch import nn

from .errors import ScaleError

DEFAULT_BLOCK_SCALE = 0.0  # diffusers' default for IP-Adapter per-block dicts


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ScaleError(f"scale {where} is {value!r}; expected a finite number")
    return float(value)


def attention_blocks(unet: nn.Module) -> dict[str, dict[int, int]]:
    """``{"down": {block: attentions}, "up": {...}, "mid": {0: n}}`` for blocks that have cross-attention."""
    out: dict[str, dict[int, int]] = {"down": {}, "up": {}, "mid": {}}
    for side, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
        for i, block in enumerate(blocks):
            if hasattr(block, "attentions"):
                out[side][i] = len(block.attentions)
    if unet.mid_block is not None and hasattr(unet.mid_block, "attentions"):
        out["mid"][0] = len(unet.mid_block.attentions)
    return out


def _expand_dict(config: Mapping, blocks: dict[str, dict[int, int]], where: str) -> dict[str, float]:
    """Per-block dict → ``{"down_blocks.1.attentions.0": s, ...}`` (every attention gets a value)."""
    unknown = [k for k in config if k not in ("down", "mid", "up")]
    if unknown:
        raise ScaleError(f"scale {where} has unknown key {unknown[0]!r}; expected keys among 'down', 'mid', 'up'")
    out: dict[str, float] = {}
    mid = config.get("mid", DEFAULT_BLOCK_SCALE)
    if isinstance(mid, Sequence) and not isinstance(mid, str):
        if len(mid) != 1:
            raise ScaleError(f"scale {where}['mid'] has {len(mid)} values; expected 1")
        mid = mid[0]
    if blocks["mid"]:
        out["mid_block.attentions.0"] = _number(mid, f"{where}['mid']")
    for side in ("down", "up"):
        value = config.get(side, DEFAULT_BLOCK_SCALE)
        if not isinstance(value, Mapping):
            value = {f"block_{i}": value for i in blocks[side]}
        valid = {f"block_{i}": i for i in blocks[side]}
        for key in value:
            if key not in valid:
                raise ScaleError(
                    f"scale {where}['{side}'] has key {key!r}, which names no {side} block with attention; "
                    f"expected one of {sorted(valid)}"
                )
        for key, i in valid.items():
            per_block = value.get(key, DEFAULT_BLOCK_SCALE)
            count = blocks[side][i]
            if isinstance(per_block, Sequence) and not isinstance(per_block, str):
                if len(per_block) == 1:
                    per_block = list(per_block) * count
                if len(per_block) != count:
                    raise ScaleError(
                        f"scale {where}['{side}']['{key}'] has {len(per_block)} values; expected {count} "
                        f"(one per attention in {side}_blocks.{i}) or 1"
                    )
            else:
                per_block = [per_block] * count
            for j, s in enumerate(per_block):
                if isinstance(s, Sequence):
                    raise ScaleError(
                        f"scale {where}['{side}']['{key}'][{j}] is a list (per-image scales); per-image scales "
                        "come with regional masks, which this version does not support; expected a number"
                    )
                out[f"{side}_blocks.{i}.attentions.{j}"] = _number(s, f"{where}['{side}']['{key}'][{j}]")
    return out


def expand_scale(scale: Any, unet: nn.Module, layer_names: Sequence[str], num_adapters: int) -> torch.Tensor:
    """The ``[num_adapters, len(layer_names)]`` float32 CPU tensor for a ``set_ip_adapter_scale`` argument."""
    if num_adapters == 0:
        raise ScaleError("set_ip_adapter_scale was called on a pipeline with no IP-Adapter loaded")
    if isinstance(scale, (list, tuple)):
        if len(scale) != num_adapters:
            raise ScaleError(
                f"scale is a list of {len(scale)} entries; expected {num_adapters} (one per loaded IP-Adapter)"
            )
        configs = list(scale)
    else:
        configs = [scale] * num_adapters
    blocks = attention_blocks(unet)
    rows = []
    for a, config in enumerate(configs):
        where = f"[{a}]" if isinstance(scale, (list, tuple)) else "value"
        if isinstance(config, Mapping):
            per_block = _expand_dict(config, blocks, where)
            row = []
            for name in layer_names:
                prefix = next((p for p in per_block if name.startswith(p + ".")), None)
                row.append(per_block[prefix] if prefix is not None else DEFAULT_BLOCK_SCALE)
            rows.append(row)
        else:
            rows.append([_number(config, where)] * len(layer_names))
    return torch.tensor(rows, dtype=torch.float32)
