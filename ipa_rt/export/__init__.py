"""Export of ipa_rt's networks (ONNX today; engines and their cache come with ``ipa_rt build``)."""

from .contracts import Contract, all_contracts, unet_contract
from .onnx_export import export_onnx, ort_session, run_onnx

__all__ = ["Contract", "all_contracts", "export_onnx", "ort_session", "run_onnx", "unet_contract"]
