"""One UNet call of the ipa_rt MODEL (ComfyUI's model classes, what KSampler calls) against the same call on the
Python API's side, bit for bit; run by tests/test_comfyui.py in the Python that runs ComfyUI, from a ComfyUI folder.

``python tests/comfyui_model_check.py SPEC.json``; SPEC holds ``masked`` (SD1.5 files and a mask image),
``sdxl`` (SDXL files) and ``from_model`` (a checkpoint and a LoRA). Prints one JSON line of what was compared.

- masked: the ipa_rt Sampler's call leaves the pipeline's image side prepared as the Python API prepares it for
  regional masks (its rows ``[negative, positive]``, masks at its size); the UNet on it is the reference, and the
  MODEL's diffusion model, given the same rows as ComfyUI's ``cond_or_uncond`` ``[1, 0]`` and the Apply node's
  payload, must give the same prediction (and not the unmasked one).
- sdxl: ``y`` made by ComfyUI's own SDXL ``encode_adm`` from the pooled text and the size; the MODEL's prediction
  must equal the UNet's with the runtime's ``added_conditions`` (diffusers' ``text_embeds`` and ``time_ids``),
  with IP-Adapter on both sides; sizes read back from ``timestep_embedding`` in fp32, fp16 and bf16; a ``y`` of a
  fractional size or of the wrong width is refused.
- from_model: see :func:`from_model`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
import torch
from PIL import Image

PROMPT, NEGATIVE = "a photo of a cat", ""


def _setup() -> None:
    sys.path.insert(0, os.getcwd())  # the ComfyUI folder
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # what main.py --cpu sets before comfy.model_management is imported


def _settings(pipe: Any, files: dict, mask: torch.Tensor | None) -> list:
    from ipa_rt.comfyui.pipelines import AdapterSettings, encode

    embeds = encode(pipe, 0, [Image.open(files["image"]).convert("RGB")], None, "concat")
    return [AdapterSettings(embeds, 1.0, "linear", 0.0, 1.0, mask)]


def _model_call(pipe: Any, settings: list, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, **extra: Any):
    from ipa_rt.comfyui.model import KEY, ip_options, make_model

    model = make_model(pipe)
    options = {KEY: ip_options(model, settings, pipe), "cond_or_uncond": [1, 0], "sigmas": torch.ones(1)}
    with torch.inference_mode():  # as ComfyUI samples
        return model.model.diffusion_model(x, t, context=ctx, transformer_options=options, **extra), model


def _text(pipe: Any) -> Any:
    from ipa_rt.runtime.request import FAMILY_RUNTIME

    encode_prompt = FAMILY_RUNTIME[pipe.family.name][0]
    return encode_prompt(
        pipe.text_encoders, pipe.tokenizers, PROMPT, NEGATIVE, 1, True, pipe.device, pipe.dtype,
        force_zeros_for_empty_prompt=pipe.base.force_zeros_for_empty_prompt,
    )  # fmt: skip


def _inputs(pipe: Any, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    latent = size // pipe.vae_scale_factor
    return torch.randn(2, pipe.unet.config.in_channels, latent, latent, generator=g), torch.full((2,), 501.0)


def masked(spec: dict, size: int) -> dict:
    from ipa_rt.comfyui.pipelines import LoadSpec, load_pipeline, sample

    pipe = load_pipeline(LoadSpec(spec["base"], (spec["adapter"],), spec["encoder"]))
    red = np.asarray(Image.open(spec["mask"]).convert("RGB"))[..., 0].astype(np.float32) / 255
    mask = torch.from_numpy(red)[None]  # LoadImageMask's red channel, [1, H, W]
    settings = _settings(pipe, spec, mask)
    sample(pipe, settings, PROMPT, NEGATIVE, 0, 1, 7.5, "default", size, size)  # the Sampler path's call
    x, t = _inputs(pipe, size)
    ctx = _text(pipe).embeds
    with torch.no_grad():
        want = pipe.unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
    got, _ = _model_call(pipe, settings, x, t, ctx)
    unmasked, _ = _model_call(pipe, _settings(pipe, spec, None), x, t, ctx)
    assert torch.equal(got, want), f"masked MODEL call differs from the Sampler path's: {(got - want).abs().max()}"
    assert not torch.equal(unmasked, want), "the mask changed nothing"
    return {"masked_equal": True, "mask_changes": float((unmasked - want).abs().max())}


def sdxl(spec: dict, size: int) -> dict:
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    from ipa_rt.comfyui.model import sizes_from_embedding
    from ipa_rt.comfyui.pipelines import LoadSpec, load_pipeline, sample
    from ipa_rt.runtime.request import added_conditions

    sizes = torch.tensor([0, 1, 7, 64, 512, 832, 1024, 1216, 2048, 4096, 8192, 16384, 30000], dtype=torch.float32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        back = sizes_from_embedding(timestep_embedding(sizes, 256).to(dtype))
        assert torch.equal(back, sizes.double()), (dtype, back)

    pipe = load_pipeline(LoadSpec(spec["base"], (spec["adapter"],), spec["encoder"]))
    settings = _settings(pipe, spec, None)
    sample(pipe, settings, PROMPT, NEGATIVE, 0, 1, 5.0, "default", size, size)  # prepares the reference's rows
    x, t = _inputs(pipe, size)
    text = _text(pipe)
    added = added_conditions(pipe, text, size, size, 1, True)
    with torch.no_grad():
        want = pipe.unet(x, t, encoder_hidden_states=text.embeds, added_cond_kwargs=added, return_dict=False)[0]
    from ipa_rt.comfyui.model import make_model

    base = make_model(pipe).model  # ComfyUI's SDXL class: its encode_adm makes y as KSampler's conditioning does
    y = torch.cat([base.encode_adm(pooled_output=text.pooled[i : i + 1], width=size, height=size) for i in (0, 1)])
    got, _ = _model_call(pipe, settings, x, t, text.embeds, y=y)
    assert torch.equal(got, want), f"SDXL MODEL call differs from the Python API's: {(got - want).abs().max()}"
    y_other = torch.cat(
        [base.encode_adm(pooled_output=text.pooled[i : i + 1], width=size, height=2 * size) for i in (0, 1)]
    )
    other, _ = _model_call(pipe, settings, x, t, text.embeds, y=y_other)
    assert not torch.equal(other, want), "the size conditioning changed nothing"
    from ipa_rt import ConfigError

    fractional = torch.cat([base.encode_adm(pooled_output=text.pooled[i : i + 1], width=size + 0.5) for i in (0, 1)])
    for bad, why in ((fractional, "not embeddings of integer sizes"), (y[:, :-1], "expected [2, ")):
        try:
            _model_call(pipe, settings, x, t, text.embeds, y=bad)
        except ConfigError as exc:
            assert why in str(exc), exc
        else:
            raise AssertionError(f"y {tuple(bad.shape)} was taken")
    return {"sdxl_equal": True, "y_width": y.shape[1], "sizes_round_trip": len(sizes), "bad_y_refused": 2}


def from_model(spec: dict) -> dict:
    """ipa_rt Engine from MODEL's weights step on Load Checkpoint's MODEL with Load LoRA's patches: the file holds the
    patched weights; the MODEL is then unloaded (no longer among ComfyUI's loaded models) with its weights restored."""
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    from safetensors.torch import load_file

    from ipa_rt.comfyui.from_model import unet_file

    model = comfy.sd.load_checkpoint_guess_config(spec["checkpoint"], output_vae=False, output_clip=False)[0]
    lora = comfy.utils.load_torch_file(spec["lora"], safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    before = {k: v.clone() for k, v in patched.model.diffusion_model.state_dict().items()}
    written = load_file(str(unet_file(patched)))
    after = patched.model.diffusion_model.state_dict()
    assert not any(m.model is patched for m in comfy.model_management.current_loaded_models), "still loaded"
    assert all(torch.equal(before[k], after[k]) for k in before), "weights left patched after the unload"
    changed = sum(not torch.equal(written[f"model.diffusion_model.{k}"], v) for k, v in before.items())
    assert changed > 0, "the LoRA is not in the written weights"
    return {"released": True, "lora_tensors_in_file": changed}


def main(spec_path: str) -> None:
    _setup()
    spec = json.loads(open(spec_path).read())
    out: dict[str, Any] = {}
    if "masked" in spec:
        out |= masked(spec["masked"], spec["size"])
    if "sdxl" in spec:
        out |= sdxl(spec["sdxl"], spec["size"])
    if "from_model" in spec:
        out |= from_model(spec["from_model"])
    print(json.dumps(out))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
