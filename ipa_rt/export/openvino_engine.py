"""OpenVINO engines for CPUs: an export contract's ONNX converted to OpenVINO IR at build time, compiled per static
input shape at run time, inputs and outputs shared with torch buffers.

- **Precision** is chosen at build and recorded in the manifest: ``fp32`` is faithful (OpenVINO's CPU plugin
  computes in bf16 by itself on CPUs with AVX512_BF16 or AMX unless told ``INFERENCE_PRECISION_HINT=f32``), ``bf16``
  computes in bf16, ``int8`` computes the UNet's convolutions and matmuls in int8 (NNCF post-training quantisation
  of activations and weights, calibrated at build: :mod:`.quantize`) and the rest in bf16 where the CPU can, else
  f32; ``int8-weights`` only stores the UNet's and ControlNets' weights in int8 (NNCF weight compression: a smaller
  engine, bf16 arithmetic). The VAE follows the mode too: measured on full-size SD1.5 at 256²
  (2-core AVX512_BF16 CPU), its decoder in bf16 took 0.33 s instead of 1.85 s at 47.5 dB PSNR against f32, and bf16
  has fp32's range, so the SDXL VAE cannot overflow in it (:func:`compute_precision`).
- **Static shapes**: the IR keeps the contract's dynamic batch; each row count a pipeline uses is compiled once, at
  its static shape (CPU kernels are chosen per shape), and OpenVINO's model cache (``CACHE_DIR`` in the cache root)
  keeps the compiled blobs, so a second load takes seconds.
- **No copies per step**: inputs are wrapped (``shared_memory=True``) and outputs are written by OpenVINO straight
  into preallocated torch tensors; threads are set to the physical cores.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .. import console
from ..cache import cache_root
from ..cpu import BF16_FLAGS, cpu_features, fast_recipe
from ..errors import ConfigError, EngineError
from .quantize import QUANTIZED, compress_weights, precision_report, quantize_network

PRECISIONS = ("fp32", "bf16", "int8", "int8-weights")
WEIGHT_COMPRESSED = ("unet", "controlnet_")  # networks whose weights int8-weights compresses (name prefixes)
_NP = {torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32}
_TORCH = {"f32": torch.float32, "i64": torch.int64, "i32": torch.int32}


def openvino():
    """The ``openvino`` module, or a :class:`ConfigError` naming the extra that installs it."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise ConfigError("backend 'openvino' needs OpenVINO: pip install 'ipa_rt[openvino]'") from exc
    return ov


def cpu_supports_bf16() -> bool:
    """OpenVINO's word, less a oneDNN cap below bf16 (which OpenVINO's capabilities do not reflect)."""
    features = cpu_features()
    if features.cap is not None and not features.flags & BF16_FLAGS:
        return False
    return "BF16" in openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def check_precision(precision: str) -> None:
    """A precision this CPU can run, or a :class:`ConfigError` saying which to use instead."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is unknown for OpenVINO; expected one of {PRECISIONS} or 'auto'")
    if precision == "bf16" and not cpu_supports_bf16():
        raise ConfigError(
            f"precision 'bf16' needs a CPU with bf16 arithmetic (AVX512_BF16 or AMX), which this one "
            f"({cpu_features().machine_class}) lacks; use --precision fp32 (faithful), int8 (int8 matmuls and "
            "convolutions, f32 elsewhere here) or auto (the fastest measured for this CPU)"
        )


def resolve_precision(precision: str, int8: bool = True) -> str:
    """``"auto"`` as the fastest precision measured for this machine class (:func:`ipa_rt.cpu.fast_recipe`), any
    other value unchanged. ``int8=False``: for engines without an int8 calibration (Flux, Kolors, SD3.5), where
    the choice is bf16 if the CPU has it, else fp32."""
    if precision != "auto":
        return precision
    recipe = fast_recipe().precision
    if recipe == "int8" and not int8:
        return "bf16" if cpu_supports_bf16() else "fp32"
    return recipe


def compute_precision(network: str, precision: str) -> str:
    """OpenVINO's inference precision for one network of a build: ``f32`` or ``bf16``."""
    if precision == "fp32":
        return "f32"
    return "bf16" if cpu_supports_bf16() else "f32"


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:  # pragma: no cover - psutil comes with the dev and openvino extras
        return os.cpu_count() or 1


THREADS_ENV = "IPA_RT_CPU_THREADS"


def cpu_threads() -> int:
    """Threads a CPU engine (OpenVINO, ONNX Runtime) computes with: ``$IPA_RT_CPU_THREADS`` when set (several
    processes sharing a machine: replicas, parallel test workers), else the physical cores."""
    value = os.environ.get(THREADS_ENV, "")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"{THREADS_ENV}={value!r}: expected a positive whole number of threads")
        return int(value)
    return physical_cores()


