"""One OpenVINO engine folder run in a process of its own, so that oneDNN's instruction-set cap
(``ONEDNN_MAX_CPU_ISA``, read once per process) picks its kernels: run by tests/test_openvino.py.

``python tests/engine_under_cap.py ENGINE IMAGE LATENTS.pt CALL.json OUT.pt``: the pipeline from the engine folder,
one prompt with the reference image and the given latents, the call's other arguments; the latents it gives."""

from __future__ import annotations

import json
import sys

import torch
from PIL import Image


def main(engine: str, image: str, latents: str, call: str, out: str) -> None:
    import ipa_rt

    pipe = ipa_rt.Pipeline.from_engine(engine)
    pipe.set_progress_bar_config(disable=True)
    kwargs = json.loads(open(call).read())
    got = pipe("a cat", ip_adapter_image=[Image.open(image)], latents=torch.load(latents), **kwargs).images
    torch.save(got, out)


if __name__ == "__main__":
    main(*sys.argv[1:6])
