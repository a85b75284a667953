"""ONNX export of a :class:`~ipa_rt.export.contracts.Contract`: the batch axis dynamic, the TensorRT demo's graph
cleanup (onnx-graphsurgeon, polygraphy constant folding and shape inference), external data past ONNX's 2 GB
protobuf limit, and ``onnx.checker``. Two exporters (:data:`EXPORTERS`, recorded in the build's identity): the
tracer (``torchscript``, the default, much faster) and ``dynamo``. The decoupled attention exports in standard
operators; fp16/bf16 models keep their normalisations in fp32 (:mod:`ipa_rt.export.precision`). docs/guides/engines.md
(exporter: why each, measured times), docs/design.md (engines: export).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..console import hushed
from ..errors import ConfigError, EngineError
from .contracts import Contract
from .precision import decomposed_rms_norm, fp32_normalization

OPSET = 18
PROTOBUF_LIMIT = 2 * 2**30
# past this, weights go to external data: a graph holds more than the module's weights (constants the exporter
# makes, folded ones), and an SD3.5-width transformer of 1.9 GB of weights failed to serialise at 2 GB
LARGE_BYTES = int(0.75 * PROTOBUF_LIMIT)
EXPORTERS = ("torchscript", "dynamo")


def check_exporter(exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter {exporter!r} is unknown; expected one of {EXPORTERS}")


def _dynamic_shapes(contract: Contract) -> tuple:
    """``torch.export`` dynamic shapes in the structure of the module's forward (named params, then ``*args``)."""
    dim = torch.export.Dim(f"{contract.name}_batch", min=contract.batch[0], max=contract.batch[2])
    per_input = [
        {0: dim * contract.per_row[name] if name in contract.per_row else dim} if name in contract.batched else None
        for name in contract.inputs
    ]
    params = inspect.signature(contract.module.forward).parameters.values()
    named = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
    if any(p.kind is p.VAR_POSITIONAL for p in params) and len(per_input) > named:
        return (*per_input[:named], tuple(per_input[named:]))
    return tuple(per_input)


def _needs(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - the onnx extra installs them
        raise ConfigError(f"ONNX export needs {module}: pip install 'ipa_rt[onnx]'") from exc


def _dynamic_axes(contract: Contract) -> dict[str, dict[int, str]]:
    """The tracer's dynamic axes: the batch axis, named apart for inputs with k rows per batch row (video frames),
    since ONNX Runtime holds every axis of one name to one size."""
    name = f"{contract.name}_batch"
    return {n: {0: name + (f"_x{contract.per_row[n]}" if n in contract.per_row else "")} for n in contract.batched}


def _export(contract: Contract, path: Path, opset: int, exporter: str, large: bool) -> None:
    args = tuple(contract.inputs.values())
    names = dict(input_names=list(contract.inputs), output_names=list(contract.outputs), opset_version=opset)
    if exporter == "torchscript":  # past 2 GB it writes one file per weight beside `path`: a private folder
        torch.onnx.export(contract.module, args, str(path), **names, dynamo=False, dynamic_axes=_dynamic_axes(contract))
    else:
        torch.onnx.export(
            contract.module, args, str(path), **names, dynamo=True, dynamic_shapes=_dynamic_shapes(contract),
            external_data=large, verbose=False,
        )  # fmt: skip


def export_onnx(contract: Contract, path: str | os.PathLike, opset: int = OPSET, exporter: str = "torchscript") -> Path:
    """Export ``contract`` to ``path`` with ``exporter`` (:data:`EXPORTERS`), clean the graph up and check it.
    The exporter writes into a private folder; ``path`` (and ``path.data`` past 2 GB) appear only when done."""
    onnx = _needs("onnx")
    check_exporter(exporter)
    if exporter == "dynamo":
        _needs("onnxscript")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = [*contract.module.parameters(), *contract.module.buffers()]  # buffers too: SD3's position table
    large = sum(t.numel() * t.element_size() for t in weights) > LARGE_BYTES
    log = io.StringIO()  # the exporters narrate their stages on stdout: keep it for the error message only
    work = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=path.parent))
    try:
        raw = work / path.name
        try:
            with (
                torch.no_grad(),
                fp32_normalization(),
                decomposed_rms_norm(),
                contextlib.redirect_stdout(log),
                warnings.catch_warnings(),
                hushed("torch.onnx", "onnxscript", "onnx_ir"),  # notes on torchvision ops it skips, per export
            ):
                warnings.simplefilter("ignore")  # the tracer's "legacy exporter" note and its tracing warnings
                _export(contract, raw, opset, exporter, large)
        except Exception as exc:
            raise EngineError(
                f"exporting {contract.name} to ONNX ({exporter} exporter) failed ({type(exc).__name__}: "
                f"{str(exc)[-600:]}); exporter log:\n{log.getvalue()[-2000:]}"
            ) from exc
        exported = sum(f.stat().st_size for f in work.iterdir() if f.is_file())
        cleanup_onnx(raw, large or exported > LARGE_BYTES, path)  # the graph as written decides too
    finally:
        shutil.rmtree(work, ignore_errors=True)
    onnx.checker.check_model(str(path))
    return path


@contextlib.contextmanager
def _ort_errors_only():
    """Constant folding runs the graph in ONNX Runtime, whose optimiser notes every Unsqueeze it cannot remove:
    errors only while folding (unless verbose), then ONNX Runtime's default severity (warning) again."""
    import onnxruntime

    from ..console import verbose

    if verbose():
        yield
        return
    onnxruntime.set_default_logger_severity(3)
    try:
        yield
    finally:
        onnxruntime.set_default_logger_severity(2)


def cleanup_onnx(path: Path, large: bool, out: Path | None = None) -> None:
    """graphsurgeon cleanup + toposort, polygraphy constant folding and shape inference, saved to ``out`` (default:
    in place), past 2 GB with its weights in one ``<name>.data`` file beside it."""
    onnx = _needs("onnx")
    gs = _needs("onnx_graphsurgeon")
    from polygraphy.backend.onnx import fold_constants, infer_shapes
    from polygraphy.logger import G_LOGGER

    model = onnx.load(str(path), load_external_data=True)
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    if not large:  # folding materialises every constant in memory: the demo skips it for >2 GB graphs too
        with G_LOGGER.verbosity(G_LOGGER.ERROR), _ort_errors_only():
            model = fold_constants(model, error_ok=True)
            model = infer_shapes(model, error_ok=True)
    out = out or path
    for stale in out.parent.glob(out.name + "*"):
        stale.unlink()
    if large:
        onnx.save_model(
            model, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=out.name + ".data"
        )
    else:
        onnx.save_model(model, str(out))
