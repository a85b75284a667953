"""ipa_rt's ComfyUI node pack (ComfyUI's V3 node API, ``comfy_api.v0_0_2``).

Install into ComfyUI with ``python -m ipa_rt.comfyui install /path/to/ComfyUI`` (writes ``custom_nodes/ipa_rt``).
Loading the pack imports only the node schemas: ipa_rt's pipelines load when a node first runs.
"""

from __future__ import annotations

from typing import Any


async def comfy_entrypoint() -> Any:
    from .nodes import IpaRtExtension

    return IpaRtExtension()
