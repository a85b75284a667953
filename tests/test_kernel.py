"""The fused Triton kernel against the one reference (CPU: Triton interpreter; CUDA: the real kernel).

Tolerances follow flash-attention's tests: the kernel's error against an fp32 reference must stay within
twice PyTorch's own error when it computes the same reference in the kernel's dtype, plus a floor for
fp32 (where PyTorch's own error is ~0 and only summation order differs). NaN never passes.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from ipa_rt.kernels import decoupled_attention, fused_available
from ipa_rt.kernels import decoupled_kernel as kmod
from ipa_rt.kernels.reference import decoupled_attention_reference
from ipa_rt.kernels.tuning import candidates

_WHY_NOT = fused_available(torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.float32, 64)
pytestmark = pytest.mark.skipif(
    _WHY_NOT is not None,
    reason=f"the Triton kernel cannot run here: {_WHY_NOT}",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_FLOOR = 2e-5  # relative to max|ref|: fp32 accumulation-order differences between kernel and SDPA


def make(b, h, n, d, text, segments, dtype, seed, q_transposed=True):
    """Fresh random inputs; q laid out as the processor makes it (a transposed [B, N, H, d] view)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    q = r(b, n, h, d).transpose(1, 2) if q_transposed else r(b, h, n, d)
    k_text, v_text = r(b, h, text, d), r(b, h, text, d)
    total = sum(segments)
    k_img, v_img = r(b, h, total, d), r(b, h, total, d)
    bounds = [0]
    for t in segments:
        bounds.append(bounds[-1] + t)
    offsets = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    adapters = torch.arange(len(segments), dtype=torch.int32, device=DEVICE)
    scales = (torch.rand(len(segments), generator=g) * 1.5 + 0.25).to(DEVICE)
    return q, k_text, v_text, k_img, v_img, offsets, adapters, scales, bounds


def reference(q, k_text, v_text, k_img, v_img, bounds, scales, masks=None, dtype=None):
    """The documented reference, run in ``dtype`` (fp32 = the "exact" oracle)."""
    dtype = dtype or q.dtype
    kv = [(k_img[:, :, s:e].to(dtype), v_img[:, :, s:e].to(dtype)) for s, e in itertools.pairwise(bounds)]
    return decoupled_attention_reference(
        q.to(dtype), k_text.to(dtype), v_text.to(dtype), kv, scales.to(torch.float32), masks=masks
    )


def run_kernel(q, k_text, v_text, k_img, v_img, offsets, adapters, scales, mask=None, config=None):
    b, h, n, d = q.shape
    out = torch.full((b, n, h * d), float("nan"), device=q.device, dtype=q.dtype)  # poisoned: all must be written
    return kmod.launch(q, k_text, v_text, k_img, v_img, offsets, adapters, scales, mask, out=out, config=config)


def check(out, q, k_text, v_text, k_img, v_img, bounds, scales, masks=None):
    assert not torch.isnan(out).any(), "NaN in kernel output"
    ref32 = reference(q, k_text, v_text, k_img, v_img, bounds, scales, masks, dtype=torch.float32)
    ref_lp = reference(q, k_text, v_text, k_img, v_img, bounds, scales, masks, dtype=q.dtype).float()
    err = (out.float() - ref32).abs().max().item()
    own = (ref_lp - ref32).abs().max().item()
    tol = 2 * own + FP32_FLOOR * ref32.abs().max().item()
    assert err <= tol, f"kernel error {err:.3e} > {tol:.3e} (PyTorch's own {q.dtype} error {own:.3e})"


SHAPES = [  # (head dim, query tokens, text tokens, image segments)
    (40, 64, 77, [4]),
    (80, 63, 77, [16]),
    (160, 77, 77, [257]),
    (64, 200, 154, [4, 16]),
    (40, 96, 231, [4, 16, 257, 4]),
    (80, 33, 77, [8]),  # one adapter, two images of 4 tokens each: one segment
    pytest.param(64, 4096, 77, [16, 4], marks=pytest.mark.slow),  # 4096 queries: seconds in the interpreter
    (120, 50, 77, [4, 4]),  # a tail tile with padding (64 + 56 -> 64 + 64)
]
# narrow set for local debugging: SHAPES = [(40, 64, 77, [4])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("d", "n", "text", "segments"), SHAPES)
def test_kernel_matches_reference(d, n, text, segments, dtype):
    seed = d * 1000 + n + len(segments)
    args = make(2, 2, n, d, text, segments, dtype, seed)
    q, k_text, v_text, k_img, v_img, offsets, adapters, scales, bounds = args
    out = run_kernel(q, k_text, v_text, k_img, v_img, offsets, adapters, scales)
    check(out, q, k_text, v_text, k_img, v_img, bounds, scales)


