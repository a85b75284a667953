"""ipa_rt's ComfyUI node pack (ComfyUI's V3 node API, ``comfy_api.v0_0_2``).

Install into ComfyUI with ``python -m ipa_rt.comfyui install /path/to/ComfyUI`` (writes ``custom_nodes/ipa_rt``).
Loading the pack imports only the node schemas and ComfyUI's ``folder_paths`` (registering the ``ipadapter`` model
folder, see :mod:`.folders`): ipa_rt's pipelines load when a node first runs.
"""

from __future__ import annotations

from typing import Any


async def comfy_entrypoint() -> Any:
    from .folders import register_ipadapter_folder
    from .nodes import IpaRtExtension

    register_ipadapter_folder()
    return IpaRtExtension()
