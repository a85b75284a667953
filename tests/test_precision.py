"""The torch backend in bf16 on the CPU (oneDNN runs it with AVX512_BF16 / AMX where the CPU has them): the same API,
diffusers' bf16 result, every output type and mode; fp32 stays the default and bitwise diffusers'."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CALL, FAMILIES, diffusers_pipe, fixed_latents, ipa_pipe, rel_l2

from ipa_rt import testing as T

BF16_SAME_RTOL = 1e-2  # ipa_rt bf16 vs diffusers bf16: same operations, bf16 rounding of a few reordered sums
BF16_VS_FP32_RTOL = 5e-2  # bf16 against the fp32 oracle over a few steps (observed ~1.5e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_torch_backend_matches_diffusers(models, images, family):
    ref32 = diffusers_pipe(models, family, ["plus.safetensors"])
    ref16 = diffusers_pipe(models, family, ["plus.safetensors"], torch_dtype=torch.bfloat16)
    ours = ipa_pipe(models, family, models.adapter(family, "plus"), dtype=torch.bfloat16)
    assert ours.runtime_summary().startswith("backend torch, precision bfloat16")
    lat = fixed_latents()
    got = ours("a cat", ip_adapter_image=images[0], latents=lat, **CALL).images
    assert got.dtype == torch.bfloat16
    want16 = ref16("a cat", ip_adapter_image=images[0], latents=lat.to(torch.bfloat16), **CALL).images
    want32 = ref32("a cat", ip_adapter_image=images[0], latents=lat, **CALL).images
    assert rel_l2(got.float(), want16.float()) <= BF16_SAME_RTOL
    assert rel_l2(got.float(), want32) <= BF16_VS_FP32_RTOL
    for output_type in ("pil", "np"):
        out = ours("a cat", ip_adapter_image=images[0], latents=lat, **{**CALL, "output_type": output_type}).images
        assert np.isfinite(np.asarray(out[0], dtype=np.float32)).all()
    init = T.make_image(seed=4, size=(32, 32))
    out = ours("a cat", ip_adapter_image=images[0], image=init, strength=0.6, **CALL).images
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
