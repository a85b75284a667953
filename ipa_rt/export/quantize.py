"""int8 compute for OpenVINO engines: NNCF post-training quantisation of activations and weights.

``precision="int8"`` quantises the UNet's and the CLIP image encoder's convolutions and linear layers (symmetric
int8, for the CPU's VNNI / AMX-INT8 units) with ranges measured on :mod:`.calibration` inputs, then NNCF's fast bias
correction; attention score products (activation x activation) are quantised where NNCF's transformer scheme does.
What stays in floating point, and why: docs/guides/cpu.md (int8 compute); in the image encoder, the patch embedding
(its input is the image itself) and the final projection (what base adapters read).
"""

from __future__ import annotations

import contextlib
import io
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

from ..console import hushed, verbose
from ..errors import ConfigError

KEEP = {  # per network, regular expressions over the exported graph's node names: the layers listed above
    "unet": (r".*/conv_in/.*", r".*/conv_out/.*", r".*time_embedding/.*", r".*/time_emb_proj/.*", r".*to_[kv]_ip.*"),
    "image_encoder": (r".*patch_embedding.*", r".*visual_projection.*"),
}
QUANTIZED = tuple(KEEP)  # the networks an int8 build quantises
COMPUTE = ("MatMul", "Convolution")


def nncf():
    try:
        import nncf
    except ImportError as exc:
        raise ConfigError("precision 'int8' needs NNCF: pip install 'ipa_rt[openvino]'") from exc
    return nncf


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """NNCF logs a line per layer it leaves alone and draws progress bars and tables on stdout: the build's progress
    line says what runs instead (-v / IPA_RT_VERBOSE=1 shows NNCF's own output)."""
    bars = contextlib.nullcontext() if verbose() else contextlib.redirect_stdout(io.StringIO())
    with hushed("nncf"), bars:
        yield


def compress_weights(model: Any) -> Any:
    """``int8-weights``: the model's weights stored in int8 (asymmetric, per output channel), arithmetic unchanged."""
    lib = nncf()
    with quiet():
        return lib.compress_weights(model, mode=lib.CompressWeightsMode.INT8_ASYM)


def quantize_network(model: Any, network: str, feeds: list[dict], overflow_fix: bool = False) -> Any:
    """``network``'s OpenVINO ``model`` with int8 activations and weights, ranges from ``feeds``. ``overflow_fix``:
    every weight to half the int8 range, for CPUs without VNNI/AMX, whose int8 kernels sum u8 x s8 pairs in
    saturating 16-bit lanes (:func:`ipa_rt.cpu.int8_saturates`); else NNCF's default (the first layer only)."""
    lib = nncf()
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
    )

    # SmoothQuant off: it rescales activations into the weights of transformer LLM layers; on a UNet it moved
    # error into the convolutions (optimum-intel's diffusion recipe turns it off too)
    advanced = AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1),
        overflow_fix=OverflowFix.ENABLE if overflow_fix else OverflowFix.FIRST_LAYER,
    )
    with quiet():
        return lib.quantize(
            model,
            lib.Dataset(feeds),
            model_type=lib.ModelType.TRANSFORMER,
            subset_size=len(feeds),
            ignored_scope=lib.IgnoredScope(patterns=list(KEEP[network]), validate=False),
            advanced_parameters=advanced,
        )


def _family(name: str) -> str:
    """``/unet/up_blocks.1/resnets.2/conv1/Conv/WithoutBiases`` -> ``resnets.N/conv1``: layers by kind."""
    parts = [p for p in name.split("/") if p and p != "unet"][-3:-1] or [name]
    return re.sub(r"\d+", "N", "/".join(parts))


def precision_report(model: Any) -> dict[str, Any]:
    """Which matmuls and convolutions of a quantised model compute in int8 (an input through FakeQuantize) and
    which stay in floating point, counted by layer kind: what the manifest records."""
    int8, kept = Counter(), Counter()
    for op in model.get_ops():
        if op.get_type_name() not in COMPUTE:
            continue
        sources = {i.get_source_output().get_node().get_type_name() for i in op.inputs()}
        (int8 if "FakeQuantize" in sources else kept)[_family(op.get_friendly_name())] += 1
    return {
        "method": "nncf.quantize (post-training, int8 activations and weights, fast bias correction)",
        "int8_layers": sum(int8.values()),
        "float_layers": sum(kept.values()),
        "float_layer_kinds": dict(sorted(kept.items())),
    }


def quantize_matmul(model: Any, data: Any) -> Any:
    """A one-matmul model quantised as the UNet's layers are (the benchmark's int8 peak)."""
    lib = nncf()
    with quiet():
        return lib.quantize(model, lib.Dataset([data]), subset_size=1, fast_bias_correction=False)
