"""The Triton attention kernels' flash-attn features against mptkernels.reference (fp64):
sliding windows, softcap, non-causal ALiBi (-slope * |rel|), the gradient through lse (dlse),
varlen with all of them, and attention_with_kvcache with a window, softcap, cache_batch_idx,
cache_leftpad, paged caches, rotary and flash-decoding splits.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1), so shapes are small; several tests shrink the tile tables so that a
few dozen tokens still span many blocks and every edge of the window's block ranges runs.
"""
import contextlib

import numpy as np
import pytest
import torch

import mptkernels
from mptkernels import ops, reference
from conftest import HAS_CUDA, rel_err

ta = pytest.importorskip("mptkernels.triton.attention")
DEVICE = "cuda" if HAS_CUDA else "cpu"

# ||out - ref|| / ||ref|| against the fp64 reference, per dtype: fp32 (exact dots) is at its
# rounding; fp16 / bf16 round q, k, v (the reference sees the same rounded inputs) and P
# before P V, so their error is the rounding of P and of the output (2^-11, 2^-8 relative)
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
# gradients: dS = P * (dP - delta) loses more to the rounding of P, dO and dS
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# lse in natural-log units: fp32 scores of the rounded inputs (exact products), any dtype
LSE_ATOL = 1e-3


@pytest.fixture(autouse=True)
def bf16_interpreter(monkeypatch):
    """Make Triton 3.6's interpreter compute bf16 as the GPU does. It keeps bf16 tensors as
    uint16 (NumPy has no bf16): its tl.dot multiplies those integers, so widen bf16 operands
    to fp32 first (exact, and what the GPU's bf16 MMA computes: exact products, fp32
    accumulation); and its fp32 -> bf16 cast truncates, where the GPU rounds to nearest even."""
    if HAS_CUDA:
        return
    import triton.language as tl
    import triton.runtime.interpreter as interp

    original = interp.InterpreterBuilder.create_dot
    original_cast = interp.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16)
            return interp.TensorHandle(rounded.numpy().view(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    monkeypatch.setattr(interp.InterpreterBuilder, "cast_impl", cast_impl)

    def widened(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interp.TensorHandle(interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32),
                                   tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", create_dot)


@contextlib.contextmanager
def small_tiles(monkeypatch, block_m=16, block_n=16):
    """Every attention tile table at (block_m, block_n): short sequences span many blocks."""
    for name in ("FWD_CONFIGS", "FWD_CONFIGS_FP32", "BWD_DKDV_CONFIGS", "BWD_DKDV_CONFIGS_FP32", "BWD_DQ_CONFIGS",
                 "BWD_DQ_CONFIGS_FP32"):
        table = getattr(ta, name)
        for bd, (_, _, warps, stages) in list(table.items()):
            monkeypatch.setitem(table, bd, (block_m, block_n, warps, stages))
    yield


def _slopes(kind, b, hq):
    if kind == "heads":
        return reference.alibi_slopes(hq).to(DEVICE)
    if kind == "batch":
        return (reference.alibi_slopes(hq).repeat(b, 1) * (0.5 + torch.rand(b, 1))).to(DEVICE)
    return None


def _grads_through_out_and_lse(out, lse, inputs, dout, dlse):
    """Gradients of sum(out * dout) + sum(lse * dlse) over the rows that see a key (an empty
    row's lse is -inf and gets no gradient)."""
    seen = torch.isfinite(lse)
    loss = (out.double() * dout.double()).sum() + (torch.where(seen, lse.double(), 0.0) * dlse.double()).sum()
    return torch.autograd.grad(loss, inputs)


def _compare(out, lse, grads, ref_out, ref_lse, ref_grads, dtype, what):
    assert out.dtype == dtype
    assert rel_err(out, ref_out) <= TOL[dtype], (what, "out", rel_err(out, ref_out))
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen), (what, "rows that see no key must have lse = -inf")
    assert torch.allclose(lse[seen].double(), ref_lse[seen].double(), atol=LSE_ATOL, rtol=0), (what, "lse")
    if not seen.all():  # out = 0 exactly on a row that sees nothing
        assert (out.transpose(-3, -2)[~seen] == 0).all() if out.dim() == 4 else (out.transpose(0, 1)[~seen] == 0).all()
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        if r.norm() > 0:
            assert rel_err(g, r) <= GRAD_TOL[dtype], (what, name, rel_err(g, r))
        else:
            assert (g == 0).all(), (what, name, "must be 0")


# ---------------------------------------------------------------- dense: windows, softcap, ALiBi
# (shape (B, Sq, Sk, Hq, Hk, D), causal, window_size, softcap, alibi)
DENSE_CASES = [
    ((1, 40, 40, 4, 2, 16), False, (0, 0), 0.0, "heads"),  # the diagonal alone, GQA
    ((1, 40, 40, 2, 1, 16), True, (1, 0), 0.0, None),  # causal + left window, MQA
    ((2, 33, 70, 4, 1, 24), False, (3, 2), 0.0, "batch"),  # Sq < Sk, both sides bounded
    ((1, 70, 33, 2, 2, 16), False, (-1, 2), 0.0, "heads"),  # Sq > Sk, right bound only
    ((1, 70, 33, 2, 2, 16), True, (5, -1), 0.0, None),  # Sq > Sk causal: rows that see no key
    ((1, 33, 70, 2, 2, 16), False, (5, -1), 0.0, "heads"),  # left bound only, non-causal
    ((1, 50, 45, 2, 1, 32), False, (500, 300), 5.0, "heads"),  # windows longer than the sequence
    ((1, 45, 50, 2, 2, 16), True, (-1, -1), 2.0, "batch"),  # softcap with causal ALiBi
    ((1, 40, 47, 2, 2, 16), False, (-1, -1), 3.0, "heads"),  # softcap with ALiBi -slope*|rel|
    ((1, 37, 37, 2, 2, 16), True, (1000, 3), 0.0, None),  # causal overrides the right bound
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles", ["default", "16x16"])
@pytest.mark.parametrize("case", DENSE_CASES, ids=str)
def test_window_softcap_alibi_forward_lse_and_gradients(monkeypatch, dtype, tiles, case):
    shape, causal, window, softcap, alibi = case
    b, sq, sk, hq, hk, d = shape
    q, k, v = (torch.randn(b, s, h, d, device=DEVICE).to(dtype).requires_grad_()
               for s, h in ((sq, hq), (sk, hk), (sk, hk)))
    slopes = _slopes(alibi, b, hq)
    kw = dict(causal=causal, alibi_slopes=slopes, window_size=window, softcap=softcap, return_lse=True)
    dout, dlse = torch.randn(b, sq, hq, d, device=DEVICE), torch.randn(b, hq, sq, device=DEVICE)
    with small_tiles(monkeypatch) if tiles == "16x16" else contextlib.nullcontext():
        with mptkernels.backend("triton"):
            out, lse = ops.attention(q, k, v, **kw)
            grads = _grads_through_out_and_lse(out, lse, (q, k, v), dout.to(dtype), dlse)
    ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference.attention(*ins, **kw)
    ref_grads = _grads_through_out_and_lse(ref_out, ref_lse, ins, dout.to(dtype), dlse)
    _compare(out, lse, grads, ref_out, ref_lse, ref_grads, dtype, case)


@pytest.mark.parametrize("causal", [False, True])
def test_fp16_window_and_plain_dlse(causal):
    # fp16 through the kernels' default tiles; the plain (no window) path takes dlse too
    for window, softcap in (((4, 4), 1.5), ((-1, -1), 0.0)):
        q, k, v = (torch.randn(1, 45, 2, 32, device=DEVICE, dtype=torch.float16).requires_grad_() for _ in range(3))
        kw = dict(causal=causal, alibi_slopes=_slopes("heads", 1, 2), window_size=window, softcap=softcap,
                  return_lse=True)
        dout, dlse = torch.randn(1, 45, 2, 32, device=DEVICE), torch.randn(1, 2, 45, device=DEVICE)
        with mptkernels.backend("triton"):
            out, lse = ops.attention(q, k, v, **kw)
            grads = _grads_through_out_and_lse(out, lse, (q, k, v), dout.half(), dlse)
        ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = reference.attention(*ins, **kw)
        _compare(out, lse, grads, ref_out, ref_lse,
                 _grads_through_out_and_lse(ref_out, ref_lse, ins, dout.half(), dlse), torch.float16, window)


def test_window_skips_key_blocks_outside_it(monkeypatch):
    """Work scales with the window: key blocks no query of the tile sees are never read. NaN in
    every k/v row of such blocks (a visited block's P is 0 there, but 0 * NaN is NaN) leaves
    the forward, the lse and dq exact; and dk/dv of those keys are 0."""
    sq, sk, d = 16, 160, 16  # one query tile of 16 rows, ten key blocks of 16
    window = (2, 1)
    q = torch.randn(1, sq, 1, d, device=DEVICE)
    k, v = torch.randn(1, sk, 1, d, device=DEVICE), torch.randn(1, sk, 1, d, device=DEVICE)
    diag = sk - sq
    first, last = diag - window[0], sq - 1 + diag + window[1]  # keys some query sees: [first, last]
    poison = torch.zeros(sk, dtype=torch.bool, device=DEVICE)
    for j0 in range(0, sk, 16):
        if j0 + 15 < first or j0 > last:
            poison[j0:j0 + 16] = True
    assert poison.sum() >= 96
    kp, vp = k.clone(), v.clone()
    kp[:, poison], vp[:, poison] = float("nan"), float("nan")
    kw = dict(window_size=window, alibi_slopes=_slopes("heads", 1, 1), return_lse=True)
    with small_tiles(monkeypatch):
        with mptkernels.backend("triton"):
            qg, kg, vg = (t.requires_grad_() for t in (q.clone(), kp, vp))
            out, lse = ops.attention(qg, kg, vg, **kw)
            dout = torch.randn_like(out)
            dq, dk, dv = torch.autograd.grad((out * dout).sum() + lse.sum(), (qg, kg, vg))
    ins = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference.attention(*ins, **kw)
    want = torch.autograd.grad((ref_out * dout.double()).sum() + ref_lse.sum(), ins)
    assert rel_err(out, ref_out) <= TOL[torch.float32] and rel_err(lse, ref_lse) <= 1e-6
    assert rel_err(dq, want[0]) <= GRAD_TOL[torch.float32]
    assert (dk[:, poison] == 0).all() and (dv[:, poison] == 0).all()
    assert rel_err(dk[:, ~poison], want[1][:, ~poison]) <= GRAD_TOL[torch.float32]
    assert rel_err(dv[:, ~poison], want[2][:, ~poison]) <= GRAD_TOL[torch.float32]


def test_window_skips_query_blocks_that_cannot_see_the_key_block(monkeypatch):
    """The dk/dv program of a key block visits only the query blocks that see it: with one key
    block, NaN in q and dout of every query block outside the window's band (those rows see no
    key: out 0, lse -inf) leaves dk and dv exact."""
    sq, sk, d = 160, 16, 16
    window = (1, 3)
    q, k, v = (torch.randn(1, s, 1, d, device=DEVICE) for s in (sq, sk, sk))
    diag = sk - sq
    lo, hi = 0 - diag - window[1], sk - 1 - diag + window[0]  # queries that see some key: [lo, hi]
    poison = torch.zeros(sq, dtype=torch.bool, device=DEVICE)
    for i0 in range(0, sq, 16):
        if i0 + 15 < lo or i0 > hi:
            poison[i0:i0 + 16] = True
    assert poison.sum() >= 96
    dout = torch.randn(1, sq, 1, d, device=DEVICE)
    qp, doutp = q.clone(), dout.clone()
    qp[:, poison], doutp[:, poison] = float("nan"), float("nan")
    with small_tiles(monkeypatch):
        with mptkernels.backend("triton"):
            qg, kg, vg = (t.requires_grad_() for t in (qp, k.clone(), v.clone()))
            out = ops.attention(qg, kg, vg, window_size=window)
            dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), doutp)
    ins = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*ins, window_size=window)
    want = torch.autograd.grad(ref, ins, dout.double())
    assert (out[:, poison] == 0).all() and rel_err(out[:, ~poison], ref[:, ~poison]) <= TOL[torch.float32]
    assert rel_err(dk, want[1]) <= GRAD_TOL[torch.float32] and rel_err(dv, want[2]) <= GRAD_TOL[torch.float32]
    assert (dq[:, poison] == 0).all() and rel_err(dq[:, ~poison], want[0][:, ~poison]) <= GRAD_TOL[torch.float32]


