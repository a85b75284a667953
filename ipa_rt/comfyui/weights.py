"""ComfyUI weight types → ipa_rt scale configs (``set_ip_adapter_scale``'s per-block dicts): pure, no ComfyUI.

Ramps (``t / L`` over the attention blocks) and attenuations are ComfyUI_IPAdapter_plus' definitions, counted over
the attention modules in IP-Adapter key order (16 on SD1.5, 11 on SDXL); each weight type is one write into the scale
tensor (docs/guides/comfyui.md, parity: weight types, block order, presets).
"""

from __future__ import annotations

from typing import Any

from ..errors import ScaleError

RAMPS = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out")
GROUPS = ("weak input", "weak output", "weak middle", "strong middle")
PRESET_TYPES = {
    "style transfer": "style",
    "composition": "composition",
    "style and composition": "style_and_composition",
}
WEIGHT_TYPES = RAMPS + GROUPS + tuple(PRESET_TYPES)
# only in ComfyUI_IPAdapter_plus and left out here (docs/guides/comfyui.md says why): they rewrite the
# unconditional rows per block or scale the keys inside the softmax, which is not the diffusers math
LEFT_OUT = ("strong style transfer", "strong style and composition", "style transfer precise", "composition precise")
KIND = {"down": "input", "up": "output", "mid": "middle"}


def blocks_in_key_order(attention_blocks: dict[str, dict[int, int]]) -> list[tuple[str, int, int]]:
    """``(side, block, attention)`` for every attention module, in IP-Adapter key order: down, up, mid."""
    return [
        (side, block, a)
        for side in ("down", "up", "mid")
        for block, count in sorted(attention_blocks.get(side, {}).items())
        for a in range(count)
    ]


def _factor(weight_type: str, t: int, layers: int, kind: str) -> float:
    half = layers / 2
    if weight_type == "ease in":
        return 0.05 + 0.95 * (1 - t / layers)
    if weight_type == "ease out":
        return 0.05 + 0.95 * (t / layers)
    if weight_type == "ease in-out":
        return 0.05 + 0.95 * (1 - abs(t - half) / half)
    if weight_type == "reverse in-out":
        return 0.05 + 0.95 * (abs(t - half) / half)
    weak = {"weak input": ("input",), "weak output": ("output",), "weak middle": ("middle",)}
    weak["strong middle"] = ("input", "output")
    return 0.2 if kind in weak.get(weight_type, ()) else 1.0


def scale_config(weight_type: str, weight: float, attention_blocks: dict[str, dict[int, int]], family: str) -> Any:
    """What ``set_ip_adapter_scale`` takes for one adapter: a number (``linear``), a preset's per-block dict, or a
    per-block dict of the ramp's values."""
    from ..adapters.scale import scale_preset

    if weight_type in LEFT_OUT:
        raise ScaleError(
            f"weight_type {weight_type!r} exists only in ComfyUI_IPAdapter_plus and is not implemented by ipa_rt "
            f"(it is not diffusers' math); expected one of {list(WEIGHT_TYPES)}"
        )
    if weight_type not in WEIGHT_TYPES:
        raise ScaleError(f"weight_type is {weight_type!r}; expected one of {list(WEIGHT_TYPES)}")
    if weight_type == "linear":
        return float(weight)
    if weight_type in PRESET_TYPES:
        return scale_preset(PRESET_TYPES[weight_type], family, weight)
    order = blocks_in_key_order(attention_blocks)
    config: dict[str, Any] = {}
    for t, (side, block, a) in enumerate(order):
        value = float(weight) * _factor(weight_type, t, len(order), KIND[side])
        if side == "mid":
            config["mid"] = value
        else:
            config.setdefault(side, {}).setdefault(f"block_{block}", [0.0] * attention_blocks[side][block])[a] = value
    return config