# the infinite image values make the interpreter's NumPy compute 0 * inf inside the branch the scale-0 select
# discards: that is what this test provokes, and the assert checks nothing of it leaks
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_scale_is_exactly_text_only(dtype):
    q, k_text, v_text, k_img, v_img, offsets, adapters, scales, _ = make(2, 2, 50, 64, 77, [4, 16], dtype, 7)
    v_img = torch.full_like(v_img, float("inf"))  # an overflowing image branch must not leak NaN
    zero = torch.zeros_like(scales)
    # one pinned launch configuration: the two calls have different shape keys, which may be tuned differently,
    # and a different block size changes the text softmax's summation order
    pinned = candidates(str(dtype).removeprefix("torch."), 64)[0]
    out = run_kernel(q, k_text, v_text, k_img, v_img, offsets, adapters, zero, config=pinned)
    no_seg = torch.zeros(1, dtype=torch.int32, device=DEVICE), torch.zeros(0, dtype=torch.int32, device=DEVICE)
    text_only = run_kernel(q, k_text, v_text, k_img[:, :, :0], v_img[:, :, :0], *no_seg, zero, config=pinned)
    assert torch.equal(out, text_only)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masks(dtype):
    """Per-query masks per segment, with bicubic-like values outside [0, 1] and exact zeros."""
    q, k_text, v_text, k_img, v_img, offsets, adapters, scales, bounds = make(2, 2, 64, 40, 77, [4, 16], dtype, 3)
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(2, 2, 64, generator=g) * 1.4 - 0.2).to(DEVICE)
    mask[0, :, :10] = 0
    out = run_kernel(q, k_text, v_text, k_img, v_img, offsets, adapters, scales, mask)
    check(out, q, k_text, v_text, k_img, v_img, bounds, scales, masks=[mask[0], mask[1]])


