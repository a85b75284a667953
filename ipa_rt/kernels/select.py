"""Which cross-attention layers run the fused kernel, decided once when a pipeline is built (never per call).

For every distinct layer shape, :func:`choose_layers` compiles and runs the kernel on small random inputs against the
documented reference, with the pipeline's real segment count and without segments (text-only calls), so the
variants requests use are compiled here; on CUDA it also tunes. A layer whose kernel fails falls back to SDPA with
one warning: an optimisation never fails a user's call (docs/design.md, "The fused Triton kernel").
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import decoupled_kernel as k

FP32_FLOOR = 2e-5  # relative to max|ref|: fp32 summation-order differences between kernel and SDPA
TUNE_SWITCH = "IPA_RT_TUNE"  # set to 0 to skip tuning at pipeline build (the defaults are used)


@dataclass(frozen=True)
class LayerShape:
    """One cross-attention layer as the kernel sees it at the pipeline's default size."""

    head_dim: int
    heads: int
    queries: int
    text_tokens: int
    segments: tuple[int, ...]  # image tokens per adapter segment


def reference_error(out: Tensor, inputs: tuple, bounds: list[int]) -> tuple[float, float]:
    """``(error, tolerance)`` of a kernel output against the reference: within twice PyTorch's own error in the
    inputs' dtype (flash-attention's rule) plus an fp32 floor. NaN never passes."""
    from .reference import decoupled_attention_reference

    q, k_text, v_text, k_img, v_img, _, _, scales = inputs[:8]

    def ref(dtype):
        kv = [(k_img[:, :, s:e].to(dtype), v_img[:, :, s:e].to(dtype)) for s, e in itertools.pairwise(bounds)]
        return decoupled_attention_reference(q.to(dtype), k_text.to(dtype), v_text.to(dtype), kv, scales.float())

    ref32, own = ref(torch.float32), ref(q.dtype).float()
    if not torch.isfinite(out).all():
        return float("inf"), 0.0
    err = (out.float() - ref32).abs().max().item()
    tol = 2 * (own - ref32).abs().max().item() + FP32_FLOOR * ref32.abs().max().item()
    return err, tol


def random_inputs(shape: LayerShape, batch: int, dtype: torch.dtype, device, queries: int | None = None, seed=0):
    """Processor-shaped random inputs for one layer: ``(args for launch, segment bounds)``."""
    g = torch.Generator().manual_seed(seed)
    b, h, n, d = batch, shape.heads, queries or shape.queries, shape.head_dim

    def r(*s):
        return torch.randn(*s, generator=g).to(device, dtype)

    q = r(b, n, h, d).transpose(1, 2)
    k_text, v_text = r(b, shape.text_tokens, h, d).transpose(1, 2), r(b, shape.text_tokens, h, d).transpose(1, 2)
    total = sum(shape.segments)
    k_img, v_img = r(b, h, total, d), r(b, h, total, d)
    bounds = [0, *itertools.accumulate(shape.segments)]
    offsets = torch.tensor(bounds, dtype=torch.int32, device=device)
    adapters = torch.arange(len(shape.segments), dtype=torch.int32, device=device)
    scales = (torch.rand(len(shape.segments), generator=g) + 0.5).to(device)
    return (q, k_text, v_text, k_img, v_img, offsets, adapters, scales, None), bounds


def self_test(shape: LayerShape, dtype: torch.dtype, device: torch.device) -> str | None:
    """``None`` if the kernel compiles, runs and matches the reference for this layer shape (with its segments and
    without), else the reason. Small query counts keep it quick (and cheap under the interpreter)."""
    for segments in (shape.segments, ()):
        probe = LayerShape(shape.head_dim, min(shape.heads, 2), shape.queries, shape.text_tokens, segments)
        inputs, bounds = random_inputs(probe, 1, dtype, device, queries=min(shape.queries, 48))
        try:
            out = k.launch(*inputs)
        except Exception as exc:  # compile (Triton, ptxas) or launch failure
            return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        err, tol = reference_error(out, inputs, bounds)
        if not err <= tol:
            return f"output differs from the reference (max error {err:.3e} > tolerance {tol:.3e})"
    return None


def choose_layers(
    attention: str, device: torch.device, dtype: torch.dtype, layers: Sequence[LayerShape]
) -> tuple[list[bool], dict[int, str]]:
    """Per layer: fused kernel (``True``) or SDPA, plus the reason for every head dim that fell back.

    ``attention``: ``"sdpa"`` (never fused), ``"auto"`` (fused on CUDA in fp16/bf16, where the kernel can run and
    passes its self-test; fp32 keeps SDPA, which is faster there) or ``"triton"`` (fused wherever it can run;
    raises :class:`~ipa_rt.errors.ConfigError` where it cannot, e.g. a CPU without ``TRITON_INTERPRET=1``)."""
    from ..errors import ConfigError

    if attention == "sdpa" or not layers:
        return [False] * len(layers), {}
    reasons = {s.head_dim: k.kernel_supports(device, dtype, s.head_dim) for s in layers}
    if attention == "auto":
        if device.type != "cuda" or dtype == torch.float32:
            return [False] * len(layers), {}
        blocked = {d: r for d, r in reasons.items() if r is not None}
    else:
        bad = next((r for r in reasons.values() if r is not None), None)
        if bad is not None and "disabled by" in bad:
            warnings.warn(f"attention='triton' falls back to SDPA: {bad}", stacklevel=4)
            return [False] * len(layers), {}
        if bad is not None:
            raise ConfigError(
                f"attention='triton' cannot run here: {bad}; expected a CUDA device, or TRITON_INTERPRET=1"
            )
        blocked = {}
    from . import ops  # noqa: F401  (registers torch.ops.ipa_rt.decoupled_attention)

    tested: dict[tuple, str | None] = {}
    for s in layers:
        if s.head_dim in blocked:
            continue
        key = (s.head_dim, s.segments)
        if key not in tested:
            tested[key] = self_test(s, dtype, device)
        if tested[key] is not None:
            blocked[s.head_dim] = tested[key]
    for d, reason in sorted(blocked.items()):
        if reasons.get(d) is None:  # a real failure, not merely "cannot run here"
            count = sum(s.head_dim == d for s in layers)
            warnings.warn(
                f"fused attention falls back to SDPA for the {count} layer(s) of head dim {d}: {reason}", stacklevel=4
            )
    fused = [s.head_dim not in blocked for s in layers]
    if device.type == "cuda" and not k.interpreting() and any(fused) and os.environ.get(TUNE_SWITCH, "1") != "0":
        tune_layers([s for s, f in zip(layers, fused, strict=True) if f], dtype, device)
    return fused, blocked


def tune_layers(layers: Sequence[LayerShape], dtype: torch.dtype, device: torch.device) -> None:
    """Tune each distinct layer shape at batch 2 (guidance) and 1, once per GPU (results kept on disk); a
    configuration is only eligible if its output matches the reference."""
    from .tuning import tune

    problems, seen = [], set()
    for s in layers:
        for batch in (2, 1):
            inputs, bounds = random_inputs(s, batch, dtype, device)
            key = k.shape_key(inputs[0], inputs[1], inputs[3], None)
            if key in seen:
                continue
            seen.add(key)

            def accept(out: Tensor, inputs=inputs, bounds=bounds) -> bool:
                err, tol = reference_error(out, inputs, bounds)
                return err <= tol

            problems.append((key, lambda inputs=inputs: inputs, accept))
    tune(problems)
