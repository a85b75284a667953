"""``ipa_rt build``: export contracts, ONNX export, engines (ONNX Runtime, TensorRT), the engine directory."""

from .build import BuildRequest, build_engines
from .contracts import Contract, all_contracts, unet_contract
from .engines import OrtEngine, TrtEngine
from .loader import load_engine_pipeline
from .onnx_export import export_onnx

__all__ = [
    "BuildRequest",
    "Contract",
    "OrtEngine",
    "TrtEngine",
    "all_contracts",
    "build_engines",
    "export_onnx",
    "load_engine_pipeline",
    "unet_contract",
]