def test_scale_is_read_from_a_strided_device_view():
    """The kernel reads scales through the [adapters, layers] tensor's column view: a write is seen at once."""
    q, k_text, v_text, k_img, v_img, offsets, adapters, _, bounds = make(1, 2, 32, 64, 77, [4, 16], torch.float32, 9)
    table = torch.tensor([[0.1, 0.7, 0.3], [0.2, 1.1, 0.4]], device=DEVICE)
    column = table[:, 1]
    first = run_kernel(q, k_text, v_text, k_img, v_img, offsets, adapters, column)
    check(first, q, k_text, v_text, k_img, v_img, bounds, column.clone())
    table[:, 1] = torch.tensor([1.5, 0.0])
    second = run_kernel(q, k_text, v_text, k_img, v_img, offsets, adapters, column)
    check(second, q, k_text, v_text, k_img, v_img, bounds, torch.tensor([1.5, 0.0], device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_row_scales_weigh_each_batch_row(dtype):
    """A batched call's ``[rows, adapters, layers]`` table, read through its ``[rows, adapters]`` layer view: every
    row its own weights, and a zero row is exactly what a text-only row gives."""
    q, k_text, v_text, k_img, v_img, offsets, adapters, _, bounds = make(3, 2, 40, 80, 77, [4, 16], dtype, 11)
    table = torch.tensor([[[0.2, 0.9], [1.3, 0.5]], [[0.0, 0.0], [0.0, 0.0]], [[0.7, 0.1], [0.0, 1.2]]])
    per_row = table.to(DEVICE)[..., 1]  # [rows, adapters], strided
    pinned = candidates(str(dtype).removeprefix("torch."), 80)[0]
    out = run_kernel(q, k_text, v_text, k_img, v_img, offsets, adapters, per_row, config=pinned)
    check(out, q, k_text, v_text, k_img, v_img, bounds, per_row.clone())
    no_seg = torch.zeros(1, dtype=torch.int32, device=DEVICE), torch.zeros(0, dtype=torch.int32, device=DEVICE)
    text_only = run_kernel(q, k_text, v_text, k_img[:, :, :0], v_img[:, :, :0], *no_seg, per_row, config=pinned)
    assert torch.equal(out[1], text_only[1])
    for row in (0, 2):  # each row as if it were alone with its own scales
        alone = run_kernel(*(x[row : row + 1] for x in (q, k_text, v_text, k_img, v_img)), offsets, adapters,
                           per_row[row], config=pinned)  # fmt: skip
        assert torch.equal(out[row : row + 1], alone)


def test_custom_op_has_fake_impl_and_traces():
    """opcheck covers schema, fake (meta) impl and dispatch; torch.export keeps the op as one node."""
    args = make(1, 2, 16, 40, 77, [4], torch.float32, 5)[:8]
    torch.library.opcheck(decoupled_attention, (*args, None), test_utils=("test_schema", "test_faketensor"))

    class One(torch.nn.Module):
        def forward(self, *a):
            return torch.ops.ipa_rt.decoupled_attention(*a, None)

    exported = torch.export.export(One(), tuple(args))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert "ipa_rt.decoupled_attention.default" in targets


def test_head_dim_split_wastes_no_tensor_core_work_at_sd_dims():
    assert kmod.split_head_dim(40) == (32, 16)  # 17% padding instead of 37.5% (one tile of 64)
    assert kmod.split_head_dim(64) == (64, 0)
    assert kmod.split_head_dim(80) == (64, 16)
    assert kmod.split_head_dim(160) == (128, 32)
    assert kmod.split_head_dim(120) == (64, 64)
    assert kmod.split_head_dim(8) == (16, 0)  # tl.dot's minimum tile


def test_tuned_configs_are_looked_up_by_bucketed_shape_key(monkeypatch):
    """A request only looks its configuration up (tuned at build, else the head dim's default): query length, B·H
    and token counts are bucketed to powers of two, so nearby sizes share one tuned entry."""
    from ipa_rt.kernels import configs, tuning

    q = torch.empty(2, 8, 4000, 40).transpose(1, 2).transpose(1, 2)
    key = kmod.shape_key(q, torch.empty(2, 8, 77, 40), torch.empty(2, 8, 20, 40), None)
    assert key == ("float32", 40, 4096, 16, 128, 32, False)
    near = kmod.shape_key(torch.empty(2, 8, 3000, 40), torch.empty(2, 8, 77, 40), torch.empty(2, 8, 17, 40), None)
    assert near == key
    assert tuning.config_for(key) == tuning.candidates("float32", 40)[0]
    chosen = tuning.candidates("float32", 40)[1]
    monkeypatch.setitem(configs._TUNED, key, chosen)  # the table the kernel reads
    assert tuning.config_for(near) == chosen


def test_tuning_picks_the_fastest_correct_candidate_once(monkeypatch, tmp_path):
    """Tuning (CUDA at pipeline build) with its timer and GPU name stubbed, the kernel run for real: a candidate
    whose output is rejected is never timed nor chosen, the fastest accepted one is, the choice is kept on disk, and
    a second tuning of the same key runs nothing."""
    import triton.testing

    from ipa_rt.kernels import configs, tuning

    monkeypatch.setenv("IPA_RT_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "_machine", lambda: "test GPU|sm_90|triton x")
    monkeypatch.setattr(configs, "_TUNED", {})
    pool = tuning.candidates("float16", 40)
    assert len(pool) == 4
    checked, timed = [], []
    times = iter([3.0, 1.0, 2.0])  # for the three accepted candidates, in order

    def fake_bench(fn, warmup, rep):
        fn()
        timed.append(fn)
        return next(times)

    def accept(out):  # the second candidate's output "mismatches the reference"
        checked.append(out)
        return len(checked) != 2

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    args = (*make(1, 2, 16, 40, 77, [4], torch.float16, 1)[:8], None)
    key = kmod.shape_key(args[0], args[1], args[3], None)
    chosen = tuning.tune([(key, lambda: args, accept)])
    assert len(checked) == 4 and len(timed) == 3
    assert chosen[key] == pool[2] and tuning.config_for(key) == pool[2]  # fastest accepted; pool[1] never timed
    timed.clear()
    assert tuning.tune([(key, lambda: args, accept)])[key] == pool[2] and not timed  # from disk
    assert json.loads(tuning.cache_file().read_text())["test GPU|sm_90|triton x"]
