"""Inference engines behind one call: ``engine(feeds) -> outputs``. :class:`OrtEngine`: ONNX Runtime, inputs and
outputs bound to preallocated torch buffers (I/O binding: no copies). :class:`TrtEngine` / :func:`build_trt_engine`:
TensorRT through polygraphy, static device buffers so the step can be captured in a CUDA graph; kept thin, as it is
unverified on a GPU (docs/design.md, engines: ONNX Runtime, TensorRT).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, EngineError, require_extra

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}
_ORT_TO_TORCH = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(bfloat16)": torch.bfloat16,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
}


def ort_providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ConfigError(
                f"device {device} needs ONNX Runtime's CUDAExecutionProvider, but this onnxruntime has {available}; "
                "expected onnxruntime-gpu (pip install onnxruntime-gpu) or device='cpu'"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtEngine:
    """One network's ONNX Runtime session with I/O bound to torch buffers (reused while shapes repeat)."""

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu") -> None:
        import onnxruntime as ort

        self.path, self.device = Path(path), torch.device(device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if self.device.type == "cpu":
            from .openvino_engine import cpu_threads  # the same thread count for every CPU engine

            options.intra_op_num_threads = cpu_threads()
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=ort_providers(self.device))
        except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf types: report the file and the cause
            raise EngineError(
                f"engine file '{self.path}' cannot be loaded by ONNX Runtime ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300]}); rebuild it with `ipa_rt build ... --rebuild`"
            ) from exc
        self.inputs = [(i.name, _ORT_TO_TORCH[i.type]) for i in self.session.get_inputs()]
        self.outputs = [(o.name, _ORT_TO_TORCH[o.type]) for o in self.session.get_outputs()]
        self.binding = self.session.io_binding()
        self._out: dict[tuple, list[Tensor]] = {}  # output buffers per input-shape key

    def _bind(self, name: str, x: Tensor, output: bool) -> None:
        kind = "cuda" if x.device.type == "cuda" else "cpu"
        index = x.device.index or 0
        bind = self.binding.bind_output if output else self.binding.bind_input
        bind(name, kind, index, _NP[x.dtype], tuple(x.shape), x.data_ptr())

    def __call__(self, feeds: dict[str, Tensor], copy: bool = True) -> list[Tensor]:
        """Run on ``feeds`` (torch tensors on the engine's device). ``copy=False`` returns the bound output
        buffers themselves, valid until the next call with the same shapes."""
        held = []
        for name, dtype in self.inputs:
            x = feeds[name].to(device=self.device, dtype=dtype).contiguous()
            held.append(x)  # keep converted inputs alive until the run
            self._bind(name, x, output=False)
        key = tuple(tuple(x.shape) for x in held)
        outs = self._out.get(key)
        if outs is None:  # first run at these shapes: let ORT size the outputs, then keep buffers like them
            self.binding.clear_binding_outputs()
            for name, _ in self.outputs:
                self.binding.bind_output(name, "cuda" if self.device.type == "cuda" else "cpu", self.device.index or 0)
            self.session.run_with_iobinding(self.binding)
            outs = self._out[key] = [torch.from_numpy(a).to(self.device) for a in self.binding.copy_outputs_to_cpu()]
        else:
            for (name, _), buf in zip(self.outputs, outs, strict=True):
                self._bind(name, buf, output=True)
            self.session.run_with_iobinding(self.binding)
        return [o.clone() for o in outs] if copy else outs


# --- TensorRT (thin, through polygraphy; unverified on the development machines) -------------------------------
TENSORRT_RANGE = ">=10.0,<12"  # the pyproject extra says the same
_TENSORRT_MAJORS = (10, 11)


def tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt.__version__


# per engine backend: its extra, and the modules the build needs from it (the runtime, then the ONNX export and
# clean-up, whose constant folding runs in ONNX Runtime); pyproject.toml's extras install each set
BACKEND_NEEDS = {
    "onnxruntime": ("onnx", ("onnxruntime", "onnx", "onnxscript", "onnx_graphsurgeon", "polygraphy")),
    "openvino": ("openvino", ("openvino", "onnx", "onnxscript", "onnx_graphsurgeon", "polygraphy", "onnxruntime")),
    "tensorrt": ("tensorrt", ("tensorrt", "onnx", "onnxscript", "onnx_graphsurgeon", "polygraphy", "onnxruntime")),
}


def require_backend(backend: str) -> None:
    """The extra named (:func:`ipa_rt.errors.require_extra`) when a module ``backend``'s engines need is missing."""
    extra, modules = BACKEND_NEEDS[backend]
    require_extra(f"backend {backend!r}", extra, modules)


