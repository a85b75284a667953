"""The Python-API side of tests/test_comfyui.py, run in the Python that runs ComfyUI (same torch, same threads):
what ipa_rt gives for a workflow's inputs, converted as ComfyUI's SaveImage converts (``clip(255 x)`` truncated).

``python tests/comfyui_reference.py SPEC.json OUT.npy``: SPEC holds the loader's inputs, the adapters
(image path, index, weight, weight type, start/end, mask path) and the sampler's inputs."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from PIL import Image


def main(spec_path: str, out_path: str) -> None:
    from ipa_rt.comfyui.pipelines import AdapterSettings, LoadSpec, encode, load_pipeline, sample

    spec = json.loads(open(spec_path).read())
    pipe = load_pipeline(LoadSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["load"].items()}))
    settings = []
    for a in spec["adapters"]:
        embeds = encode(pipe, a["index"], [Image.open(a["image"]).convert("RGB")], None, "concat")
        mask = None
        if a.get("mask"):
            mask = torch.from_numpy(np.asarray(Image.open(a["mask"]).convert("RGB"))[..., 0].astype(np.float32) / 255)
            mask = mask[None]
        settings.append(AdapterSettings(embeds, a["weight"], a["weight_type"], a["start_at"], a["end_at"], mask))
    s = spec["sample"]
    image, _ = sample(
        pipe,
        settings,
        s["positive"],
        s["negative"],
        s["seed"],
        s["steps"],
        s["cfg"],
        s["scheduler"],
        s["width"],
        s["height"],
    )
    np.save(out_path, np.clip(255.0 * image[0].numpy(), 0, 255).astype(np.uint8))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
