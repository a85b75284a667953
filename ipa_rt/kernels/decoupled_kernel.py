"""Fused decoupled cross-attention: text and every adapter's image tokens in one Triton pass.

Each program loads a block of queries once, keeps one online-softmax state (running max, running sum, accumulator)
per key segment (the text, then each image segment: segments never share a softmax), folds each finished segment
into an fp32 output accumulator with its weight, and writes the output once, in the ``[B, N, H·d]`` layout that
``to_out`` reads. Weights come from a strided view of the device scale tensor; a zero weight selects exact zeros
(``where``; docs/design.md, "The fused Triton kernel": the math, and why no recompilation, host sync or NaN).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from .configs import KernelConfig, config_for, split_head_dim

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None
    HAVE_TRITON = False

KILL_SWITCH = "IPA_RT_DISABLE_TRITON"  # set to 1 to force the SDPA path everywhere
MAX_HEAD_DIM = 256


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_supports(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """``None`` if the kernel can run these inputs, else the reason it cannot (for the guarded fallback)."""
    if os.environ.get(KILL_SWITCH, "0") == "1":
        return f"disabled by {KILL_SWITCH}=1"
    if not HAVE_TRITON:
        return "triton is not installed"
    if device.type != "cuda" and not interpreting():
        return f"device {device.type} needs TRITON_INTERPRET=1 (the Triton interpreter) to run the kernel"
    if device.type != "cuda" and (problem := interpreter_problem()) is not None:
        return problem
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not supported"
    if head_dim > MAX_HEAD_DIM or head_dim < 1:
        return f"head dim {head_dim} is outside 1..{MAX_HEAD_DIM}"
    return None


@functools.cache
def interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run the kernel, else ``None``. Triton 3.6's interpreter turns a scalar
    argument into a one-element array, and NumPy >= 2.4 refuses to make a loop bound of one: the kernel's loops
    over key blocks then raise. Probed once by a three-iteration loop to a runtime bound."""
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _probe_loop[(1,)](out, 3)
    except Exception as exc:
        import numpy

        return (
            f"the Triton {triton.__version__} interpreter cannot loop to a runtime bound with NumPy "
            f"{numpy.__version__} ({type(exc).__name__}); numpy<2.4 or a newer triton runs it"
        )
    return None if out.item() == 3 else "the Triton interpreter miscounted a loop (probe)"