def convert_onnx(
    onnx_path: Path,
    xml_path: Path,
    network: str,
    precision: str,
    calibration: dict[str, list] | None = None,
    overflow_fix: bool = False,
) -> tuple[list[Path], dict | None]:
    """ONNX -> OpenVINO IR (``.xml`` + ``.bin``): fp32 weights; int8 weights for the compressed networks in
    ``int8-weights`` mode; the UNet and image encoder quantised with ``calibration`` (input sets by network) in
    ``int8`` mode. Returns the files written and, for a quantised network, its :func:`.quantize.precision_report`."""
    import onnx

    ov = openvino()
    quantize = precision == "int8" and network in QUANTIZED
    compress = precision == "int8-weights" and network.startswith(WEIGHT_COMPRESSED)
    # NNCF finds weights as folded constants, which convert_model's offline passes make; every other network is
    # read as it is (the CPU plugin runs the same simplifications when it compiles): the example's six networks
    # convert in 1.1 s instead of 5.3 s, and a full-size SD1.5 UNet's bf16 step and compile were no slower
    folded = compress or quantize
    model = ov.convert_model(str(onnx_path)) if folded else ov.Core().read_model(str(onnx_path))
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    # a port can carry several tensor names (a folded Cast's output beside the graph input's): keep the ONNX's own
    # input and output names only, so the engine finds each input by its contract name
    for ports, declared in ((model.inputs, graph.input), (model.outputs, graph.output)):
        names = {v.name for v in declared}
        for port in ports:
            port.get_tensor().set_names(set(port.get_names()) & names or set(port.get_names()))
    report = None
    if compress:
        model = compress_weights(model)
    if quantize:
        if not (calibration or {}).get(network):
            raise ConfigError(f"precision 'int8' quantises the {network} with calibration inputs; none were given")
        model = quantize_network(model, network, calibration[network], overflow_fix)
        report = precision_report(model) | {"overflow_fix": overflow_fix}
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return [xml_path, xml_path.with_suffix(".bin")], report


class OvEngine:
    """One network's OpenVINO model: compiled once per static input shape (with the model cache), run with inputs
    and outputs shared with torch tensors."""

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu", precision: str = "f32") -> None:
        ov = openvino()
        self.path, self.device, self.precision = Path(path), torch.device(device), precision
        if self.device.type != "cpu":
            raise ConfigError(f"OpenVINO engines run on the CPU; got device {self.device}")
        self.core = ov.Core()
        # one blob cache per compute precision: in one process, OpenVINO 2026.4 can import a blob compiled for
        # another precision hint of the same model (wrong values, NaN) when they share a cache directory
        cap = cpu_features().cap  # blobs compiled under a oneDNN cap hold other kernels: their own cache
        name = f"{ov.__version__.split('-')[0]}-{precision}" + (f"-{cap}" if cap else "")
        cache = cache_root() / "openvino-cache" / name
        self.core.set_property({"CACHE_DIR": str(cache)})
        model = self._read()
        self.inputs = [(p.get_any_name(), _TORCH[p.get_element_type().get_type_name()]) for p in model.inputs]
        self.outputs = [o.get_any_name() for o in model.outputs]
        self.config = {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": cpu_threads(),
        }
        self._compiled: dict[tuple, tuple] = {}  # input shapes -> (infer request, output buffers)

    def _read(self):
        """The engine's IR, read anew for each compile and dropped after it: a compiled model holds its own copy of
        the weights, so keeping the IR resident would hold them twice (measured on the full-size int8 + TAESD set:
        see docs/performance.md)."""
        try:
            return self.core.read_model(str(self.path))
        except Exception as exc:
            raise EngineError(
                f"engine file '{self.path}' cannot be read by OpenVINO ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300]}); rebuild it with `ipa_rt build ... --rebuild`"
            ) from exc

    def _compile(self, shapes: tuple) -> tuple:
        start = time.perf_counter()
        model = self._read()
        model.reshape({name: list(shape) for (name, _), shape in zip(self.inputs, shapes, strict=True)})
        compiled = self.core.compile_model(model, "CPU", self.config)
        rows = f", {shapes[0][0]} rows" if shapes and shapes[0] else ""
        console.say(f"OpenVINO compiled {self.path.stem}{rows}: {time.perf_counter() - start:.1f} s")
        request = compiled.create_infer_request()
        outs = []
        for i, port in enumerate(compiled.outputs):
            dtype = _TORCH[port.get_element_type().get_type_name()]
            buf = torch.empty(tuple(port.get_shape()), dtype=dtype)
            request.set_output_tensor(i, self._wrap(buf))
            outs.append(buf)
        return request, outs

    @staticmethod
    def _wrap(x: Tensor):
        import openvino as ov

        return ov.Tensor(x.numpy(), shared_memory=True)

    def __call__(self, feeds: dict[str, Tensor], copy: bool = True) -> list[Tensor]:
        """Run on ``feeds``; ``copy=False`` returns the output buffers themselves, valid until the next call with
        the same shapes."""
        held = [feeds[name].to(dtype=dtype).contiguous() for name, dtype in self.inputs]
        shapes = tuple(tuple(x.shape) for x in held)
        entry = self._compiled.get(shapes)
        if entry is None:
            entry = self._compiled[shapes] = self._compile(shapes)
        request, outs = entry
        for i, x in enumerate(held):
            request.set_input_tensor(i, self._wrap(x))
        request.infer()
        return [o.clone() for o in outs] if copy else outs
