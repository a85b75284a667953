"""Fused decoupled cross-attention: text and every adapter's image tokens in one Triton pass.

For one cross-attention layer (``d`` = head dim, ``s_a`` = adapter scales, ``M`` = optional per-query masks)::

    out = softmax(Q K_textᵀ/√d) V_text + Σ_seg s_{a(seg)} · M_seg ⊙ softmax(Q K_segᵀ/√d) V_seg

Each program loads a block of queries once, keeps one online-softmax state (running max, running sum,
accumulator) per key segment — the text, then each image segment — folds the finished segment into an
fp32 output accumulator with its weight, and writes the output once, already in the ``[B, N, H·d]`` layout
that ``to_out`` reads. Segments never share a softmax: that is IP-Adapter's decoupled attention.

Scales are read from a device tensor (a strided view of the ``[adapters, layers]`` scale tensor), so a
scale change needs no recompilation, no new launch configuration and no host sync. A zero weight selects
exact zeros (``where``), so an overflowing image branch cannot leak NaN.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

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


def disabled() -> bool:
    return os.environ.get(KILL_SWITCH, "0") == "1"


def kernel_supports(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """``None`` if the kernel can run these inputs, else the reason it cannot (for the guarded fallback)."""
    if disabled():
        return f"disabled by {KILL_SWITCH}=1"
    if not HAVE_TRITON:
        return "triton is not installed"
    if device.type != "cuda" and not interpreting():
        return f"device {device.type} needs TRITON_INTERPRET=1 (the Triton interpreter) to run the kernel"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not supported"
    if head_dim > MAX_HEAD_DIM or head_dim < 1:
        return f"head dim {head_dim} is outside 1..{MAX_HEAD_DIM}"
    return None


if HAVE_TRITON:

    @triton.jit
    def _mm(a, b, IEEE: tl.constexpr):
        """``a @ b`` with fp32 accumulation; IEEE: exact fp32 products (no TF32), operands upcast first."""
        if IEEE:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _segment(q, k_base, v_base, stride_kn, start, end, offs_n, offs_d, HEAD_DIM, qk_scale, IEEE: tl.constexpr):
        """Online softmax over keys ``[start, end)`` of one segment; returns (unnormalised acc, row sums)."""
        BLOCK_M: tl.constexpr = q.shape[0]
        D_PAD: tl.constexpr = q.shape[1]
        BLOCK_N: tl.constexpr = offs_n.shape[0]
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        d_ok = offs_d[None, :] < HEAD_DIM
        for n0 in range(start, end, BLOCK_N):
            keys = n0 + offs_n
            k_ok = keys < end
            ptr = keys[:, None] * stride_kn + offs_d[None, :]
            k = tl.load(k_base + ptr, mask=k_ok[:, None] & d_ok, other=0.0)
            v = tl.load(v_base + ptr, mask=k_ok[:, None] & d_ok, other=0.0)
            qk = _mm(q, tl.trans(k), IEEE)
            qk = tl.where(k_ok[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            pv = _mm(p.to(v.dtype), v, IEEE)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        return acc, l_i

    @triton.jit
    def _decoupled_fwd(
        Q,
        KT,
        VT,
        KI,
        VI,
        OUT,
        SEG_OFF,
        SEG_ADAPTER,
        SCALE,
        MASK,
        stride_qb,
        stride_qh,
        stride_qn,
        stride_tb,
        stride_th,
        stride_tn,
        stride_ib,
        stride_ih,
        stride_in,
        stride_ob,
        stride_on,
        stride_scale,
        stride_ms,
        stride_mb,
        N,
        L_TEXT,
        H,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        D_PAD: tl.constexpr,
        NUM_SEG: tl.constexpr,
        HAS_MASK: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D_PAD)
        m_ok = offs_m < N
        d_ok = offs_d < HEAD_DIM
        q_ptr = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
        q = tl.load(q_ptr, mask=m_ok[:, None] & d_ok[None, :], other=0.0)

        # text segment: weight 1, its own softmax
        kt = KT + b * stride_tb + h * stride_th
        vt = VT + b * stride_tb + h * stride_th
        acc, l_i = _segment(q, kt, vt, stride_tn, 0, L_TEXT, offs_n, offs_d, HEAD_DIM, qk_scale, IEEE)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]

        # image segments: each its own softmax, weighted by its adapter's scale (and mask)
        ki = KI + b * stride_ib + h * stride_ih
        vi = VI + b * stride_ib + h * stride_ih
        for s in tl.static_range(NUM_SEG):
            start = tl.load(SEG_OFF + s)
            end = tl.load(SEG_OFF + s + 1)
            w = tl.load(SCALE + tl.load(SEG_ADAPTER + s) * stride_scale).to(tl.float32)
            acc, l_i = _segment(q, ki, vi, stride_in, start, end, offs_n, offs_d, HEAD_DIM, qk_scale, IEEE)
            wq = tl.zeros([BLOCK_M], tl.float32) + w
            if HAS_MASK:
                wq = wq * tl.load(MASK + s * stride_ms + b * stride_mb + offs_m, mask=m_ok, other=0.0).to(tl.float32)
            seg = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            out += tl.where(wq[:, None] != 0.0, seg * wq[:, None], 0.0)

        o_ptr = OUT + b * stride_ob + offs_m[:, None] * stride_on + h * HEAD_DIM + offs_d[None, :]
        tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])

    # GPU: tuned per (shape, device), results persisted in Triton's cache dir; the interpreter uses one config.
    _AUTOTUNE_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm in (64, 128)
        for bn in (16, 32, 64)
        for w in (4, 8)
        for st in (2, 3)
    ]
    _decoupled_fwd_tuned = triton.autotune(
        configs=_AUTOTUNE_CONFIGS,
        key=["N", "L_TEXT", "HEAD_DIM", "NUM_SEG", "HAS_MASK"],
        cache_results=True,
    )(_decoupled_fwd)


def _next_pow2(x: int) -> int:
    return 1 << max(4, (x - 1).bit_length())  # tl.dot needs every dim >= 16


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
) -> Tensor:
    """Run the kernel. Shapes: ``q [B,H,N,d]``, text K/V ``[B,H,L,d]``, image K/V ``[B,H,T,d]`` (segments laid
    end to end, boundaries in ``seg_offsets [S+1]`` int32, adapter of each in ``seg_adapter [S]`` int32),
    ``scales [A]`` (any stride), ``mask [S,B,N]`` or None. Returns ``[B, N, H·d]`` in ``q``'s dtype."""
    b, h, n, d = q.shape
    if out is None:
        out = torch.empty(b, n, h * d, device=q.device, dtype=q.dtype)
    for name, t in (("q", q), ("k_text", k_text), ("v_text", v_text), ("k_img", k_img), ("v_img", v_img)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride {t.stride(-1)})")
    if k_text.stride() != v_text.stride() or k_img.stride() != v_img.stride():
        raise ValueError("keys and values must share strides")
    num_seg = seg_adapter.numel()
    has_mask = mask is not None
    mask_arg = mask if has_mask else scales  # any pointer: never read when HAS_MASK is False
    args = (
        q,
        k_text,
        v_text,
        k_img,
        v_img,
        out,
        seg_offsets,
        seg_adapter,
        scales,
        mask_arg,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_text.stride(0),
        k_text.stride(1),
        k_text.stride(2),
        k_img.stride(0),
        k_img.stride(1),
        k_img.stride(2),
        out.stride(0),
        out.stride(1),
        scales.stride(0),
        mask.stride(0) if has_mask else 0,
        mask.stride(1) if has_mask else 0,
        n,
        k_text.shape[2],
        h,
        (d**-0.5) * 1.4426950408889634,  # 1/√d folded with log2(e) for exp2
    )
    # fp32 inputs keep fp32 products (no TF32) for diffusers parity; the interpreter (numpy) has no bf16 matmul,
    # so there bf16 operands are upcast too (values are unchanged: bf16 -> fp32 is exact).
    ieee = q.dtype == torch.float32 or (interpreting() and q.dtype == torch.bfloat16)
    meta = dict(HEAD_DIM=d, D_PAD=_next_pow2(d), NUM_SEG=num_seg, HAS_MASK=has_mask, IEEE=ieee)
    if interpreting() or q.device.type != "cuda":
        # the interpreter's cost is per program and per op, not per element: few, large blocks
        block_m = min(128, _next_pow2(n))
        _decoupled_fwd[(triton.cdiv(n, block_m), b * h)](*args, **meta, BLOCK_M=block_m, BLOCK_N=64)
    else:
        grid = lambda cfg: (triton.cdiv(n, cfg["BLOCK_M"]), b * h)  # noqa: E731
        _decoupled_fwd_tuned[grid](*args, **meta)
    return out
