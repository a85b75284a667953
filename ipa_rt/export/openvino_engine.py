"""OpenVINO engines for CPUs: an export contract's ONNX converted to OpenVINO IR at build time, compiled per static
input shape at run time (CPU kernels are chosen per shape), inputs and outputs shared with torch buffers.

The precision (``fp32``, ``bf16``, ``int8``: :mod:`.quantize`, ``int8-weights``) is chosen at build and recorded in
the manifest; :func:`convert_onnx` stores the weights, :func:`compute_precision` picks each network's arithmetic. A
compiled model is kept as a blob named by the IR files' identity and imported from a mapping of the file, so a warm
load never reads the IR's weights (OpenVINO's ``CACHE_DIR`` hashes them all); once compiled or imported, the files'
pages are dropped beside OpenVINO's repacked copy (:func:`release_mapped`). docs/guides/cpu.md: each precision, the
blob cache, the measurements.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .. import console
from ..cache import atomic_write_bytes, cache_root
from ..cpu import BF16_FLAGS, cpu_features, fast_recipe
from ..errors import ConfigError, EngineError
from .quantize import QUANTIZED, compress_weights, precision_report, quantize_network

PRECISIONS = ("fp32", "bf16", "int8", "int8-weights")
WEIGHT_COMPRESSED = ("unet", "controlnet_")  # networks whose weights int8-weights compresses (name prefixes)
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
    return "bf16" if precision != "fp32" and cpu_supports_bf16() else "f32"


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
    # bf16 and int8 builds keep a floating-point network's weights in fp16: it computes in bf16 (coarser than fp16),
    # or in f32 from fp16 values on CPUs without bf16; measured on the full-size CLIP-L text encoder (2-core
    # AVX512_BF16): 7.5e-3 rel. from f32 beside bf16's own 7.1e-3 (f32 from fp16: 7.2e-4), and the compiled engine
    # holds 0.20 GB instead of 0.36 GB. Quantised and compressed networks keep their scales as NNCF wrote them
    half = precision in ("bf16", "int8") and not folded
    ov.save_model(model, str(xml_path), compress_to_fp16=half)
    return [xml_path, xml_path.with_suffix(".bin")], report


class OvEngine:
    """One network's OpenVINO model, compiled per static input shape (see the module's docstring)."""

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu", precision: str = "f32") -> None:
        ov = openvino()
        self.path, self.device, self.precision = Path(path), torch.device(device), precision
        if self.device.type != "cpu":
            raise ConfigError(f"OpenVINO engines run on the CPU; got device {self.device}")
        self.core = ov.Core()
        # one blob folder per compute precision and oneDNN cap (blobs compiled under a cap hold other kernels); the
        # blob's name carries both again, with the IR files' identity and the shapes (see _blob)
        cap = cpu_features().cap
        self.version = ov.__version__.split("-")[0]
        self.blobs = cache_root() / "openvino-cache" / (f"{self.version}-{precision}" + (f"-{cap}" if cap else ""))
        model = self._read()  # the IR's inputs and outputs (its weights are mapped, not read)
        self.inputs = [(p.get_any_name(), _TORCH[p.get_element_type().get_type_name()]) for p in model.inputs]
        self.outputs = [o.get_any_name() for o in model.outputs]
        self.config = {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": cpu_threads(),
        }
        self._compiled: dict[tuple, tuple] = {}  # input shapes -> (infer request, output buffers, blob mapping)

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

    def _blob(self, shapes: tuple) -> Path:
        """The file of the compiled model for ``shapes``: ``<network>-<IR path>-<IR files>-<settings>.blob``, each part
        a hash: of the IR's path; of its files' sizes and modification times; of the shapes, the compile settings,
        OpenVINO's version and the CPU's class and cap."""
        files = (self.path, self.path.with_suffix(".bin"))
        cpu = cpu_features()
        parts = (
            str(self.path.resolve()),
            [(f.stat().st_size, f.stat().st_mtime_ns) for f in files],
            [shapes, self.config, self.version, cpu.machine_class, cpu.cap],
        )
        names = [hashlib.sha256(json.dumps(x, default=str).encode()).hexdigest()[:12] for x in parts]
        return self.blobs / f"{self.path.stem}-{'-'.join(names)}.blob"

    def _keep(self, compiled, blob: Path) -> None:
        """Write ``compiled`` to ``blob`` (atomically), then remove the blobs no load can use again: those of this IR
        path made from other files (an engine rebuilt in place: a UNet's a GB each) and those of every IR that is gone
        (an engine folder deleted). Each blob folder notes its IRs' paths by hash in ``sources.json``."""
        stream = io.BytesIO()
        compiled.export_model(stream)
        try:
            atomic_write_bytes(blob, stream.getbuffer())
        except OSError as exc:  # a read-only or full cache: the next load compiles again
            console.say(f"OpenVINO's compiled {self.path.stem} not kept in '{blob.parent}': {exc}")
            return
        _, path, files, _ = blob.stem.rsplit("-", 3)
        index = blob.parent / "sources.json"
        try:
            known = json.loads(index.read_text())
        except (OSError, ValueError):  # none yet, or damaged: start again (unnoted blobs are only not pruned)
            known = {}
        known = (known if isinstance(known, dict) else {}) | {path: str(self.path.resolve())}
        gone = {key for key, ir in known.items() if not Path(str(ir)).is_file()}
        for old in blob.parent.glob("*.blob"):
            _, p, f, _ = old.stem.rsplit("-", 3) if old.stem.count("-") >= 3 else ("", "", "", "")
            if p in gone or (p == path and f != files):
                old.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # a read-only cache keeps its blobs
            atomic_write_bytes(index, json.dumps({k: v for k, v in known.items() if k not in gone}).encode())

    def _import(self, blob: Path) -> tuple:
        """The compiled model kept in ``blob`` and the mapping it reads its weights from (kept alive with it), or
        ``(None, None)`` when the blob cannot be imported (another OpenVINO or CPU, a damaged file): then it is
        compiled anew and the blob rewritten."""
        ov = openvino()
        try:
            # copy-on-write: OpenVINO takes only writable arrays; it reads the blob and never writes it
            mapping = np.memmap(blob, dtype=np.uint8, mode="c")
            return self.core.import_model(ov.Tensor(mapping, shared_memory=True), "CPU", self.config), mapping
        except Exception as exc:  # any failure to import means: compile from the IR instead
            console.say(f"OpenVINO could not import {blob.name} ({type(exc).__name__}); compiling {self.path.stem}")
            return None, None

    def prepare(self, shapes: tuple) -> None:
        """Compile (or import) the model for input ``shapes`` now rather than at the first call with them."""
        if shapes not in self._compiled:
            self._compiled[shapes] = self._compile(shapes)

    def _compile(self, shapes: tuple) -> tuple:
        start = time.perf_counter()
        blob = self._blob(shapes)
        compiled, mapping = self._import(blob) if blob.is_file() else (None, None)
        fresh = compiled is None
        if fresh:
            model = self._read()
            model.reshape({name: list(shape) for (name, _), shape in zip(self.inputs, shapes, strict=True)})
            compiled = self.core.compile_model(model, "CPU", self.config)
            del model
        release_mapped((self.path.with_suffix(".bin"), blob))  # before the export below copies the blob in memory
        if fresh:
            self._keep(compiled, blob)
            release_mapped((self.path.with_suffix(".bin"),))  # the export read the IR's weights again
        how = "compiled" if fresh else "imported"
        rows = f", {shapes[0][0]} rows" if shapes and shapes[0] else ""
        console.say(f"OpenVINO {how} {self.path.stem}{rows}: {time.perf_counter() - start:.1f} s")
        request = compiled.create_infer_request()
        outs = []
        for i, port in enumerate(compiled.outputs):
            dtype = _TORCH[port.get_element_type().get_type_name()]
            buf = torch.empty(tuple(port.get_shape()), dtype=dtype)
            request.set_output_tensor(i, self._wrap(buf))
            outs.append(buf)
        return request, outs, mapping

    @staticmethod
    def _wrap(x: Tensor):
        import openvino as ov

        return ov.Tensor(x.numpy(), shared_memory=True)

    def __call__(self, feeds: dict[str, Tensor], copy: bool = True) -> list[Tensor]:
        """Run on ``feeds``; ``copy=False`` returns the output buffers themselves, valid until the next call with
        the same shapes."""
        held = [feeds[name].to(dtype=dtype).contiguous() for name, dtype in self.inputs]
        shapes = tuple(tuple(x.shape) for x in held)
        self.prepare(shapes)
        request, outs, _ = self._compiled[shapes]
        for i, x in enumerate(held):
            request.set_input_tensor(i, self._wrap(x))
        request.infer()
        return [o.clone() for o in outs] if copy else outs


_MADV_DONTNEED, _MADV_PAGEOUT = 4, 21


def release_mapped(files: tuple[Path, ...]) -> int:
    """Drop this process's resident pages of its memory mappings of ``files``; returns the bytes of mappings
    advised. OpenVINO reads an IR's or a blob's weights once, to make its own repacked copy, and the pages it read
    would stay resident beside that copy; a page read again later is mapped back in by the kernel. Read-only
    mappings get ``MADV_DONTNEED`` (the page cache keeps the pages), writable ones ``MADV_PAGEOUT``, which never
    loses a written page. Linux only; elsewhere nothing is done."""
    if not sys.platform.startswith("linux"):
        return 0
    names = {str(f.resolve()) for f in files if f.exists()}
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    with open("/proc/self/maps") as maps:
        rows = [line.split(maxsplit=5) for line in maps]
    for row in rows:
        if len(row) == 6 and row[5].strip() in names:
            start, end = (int(x, 16) for x in row[0].split("-"))
            advice = _MADV_PAGEOUT if "w" in row[1] else _MADV_DONTNEED
            if libc.madvise(start, end - start, advice) == 0:  # refused (an old kernel): the pages stay, no harm
                advised += end - start
    return advised
