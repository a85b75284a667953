"""``set_ip_adapter_scale`` inputs → the ``[adapters, cross-attention layers]`` scale tensor.

Per-block dicts are expanded with diffusers' rules (``loaders/unet_loader_utils.py::_maybe_expand_lora_scales``):
``mid`` and any unnamed block default to 0.0, a number for ``up``/``down`` or a block covers all its attentions, a
block's list gives one value per attention (a one-element list is repeated). The accepted forms and where ipa_rt
differs from diffusers: docs/design.md (the scale tensor; differences from diffusers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import torch
from torch import nn

from ..errors import ScaleError

DEFAULT_BLOCK_SCALE = 0.0  # diffusers' default for IP-Adapter per-block dicts

# Named per-block presets, written once. Sources: SDXL — InstantStyle (style = up_blocks.0.attentions.1,
# layout = down_blocks.2.attentions.1; InstantStyle README and diffusers' IP-Adapter docs); SD1.5 — the
# "style transfer" and "composition" weight types of cubiq/ComfyUI_IPAdapter_plus (its block indices 0-3 and
# 9-15 for style, {4: 0.25, 5: 1} for composition, in input / middle / output order) in diffusers' names.
PRESETS: dict[str, dict[str, dict]] = {
    "sdxl": {
        "style": {"up": {"block_0": [0.0, 1.0, 0.0]}},
        "composition": {"down": {"block_2": [0.0, 1.0]}},
    },
    "sd15": {
        "style": {
            "down": {"block_0": [1.0, 1.0], "block_1": [1.0, 1.0]},
            "up": {"block_1": [0.0, 0.0, 1.0], "block_2": [1.0, 1.0, 1.0], "block_3": [1.0, 1.0, 1.0]},
        },
        "composition": {"down": {"block_2": [0.25, 1.0]}},
    },
}


def _merge(a: dict, b: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in a.items()}
    for side, blocks in b.items():
        out.setdefault(side, {}).update(blocks)
    return out


for _family in PRESETS.values():
    _family["style_and_composition"] = _merge(_family["style"], _family["composition"])


def scale_preset(name: str, family: str, scale: float = 1.0) -> dict:
    """A named per-block preset (``style``, ``composition``, ``style_and_composition``) times ``scale``."""
    if family not in PRESETS or name not in PRESETS[family]:
        raise ScaleError(f"scale preset {name!r} is unknown for {family}; expected one of {sorted(PRESETS['sdxl'])}")
    s = _number(scale, "preset scale")
    return {
        side: {block: [v * s for v in values] for block, values in blocks.items()}
        for side, blocks in PRESETS[family][name].items()
    }


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ScaleError(f"scale {where} is {value!r}; expected a finite number")
    return float(value)


def attention_blocks(unet: nn.Module) -> dict[str, dict[int, int]]:
    """``{"down": {block: attentions}, "up": {...}, "mid": {0: n}}`` for blocks that have cross-attention.

    An engine-backed UNet has no blocks to walk: it carries the table its manifest recorded."""
    recorded = getattr(unet, "attention_blocks", None)
    if recorded is not None:
        return recorded
    out: dict[str, dict[int, int]] = {"down": {}, "up": {}, "mid": {}}
    for side, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
        for i, block in enumerate(blocks):
            if hasattr(block, "attentions"):
                out[side][i] = len(block.attentions)
    if unet.mid_block is not None and hasattr(unet.mid_block, "attentions"):
        out["mid"][0] = len(unet.mid_block.attentions)
    return out


def _value(value: Any, where: str) -> float | tuple[float, ...]:
    """A number, or a list of numbers (one per masked image, as diffusers takes them with regional masks)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            raise ScaleError(f"scale {where} is an empty list; expected a number or one number per masked image")
        return tuple(_number(v, f"{where}[{k}]") for k, v in enumerate(value))
    return _number(value, where)


def _expand_dict(config: Mapping, blocks: dict[str, dict[int, int]], where: str) -> dict[str, Any]:
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
        out["mid_block.attentions.0"] = _value(mid, f"{where}['mid']")
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
                out[f"{side}_blocks.{i}.attentions.{j}"] = _value(s, f"{where}['{side}']['{key}'][{j}]")
    return out


def expand_scale(
    scale: Any, unet: nn.Module, layer_names: Sequence[str], num_adapters: int, family: str = "sd15"
) -> list[list[Any]]:
    """The ``[num_adapters, len(layer_names)]`` float32 CPU tensor for a ``set_ip_adapter_scale`` argument.

    A config may also be a preset name (``"style"``, ``"composition"``, ``"style_and_composition"``)."""
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
    rows: list[list[Any]] = []
    for a, config in enumerate(configs):
        where = f"[{a}]" if isinstance(scale, (list, tuple)) else "value"
        if isinstance(config, str):
            config = scale_preset(config, family)
        if isinstance(config, Mapping):
            per_block = _expand_dict(config, blocks, where)
            row = []
            for name in layer_names:
                prefix = next((p for p in per_block if name.startswith(p + ".")), None)
                row.append(per_block[prefix] if prefix is not None else DEFAULT_BLOCK_SCALE)
            rows.append(row)
        else:
            rows.append([_value(config, where)] * len(layer_names))
    return rows


def scale_tables(rows: list[list[Any]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[A, L]`` adapter scales, and ``[A, I, L]`` per-image factors when some value is per image (diffusers'
    list scales for masked images). An adapter with per-image values gets scale 1 and its values as factors."""
    images = max((len(v) for row in rows for v in row if isinstance(v, tuple)), default=0)
    table = torch.tensor([[1.0 if isinstance(v, tuple) else v for v in row] for row in rows], dtype=torch.float32)
    if not images:
        return table, None
    per_image = torch.ones(len(rows), images, len(rows[0]), dtype=torch.float32)
    for a, row in enumerate(rows):
        if not any(isinstance(v, tuple) for v in row):
            continue
        table[a] = 1.0
        for layer, v in enumerate(row):
            values = v if isinstance(v, tuple) else (v,)
            if len(values) not in (1, images):
                raise ScaleError(f"scale [{a}] mixes per-image lists of lengths {len(values)} and {images}")
            per_image[a, :, layer] = torch.tensor(values * (images // len(values)))
    return table, per_image


def expand_step_ranges(ranges: Any, num_adapters: int) -> list[tuple[float, float]]:
    """``(start, end)`` for every adapter, as fractions of the schedule (ComfyUI's start_at / end_at)."""
    items = list(ranges) if isinstance(ranges, list) else [ranges] * num_adapters
    if len(items) != num_adapters:
        raise ScaleError(f"step range is a list of {len(items)} entries; expected {num_adapters} (one per adapter)")
    out = []
    for a, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ScaleError(f"step range [{a}] is {item!r}; expected a (start, end) pair of fractions")
        lo, hi = _number(item[0], f"range [{a}] start"), _number(item[1], f"range [{a}] end")
        if not 0.0 <= lo < hi <= 1.0:
            raise ScaleError(f"step range [{a}] is ({lo}, {hi}); expected 0 <= start < end <= 1")
        out.append((lo, hi))
    return out
