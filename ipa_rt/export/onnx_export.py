"""ONNX export of a :class:`~ipa_rt.export.contracts.Contract` and ONNX Runtime sessions to check it.

The decoupled attention exports in standard operators (see ``decoupled_attention_decomposed``); external
data is used past ONNX's 2 GB protobuf limit; ``onnx.checker`` validates every file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ConfigError
from .contracts import Contract

OPSET = 18
PROTOBUF_LIMIT = 2 * 2**30


def export_onnx(contract: Contract, path: str | os.PathLike, opset: int = OPSET) -> Path:
    """Export ``contract`` to ``path`` (static shapes of its example inputs) and check the file."""
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - dev extra installs it
        raise ConfigError("ONNX export needs onnx and onnxscript: pip install 'ipa_rt[onnx]'") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(p.numel() * p.element_size() for p in contract.module.parameters())
    with torch.no_grad():
        torch.onnx.export(
            contract.module,
            tuple(contract.inputs.values()),
            str(path),
            input_names=list(contract.inputs),
            output_names=list(contract.outputs),
            opset_version=opset,
            dynamo=True,
            external_data=size > PROTOBUF_LIMIT,
        )
    onnx.checker.check_model(str(path))
    return path


def ort_session(path: str | os.PathLike, providers: list[str] | None = None):
    """An ONNX Runtime session: CUDA EP when onnxruntime-gpu has it, else the CPU EP."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), providers=providers)


def run_onnx(session, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    feeds = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]