if HAVE_TRITON:

    @triton.jit
    def _probe_loop(OUT, n):
        acc = 0
        for _ in range(0, n, 1):
            acc += 1
        tl.store(OUT, acc)

    @triton.jit
    def _mm(a, b, IEEE: tl.constexpr):
        """``a @ b`` with fp32 accumulation; IEEE: exact fp32 products (no TF32), operands upcast first."""
        if IEEE:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _segment(
        q0, q1, k_base, v_base, stride_kn, start, end, offs_n, offs_d0, offs_d1, HEAD_DIM, qk_scale,
        D0: tl.constexpr, TAIL: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Online softmax over keys ``[start, end)`` of one segment; the head dim in two tiles (``q0``: dims
        ``[0, D0)``, ``q1``: ``[D0, D0 + D1)`` when ``TAIL``). Returns the unnormalised accumulators and row sums."""
        BLOCK_M: tl.constexpr = q0.shape[0]
        BLOCK_N: tl.constexpr = offs_n.shape[0]
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc0 = tl.zeros([BLOCK_M, q0.shape[1]], tl.float32)
        acc1 = tl.zeros([BLOCK_M, q1.shape[1]], tl.float32)
        d0_ok = offs_d0[None, :] < HEAD_DIM
        d1_ok = (D0 + offs_d1[None, :]) < HEAD_DIM
        for n0 in range(start, end, BLOCK_N):
            keys = n0 + offs_n
            k_ok = keys[:, None] < end
            ptr0 = keys[:, None] * stride_kn + offs_d0[None, :]
            ptr1 = keys[:, None] * stride_kn + D0 + offs_d1[None, :]
            k0 = tl.load(k_base + ptr0, mask=k_ok & d0_ok, other=0.0)
            qk = _mm(q0, tl.trans(k0), IEEE)
            if TAIL:
                k1 = tl.load(k_base + ptr1, mask=k_ok & d1_ok, other=0.0)
                qk += _mm(q1, tl.trans(k1), IEEE)
            qk = tl.where((keys < end)[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v0 = tl.load(v_base + ptr0, mask=k_ok & d0_ok, other=0.0)
            acc0 = acc0 * alpha[:, None] + _mm(p.to(v0.dtype), v0, IEEE)
            if TAIL:
                v1 = tl.load(v_base + ptr1, mask=k_ok & d1_ok, other=0.0)
                acc1 = acc1 * alpha[:, None] + _mm(p.to(v1.dtype), v1, IEEE)
            m_i = m_new
        return acc0, acc1, l_i

    @triton.jit
    def decoupled_fwd(
        Q, KT, VT, KI, VI, OUT, SEG_OFF, SEG_ADAPTER, SCALE, MASK,
        stride_qb, stride_qh, stride_qn, stride_tb, stride_th, stride_tn, stride_ib, stride_ih, stride_in,
        stride_ob, stride_on, stride_sb, stride_scale, stride_ms, stride_mb,
        N, L_TEXT, H, qk_scale,
        HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, NUM_SEG: tl.constexpr, HAS_MASK: tl.constexpr,
        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        TAIL: tl.constexpr = D1 > 0
        D1_T: tl.constexpr = D1 if D1 > 0 else 16  # a tile that exists even without a tail (never loaded then)
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d0 = tl.arange(0, D0)
        offs_d1 = tl.arange(0, D1_T)
        m_ok = offs_m[:, None] < N
        d0_ok = offs_d0[None, :] < HEAD_DIM
        d1_ok = (D0 + offs_d1[None, :]) < HEAD_DIM
        q_row = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn
        q0 = tl.load(q_row + offs_d0[None, :], mask=m_ok & d0_ok, other=0.0)
        q1 = tl.zeros([BLOCK_M, D1_T], q0.dtype)
        if TAIL:
            q1 = tl.load(q_row + D0 + offs_d1[None, :], mask=m_ok & d1_ok, other=0.0)

        # text segment: weight 1, its own softmax
        kt = KT + b * stride_tb + h * stride_th
        vt = VT + b * stride_tb + h * stride_th
        acc0, acc1, l_i = _segment(
            q0, q1, kt, vt, stride_tn, 0, L_TEXT, offs_n, offs_d0, offs_d1, HEAD_DIM, qk_scale, D0, TAIL, IEEE
        )
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out0 = acc0 / l_safe
        out1 = acc1 / l_safe

        # image segments: each its own softmax, weighted by its adapter's scale (and mask)
        ki = KI + b * stride_ib + h * stride_ih
        vi = VI + b * stride_ib + h * stride_ih
        for s in range(NUM_SEG):  # a loop, not unrolled: one segment's registers, whatever the count
            start = tl.load(SEG_OFF + s)
            end = tl.load(SEG_OFF + s + 1)
            w = tl.load(SCALE + b * stride_sb + tl.load(SEG_ADAPTER + s) * stride_scale).to(tl.float32)
            acc0, acc1, l_i = _segment(
                q0, q1, ki, vi, stride_in, start, end, offs_n, offs_d0, offs_d1, HEAD_DIM, qk_scale, D0, TAIL, IEEE
            )
            wq = tl.zeros([BLOCK_M], tl.float32) + w
            if HAS_MASK:
                wq = wq * tl.load(MASK + s * stride_ms + b * stride_mb + offs_m, mask=offs_m < N, other=0.0).to(
                    tl.float32
                )
            on = (wq != 0.0)[:, None]  # a zero weight selects exact zeros: an overflowing branch cannot leak NaN
            l_safe = tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            out0 += tl.where(on, acc0 / l_safe * wq[:, None], 0.0)
            if TAIL:
                out1 += tl.where(on, acc1 / l_safe * wq[:, None], 0.0)

        o_row = OUT + b * stride_ob + offs_m[:, None] * stride_on + h * HEAD_DIM
        tl.store(o_row + offs_d0[None, :], out0.to(OUT.dtype.element_ty), mask=m_ok & d0_ok)
        if TAIL:
            tl.store(o_row + D0 + offs_d1[None, :], out1.to(OUT.dtype.element_ty), mask=m_ok & d1_ok)


def kernel_args(
    q: Tensor,
    k_text: Tensor,
    v_text: Tensor,
    k_img: Tensor,
    v_img: Tensor,
    seg_offsets: Tensor,
    seg_adapter: Tensor,
    scales: Tensor,
    mask: Tensor | None,
    out: Tensor,
) -> tuple[tuple, dict]:
    """The kernel's runtime arguments and its compile-time constants for these inputs."""
    n, d = q.shape[2:]
    has_mask = mask is not None
    per_row = scales.ndim == 2 and scales.shape[0] > 1  # [B, S]: each batch row its own weights; else broadcast
    args = (
        q, k_text, v_text, k_img, v_img, out, seg_offsets, seg_adapter, scales,
        mask if has_mask else scales,  # any pointer: never read when HAS_MASK is False
        q.stride(0), q.stride(1), q.stride(2), k_text.stride(0), k_text.stride(1), k_text.stride(2),
        k_img.stride(0), k_img.stride(1), k_img.stride(2), out.stride(0), out.stride(1),
        scales.stride(0) if per_row else 0, scales.stride(-1),
        mask.stride(0) if has_mask else 0, mask.stride(1) if has_mask else 0,
        n, k_text.shape[2], q.shape[1],
        (d**-0.5) * 1.4426950408889634,  # 1/√d folded with log2(e) for exp2
    )  # fmt: skip
    d0, d1 = split_head_dim(d)
    # fp32 inputs keep fp32 products (no TF32) for diffusers parity; the interpreter (numpy) has no bf16 matmul,
    # so there bf16 operands are upcast too (values are unchanged: bf16 -> fp32 is exact).
    ieee = q.dtype == torch.float32 or (interpreting() and q.dtype == torch.bfloat16)
    meta = dict(HEAD_DIM=d, D0=d0, D1=d1, NUM_SEG=seg_adapter.numel(), HAS_MASK=has_mask, IEEE=ieee)
    return args, meta


def launch(
    q: Tensor,
    k_text: Tensor,
    v_text: Tensor,
    k_img: Tensor,
    v_img: Tensor,
    seg_offsets: Tensor,
    seg_adapter: Tensor,
    scales: Tensor,
    mask: Tensor | None,
    out: Tensor | None = None,
    config: KernelConfig | None = None,
) -> Tensor:
    """Run the kernel. Shapes: ``q [B,H,N,d]``, text K/V ``[B,H,L,d]``, image K/V ``[B,H,T,d]`` (segments laid
    end to end, boundaries in ``seg_offsets [S+1]`` int32, adapter of each in ``seg_adapter [S]`` int32),
    ``scales [A]`` or ``[B, A]`` (per batch row; any strides), ``mask [S,B,N]`` or None. Returns ``[B, N, H·d]``
    in ``q``'s dtype.

    ``config``: the launch configuration; by default the one tuned for this shape's key at pipeline build
    (:mod:`ipa_rt.kernels.tuning`), else the head dim's default. Nothing is tuned here, mid-request."""
    b, h, n, d = q.shape
    if out is None:
        out = torch.empty(b, n, h * d, device=q.device, dtype=q.dtype)
    for name, t in (("q", q), ("k_text", k_text), ("v_text", v_text), ("k_img", k_img), ("v_img", v_img)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride {t.stride(-1)})")
    if k_text.stride() != v_text.stride() or k_img.stride() != v_img.stride():
        raise ValueError("keys and values must share strides")
    args, meta = kernel_args(q, k_text, v_text, k_img, v_img, seg_offsets, seg_adapter, scales, mask, out)
    if interpreting() or q.device.type != "cuda":
        # the interpreter's cost is per program and per op, not per element: few, large blocks
        block_m = config.block_m if config is not None else min(128, _next_pow2(n))
        block_n = config.block_n if config is not None else 64
        decoupled_fwd[(triton.cdiv(n, block_m), b * h)](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n)
        return out
    if config is None:
        config = config_for(shape_key(q, k_text, k_img, mask))
    grid = (triton.cdiv(n, config.block_m), b * h)
    decoupled_fwd[grid](
        *args, **meta, BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.warps,
        num_stages=config.stages,
    )  # fmt: skip
    return out


def shape_key(q: Tensor, k_text: Tensor, k_img: Tensor, mask: Tensor | None) -> tuple:
    """What a tuned configuration is chosen by: dtype, head dim, and bucketed (powers of two) query length, B·H,
    text and image token counts; masks change the kernel, so they are part of it."""
    b, h, n, d = q.shape
    return (str(q.dtype).removeprefix("torch."), d, _bucket(n), _bucket(b * h), _bucket(k_text.shape[2]),
            _bucket(k_img.shape[2]), mask is not None)  # fmt: skip


def _next_pow2(x: int) -> int:
    return 1 << max(4, (x - 1).bit_length())  # tl.dot needs every dim >= 16


def _bucket(x: int) -> int:
    return 0 if x <= 0 else 1 << (x - 1).bit_length()
