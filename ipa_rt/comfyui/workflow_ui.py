"""API-format workflow → ComfyUI's UI (frontend) format, from the server's ``/object_info``: how the UI-format
example workflows are made and checked against the live node schemas (tests/test_comfyui.py)."""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
UPLOAD = {"LoadImage": "image", "LoadImageMask": "image"}  # the frontend's upload button keeps a widget value


def _inputs(info: dict) -> list[tuple[str, Any]]:
    spec = info["input"]
    return [*spec.get("required", {}).items(), *spec.get("optional", {}).items()]


def _is_widget(kind: Any) -> bool:
    return isinstance(kind, list) or kind in WIDGET_TYPES


def api_to_ui(graph: dict[str, dict], object_info: dict[str, dict]) -> dict:
    """The UI-format workflow of ``graph``: one node per entry (laid out in a row per dependency depth), links
    from its ``[node, slot]`` references, widget values in schema order."""
    ids = {key: int(key) for key in graph}
    depth: dict[str, int] = {}

    def level(key: str) -> int:
        if key not in depth:
            refs = [v[0] for v in graph[key]["inputs"].values() if isinstance(v, list)]
            depth[key] = 1 + max((level(r) for r in refs), default=-1)
        return depth[key]

    links: list[list] = []
    nodes: list[dict] = []
    outputs: dict[tuple[str, int], list[int]] = {}
    for order, key in enumerate(sorted(graph, key=lambda k: (level(k), ids[k]))):
        node, info = graph[key], object_info[graph[key]["class_type"]]
        inputs, widgets = [], []
        for name, spec in _inputs(info):
            kind = spec[0]
            value = node["inputs"].get(name)
            if isinstance(value, list):
                src, slot = value
                link = len(links) + 1
                out_type = object_info[graph[src]["class_type"]]["output"][slot]
                links.append([link, ids[src], slot, ids[key], len(inputs), out_type])
                outputs.setdefault((src, slot), []).append(link)
                entry = {"name": name, "type": out_type, "link": link}
                if _is_widget(kind):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            elif _is_widget(kind):
                widgets.append(value if value is not None else spec[1].get("default") if len(spec) > 1 else None)
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    widgets.append("fixed")
        if node["class_type"] in UPLOAD:
            widgets.append(UPLOAD[node["class_type"]])
        nodes.append(
            {
                "id": ids[key],
                "type": node["class_type"],
                "pos": [40 + 360 * level(key), 40 + 260 * (order % 4)],
                "size": [320, 220],
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": inputs,
                "outputs": [],
                "properties": {"Node name for S&R": node["class_type"]},
                "widgets_values": widgets,
            }
        )
    for n in nodes:
        key = str(n["id"])
        info = object_info[graph[key]["class_type"]]
        n["outputs"] = [
            {"name": name, "type": kind, "links": outputs.get((key, slot), []), "slot_index": slot}
            for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"], strict=True))
        ]
    return {
        "last_node_id": max(ids.values()),
        "last_link_id": len(links),
        "nodes": sorted(nodes, key=lambda n: n["id"]),
        "links": links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }
