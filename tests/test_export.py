"""ONNX export of every network (the groundwork of ``ipa_rt build``), each checked in ONNX Runtime."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, ipa_pipe, rel_l2

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ipa_rt.export import all_contracts, export_onnx, ort_session, run_onnx

EXPORT_RTOL = 1e-4  # fp32: ONNX Runtime's kernels vs PyTorch's, only summation order differs


@pytest.mark.parametrize("family", FAMILIES)
def test_every_network_exports_and_runs_in_onnxruntime(models, tmp_path, family):
    pipe = ipa_pipe(models, family, [models.adapter(family, "base"), models.adapter(family, "full")])
    pipe.set_ip_adapter_scale([0.6, {"up": 1.2}])
    names = []
    for contract in all_contracts(pipe, batch=1, height=32, width=32):
        path = export_onnx(contract, tmp_path / f"{contract.name}.onnx")
        session = ort_session(path)
        assert [i.name for i in session.get_inputs()] == list(contract.inputs)
        with torch.no_grad():
            want = contract.module(*contract.inputs.values())
        want = want if isinstance(want, tuple) else (want,)
        got = run_onnx(session, contract.inputs)
        for g, w in zip(got, want, strict=True):
            assert rel_l2(g, w.float()) <= EXPORT_RTOL, contract.name
        if contract.name == "unet":  # the scale is an input: a new value needs no new export
            zero = dict(contract.inputs, ip_scale=torch.zeros_like(contract.inputs["ip_scale"]))
            with torch.no_grad():
                want0 = contract.module(*zero.values())
            got0 = run_onnx(session, zero)[0]
            assert rel_l2(got0, want0) <= EXPORT_RTOL and rel_l2(got0, got[0]) > 1e-3
        names.append(contract.name)
    text = ["text_encoder_0"] + (["text_encoder_1"] if family == "sdxl" else [])
    assert names == [
        "unet",
        "image_projection_0",
        "image_projection_1",
        "image_encoder",
        *text,
        "vae_decoder",
        "vae_encoder",
    ]