# ---------------------------------------------------------------- varlen
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal, window, softcap, alibi",
                         [(False, (3, 2), 0.0, "batch"), (True, (5, -1), 2.0, "heads"), (False, (-1, 0), 4.0, None),
                          (False, (-1, -1), 0.0, "heads")])
def test_varlen_window_softcap_lse_gradients(monkeypatch, dtype, causal, window, softcap, alibi):
    # Sq == Sk, Sq < Sk, Sq > Sk (rows that see nothing), an empty sequence, rows after the last
    lens_q, lens_k, hq, hk, d = [23, 5, 40, 0, 1], [23, 37, 9, 4, 1], 4, 2, 16
    cu_q = torch.tensor([0] + np.cumsum(lens_q).tolist(), dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + np.cumsum(lens_k).tolist(), dtype=torch.int32, device=DEVICE)
    tq, tk = sum(lens_q) + 2, sum(lens_k)
    q, k, v = (torch.randn(n, h, d, device=DEVICE).to(dtype).requires_grad_() for n, h in ((tq, hq), (tk, hk), (tk, hk)))
    slopes = _slopes(alibi, len(lens_q), hq)
    kw = dict(causal=causal, alibi_slopes=slopes, window_size=window, softcap=softcap, return_lse=True)
    dout, dlse = torch.randn(tq, hq, d, device=DEVICE), torch.randn(hq, tq, device=DEVICE)
    with small_tiles(monkeypatch):
        with mptkernels.backend("triton"):
            out, lse = ops.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), **kw)
            grads = _grads_through_out_and_lse(out, lse, (q, k, v), dout.to(dtype), dlse)
    ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference.attention_varlen(*ins, cu_q, cu_k, **kw)
    ref_grads = _grads_through_out_and_lse(ref_out, ref_lse, ins, dout.to(dtype), dlse)
    _compare(out, lse, grads, ref_out, ref_lse, ref_grads, dtype, (causal, window, softcap, alibi))