def check_tensorrt(version: str | None) -> str:
    """``version`` if ipa_rt supports it (TensorRT 10.x and 11.x), else a :class:`ConfigError` saying what to
    install."""
    if version is None:
        raise ConfigError(
            f"backend 'tensorrt' needs TensorRT {TENSORRT_RANGE} (pip install 'ipa_rt[tensorrt]'); it is not installed"
        )
    major = int(version.split(".")[0])
    if major not in _TENSORRT_MAJORS:
        raise ConfigError(
            f"TensorRT {version} is installed; ipa_rt supports TensorRT {TENSORRT_RANGE} (10.x and 11.x): "
            f"pip install 'tensorrt{TENSORRT_RANGE}'"
        )
    return version


def build_trt_engine(
    onnx_path: Path,
    engine_path: Path,
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
    timing_cache: Path,
    optimization_level: int = 3,
) -> Path:
    """Build a TensorRT engine from ``onnx_path`` with one optimisation profile (the contract's min/opt/max), its
    network strongly typed on every supported version, so it computes in exactly the types the ONNX was exported with
    (:mod:`ipa_rt.export.precision` says why). ``timing_cache``: shared by every build on this GPU and TensorRT
    version (read if present, written back)."""
    check_tensorrt(tensorrt_version())
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine

    trt_profile = Profile()
    for name, (lo, opt, hi) in profile.items():
        trt_profile.add(name, min=lo, opt=opt, max=hi)
    config = CreateConfig(
        profiles=[trt_profile],
        load_timing_cache=str(timing_cache) if timing_cache.exists() else None,
        builder_optimization_level=optimization_level,
    )
    network = network_from_onnx_path(str(onnx_path), strongly_typed=True)
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    engine = engine_from_network(network, config=config, save_timing_cache=str(timing_cache))
    save_engine(engine, path=str(engine_path))
    return engine_path


def timing_cache_path(root: Path, version: str, gpu: dict | None) -> Path:
    """One TensorRT timing cache per TensorRT version and GPU, in the cache root: every build reuses the tactic
    timings measured before (a timing cache from another GPU or version is not applicable)."""
    name = (gpu or {}).get("name", "gpu").replace(" ", "-")
    return root / f"tensorrt-{version}-{name}-sm{(gpu or {}).get('capability', '0')}.timing-cache"


class TrtEngine:
    """A deserialised TensorRT engine run from static torch buffers on the current CUDA stream (so a torch
    CUDA-graph capture around the denoising step captures the engine's kernels too)."""

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cuda") -> None:
        check_tensorrt(tensorrt_version())
        import tensorrt as trt
        from polygraphy.backend.common import bytes_from_path
        from polygraphy.backend.trt import engine_from_bytes

        self.path, self.device = Path(path), torch.device(device)
        try:
            self.engine = engine_from_bytes(bytes_from_path(str(self.path)))
        except Exception as exc:
            raise EngineError(
                f"TensorRT engine '{self.path}' cannot be deserialised ({exc}); `ipa_rt build ... --rebuild` fixes it"
            ) from exc
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self._dtypes = {n: _trt_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self._out: dict[tuple, list[Tensor]] = {}
        self._addresses: dict[str, int] = {}  # set_tensor_address only when a buffer changes

    def __call__(self, feeds: dict[str, Tensor], copy: bool = True) -> list[Tensor]:
        held = []
        for name in self.inputs:
            x = feeds[name].to(device=self.device, dtype=self._dtypes[name]).contiguous()
            held.append(x)
            self.context.set_input_shape(name, tuple(x.shape))
            self._address(name, x)
        key = tuple(tuple(x.shape) for x in held)
        outs = self._out.get(key)
        if outs is None:
            outs = [
                torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._dtypes[n], device=self.device)
                for n in self.outputs
            ]
            self._out[key] = outs
        for name, buf in zip(self.outputs, outs, strict=True):
            self._address(name, buf)
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise EngineError(f"TensorRT engine '{self.path}' failed to execute")
        return [o.clone() for o in outs] if copy else outs

    def _address(self, name: str, x: Tensor) -> None:
        if self._addresses.get(name) != x.data_ptr():
            self.context.set_tensor_address(name, x.data_ptr())
            self._addresses[name] = x.data_ptr()


def _trt_dtype(dt) -> torch.dtype:
    import tensorrt as trt

    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int64: torch.int64,
        trt.int32: torch.int32,
    }
    return table[dt]