# ---------------------------------------------------------------- KV cache
def _kvcache_inputs(b, sq, sn, hq, hk, d, smax, dtype, *, idx=None, leftpad=False, page=None, rotary=None,
                    lens=None):
    """Random decode-step inputs: caches (contiguous, rows chosen by idx, or paged with a random
    block table over more pages than needed), cache_seqlens that leave room for sn new rows,
    optional left padding and rotary tables (rotary = (rotary_dim, interleaved))."""
    if lens is None:
        lens = torch.randint(0, smax - sn + 1, (b,), dtype=torch.int32)
        lens[0] = smax - sn  # one sequence fills its cache to the last row
    else:
        lens = torch.tensor(lens, dtype=torch.int32)
    extra = {}
    if page is not None:
        per_seq = -(-smax // page)
        pages = b * per_seq + 3
        cache_shape = (pages, page, hk, d)
        extra["block_table"] = torch.randperm(pages)[:b * per_seq].view(b, per_seq).to(torch.int32).to(DEVICE)
    else:
        rows = b if idx is None else int(max(idx)) + 1
        cache_shape = (rows, smax, hk, d)
        if idx is not None:
            extra["cache_batch_idx"] = torch.tensor(idx, dtype=torch.int32, device=DEVICE)
    if leftpad:
        extra["cache_leftpad"] = torch.stack([torch.randint(0, int(n) + 1, ()) for n in lens]).to(torch.int32).to(DEVICE)
    if rotary is not None:
        rot_dim, interleaved = rotary
        angles = torch.rand(smax + sq, rot_dim // 2) * 6.0
        extra.update(rotary_cos=angles.cos().to(DEVICE), rotary_sin=angles.sin().to(DEVICE),
                     rotary_interleaved=interleaved)
    k_cache = torch.randn(cache_shape, device=DEVICE).to(dtype)
    v_cache = torch.randn(cache_shape, device=DEVICE).to(dtype)
    q = torch.randn(b, sq, hq, d, device=DEVICE).to(dtype)
    k = torch.randn(b, sn, hk, d, device=DEVICE).to(dtype) if sn else None
    v = torch.randn(b, sn, hk, d, device=DEVICE).to(dtype) if sn else None
    return q, k_cache, v_cache, lens.to(DEVICE), k, v, extra


def _check_kvcache(q, k_cache, v_cache, lens, k, v, extra, dtype, **kw):
    """The Triton op against the reference: out and lse against the fp64 reference (inputs
    rounded as the op sees them), the caches against the reference's writes in the caches'
    dtype (bitwise without rotary; one rounding apart with it, the rotation's fp32 maths)."""
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    lens_before = lens.clone()
    with torch.no_grad(), mptkernels.backend("triton"):
        out, lse = ops.attention_with_kvcache(q, k_cache, v_cache, lens, k=k, v=v, return_lse=True, **extra, **kw)
    assert torch.equal(lens, lens_before), "cache_seqlens must not change"
    # the writes, in the caches' dtype
    reference.attention_with_kvcache(q, kc_ref, vc_ref, lens, k, v, **extra, **kw)
    if "rotary_cos" in extra:
        assert torch.allclose(k_cache.float(), kc_ref.float(), rtol=2 ** -7 if dtype == torch.bfloat16 else 1e-3,
                              atol=1e-5)
    else:
        assert torch.equal(k_cache, kc_ref)
    assert torch.equal(v_cache, vc_ref)
    # attention over the caches as written (the rotation is checked just above), in fp64
    kc64, vc64 = k_cache.double(), v_cache.double()
    # attend with the written caches and no new rows: the same keys, no second write
    no_new = dict(extra)
    for n in ("rotary_cos", "rotary_sin", "rotary_interleaved"):
        no_new.pop(n, None)
    q64 = q.double()
    if "rotary_cos" in extra:  # q rotated as the op rotates it: fp32 maths, rounded to q's dtype
        sq, hq = q.shape[1], q.shape[2]
        per_token = kw.get("causal", True) or tuple(kw.get("window_size", (-1, -1))) != (-1, -1)
        rot = dict(interleaved=extra["rotary_interleaved"], seqlen_offsets=lens)
        cos, sin = extra["rotary_cos"], extra["rotary_sin"]
        if per_token:
            q64 = reference.apply_rotary(q, cos, sin, **rot).double()
        else:
            q64 = reference.apply_rotary(q.reshape(q.shape[0], 1, sq * hq, -1), cos, sin,
                                         **rot).reshape(q.shape).double()
    sn = 0 if k is None else k.shape[1]
    ref_out, ref_lse = reference.attention_with_kvcache(q64, kc64, vc64, lens + sn, None, None, **no_new, **kw,
                                                        return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == ref_lse.shape
    assert rel_err(out, ref_out) <= TOL[dtype], rel_err(out, ref_out)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    assert torch.allclose(lse[seen].double(), ref_lse[seen].double(), atol=LSE_ATOL, rtol=0)


# (b, sq, sn, hq, hk, d, smax, options, kwargs of the call)
KV_CASES = [
    ("window causal decode", (3, 1, 1, 4, 2, 32, 90), {}, dict(window_size=(7, 0))),
    ("window non-causal 3 tokens", (2, 3, 3, 4, 1, 16, 60), {}, dict(causal=False, window_size=(4, 1))),
    ("softcap alibi", (2, 2, 2, 4, 2, 24, 50), {}, dict(softcap=3.0, alibi_slopes="heads")),
    ("cache_batch_idx permuted", (3, 2, 2, 4, 2, 16, 40), dict(idx=[2, 0, 3]), dict(alibi_slopes="batch")),
    ("cache_batch_idx repeated, k=None", (4, 1, 0, 4, 2, 16, 40), dict(idx=[1, 1, 0, 1]), {}),
    # rows written twice (by another token of another sequence): the later sequence's write stays
    ("cache_batch_idx repeated, k given: batch order", (4, 2, 2, 2, 2, 16, 40),
     dict(idx=[0, 0, 1, 0], lens=[10, 11, 5, 9]), {}),
    ("leftpad window softcap", (3, 2, 2, 4, 2, 16, 50), dict(leftpad=True), dict(window_size=(6, -1), softcap=2.0)),
    ("paged 3", (2, 2, 2, 4, 2, 16, 40), dict(page=3, leftpad=True), {}),
    ("paged 5 window", (3, 1, 1, 4, 1, 32, 70), dict(page=5), dict(window_size=(9, 0), alibi_slopes="heads")),
    ("paged 16", (2, 3, 3, 2, 2, 16, 50), dict(page=16), dict(causal=False)),
    ("rotary interleaved causal", (2, 2, 2, 4, 2, 32, 40), dict(rotary=(32, True)), {}),
    ("rotary halves causal, rotary_dim < d", (2, 3, 3, 4, 2, 32, 40), dict(rotary=(16, False)), {}),
    ("rotary interleaved non-causal", (2, 3, 2, 4, 2, 16, 40), dict(rotary=(16, True)), dict(causal=False)),
    ("rotary halves non-causal windowed", (2, 3, 3, 2, 2, 16, 40), dict(rotary=(8, False)),
     dict(causal=False, window_size=(-1, 5))),
    ("everything, paged", (3, 2, 2, 4, 2, 16, 60), dict(page=5, leftpad=True, rotary=(16, False)),
     dict(window_size=(8, 0), softcap=2.5, alibi_slopes="heads")),
    ("prefill (forward kernel) paged", (2, 40, 40, 4, 2, 16, 100),
     dict(page=16, leftpad=True, rotary=(16, True)), dict(window_size=(10, -1), softcap=4.0)),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])  # fp32: the forward kernel
@pytest.mark.parametrize("case", KV_CASES, ids=lambda c: c[0])
def test_kvcache_features(dtype, case):
    _, (b, sq, sn, hq, hk, d, smax), opts, kw = case
    q, kc, vc, lens, k, v, extra = _kvcache_inputs(b, sq, sn, hq, hk, d, smax, dtype, **opts)
    kw = dict(kw)
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = _slopes(kw["alibi_slopes"], b, hq)
    _check_kvcache(q, kc, vc, lens, k, v, extra, dtype, **kw)


@pytest.mark.parametrize("case", [
    ("plain", dict(), dict()),
    ("window", dict(), dict(window_size=(40, 0))),
    ("paged 5, leftpad, rotary, softcap", dict(page=5, leftpad=True, rotary=(16, True)),
     dict(softcap=3.0, alibi_slopes="heads")),
    ("cache_batch_idx, non-causal window", dict(idx=[1, 0]), dict(causal=False, window_size=(30, 30))),
], ids=lambda c: c[0])
def test_kvcache_flash_decoding_splits(monkeypatch, case):
    # many key splits (the interpreter counts one SM) and 3 query tokens: the combine kernel
    # merges out and lse; a window leaves some splits with no key at all
    monkeypatch.setattr(ta, "DECODE_PROGRAMS_PER_SM", 64)
    assert ta.decode_splits(2, 2, 300, ta.DECODE_CONFIGS[32][0], 1) > 1
    _, opts, kw = case
    q, kc, vc, lens, k, v, extra = _kvcache_inputs(2, 3, 3, 8, 2, 24, 300, torch.float16, **opts)
    kw = dict(kw)
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = _slopes(kw["alibi_slopes"], 2, 8)
    _check_kvcache(q, kc, vc, lens, k, v, extra, torch.float16, **kw)


def test_kvcache_rows_that_see_no_key():
    # leftpad = cache_seqlens and no new rows: a sequence with no key at all gets out 0, lse -inf
    q, kc, vc, lens, _, _, _ = _kvcache_inputs(2, 2, 0, 4, 2, 16, 30, torch.float16)
    pad = lens.clone()
    pad[1] = 0
    with torch.no_grad(), mptkernels.backend("triton"):
        out, lse = ops.attention_with_kvcache(q, kc, vc, lens, cache_leftpad=pad, return_lse=True)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()


def test_triton_refuses_float64_by_name():
    # no silent fallback: a forced Triton that cannot run the call says so
    q = torch.randn(1, 4, 2, 16, dtype=torch.float64, device=DEVICE)
    with mptkernels.backend("triton"), pytest.raises(ValueError, match="triton"):
        ops.attention(q, q, q, window_size=(2, 2))
