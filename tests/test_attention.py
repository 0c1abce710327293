"""Fused attention (causal, ALiBi, GQA): every backend against mptkernels.reference (fp64)."""
import contextlib
import importlib

import pytest
import torch

import mptkernels
from mptkernels import ops, reference
from conftest import HAS_CUDA, rel_err

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim): odd lengths, Sq != Sk both ways
# (Sq > Sk with causal leaves rows that see no key), GQA ratios 1 / 4 / 8
SHAPES = [(2, 17, 17, 4, 4, 16), (1, 1, 1, 2, 2, 8), (1, 5, 130, 4, 1, 40), (2, 129, 33, 8, 2, 64),
          (1, 257, 257, 8, 1, 128), (1, 128, 128, 2, 2, 256), (1, 1, 1000, 4, 4, 64)]


def _case(shape, dtype, device="cpu", alibi=None):
    b, sq, sk, hq, hk, d = shape
    q = torch.randn(b, sq, hq, d, dtype=dtype, device=device)
    k = torch.randn(b, sk, hk, d, dtype=dtype, device=device)
    v = torch.randn(b, sk, hk, d, dtype=dtype, device=device)
    slopes = None
    if alibi == "heads":
        slopes = reference.alibi_slopes(hq).to(device)
    elif alibi == "batch":
        slopes = (reference.alibi_slopes(hq).repeat(b, 1) * torch.rand(b, 1) * 2).to(device)
    return q, k, v, slopes


def _reference(q, k, v, slopes, causal, scale=None):
    return reference.attention(q.double(), k.double(), v.double(), causal=causal, alibi_slopes=slopes,
                               softmax_scale=scale, return_lse=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("alibi", [None, "heads", "batch"])
def test_cpu_forward_matches_reference(dtype, shape, causal, alibi):
    q, k, v, slopes = _case(shape, dtype, alibi=alibi)
    out, lse = torch.ops.mptkernels.attention_fwd(q, k, v, slopes, shape[-1] ** -0.5, causal)
    ref_out, ref_lse = _reference(q, k, v, slopes, causal)
    assert out.dtype == dtype and rel_err(out, ref_out) <= TOL[dtype]
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen), "rows that see no key must have lse = -inf"
    assert torch.allclose(lse[seen], ref_lse[seen].float(), atol=1e-4, rtol=1e-5)
    if not seen.all():
        assert torch.equal(out.transpose(1, 2)[~seen], torch.zeros_like(out.transpose(1, 2)[~seen]))
    assert torch.equal(ops.attention(q, k, v, causal=causal, alibi_slopes=slopes), out)


# bf16 on the CPU (vdpbf16ps at the avx512_bf16 level): q K^T products exact in
# fp32, P rounded to bf16 for P V, one rounding of the output: element by element within
# 2^-8 of the fp64 result (relative) plus 2^-8 of the largest |v| (P's rounding), so a dropped
# key (an odd last one of a pair) or head-dim column shows even where a norm would hide it
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal, alibi", [(False, None), (True, "heads"), (True, "batch")])
def test_cpu_bf16_forward_elementwise(shape, causal, alibi):
    q, k, v, slopes = _case(shape, torch.bfloat16, alibi=alibi)
    out = ops.attention(q, k, v, causal=causal, alibi_slopes=slopes)
    ref = _reference(q, k, v, slopes, causal)[0]
    bound = 2.0 ** -8 * (ref.abs() + v.double().abs().max())
    assert ((out.double() - ref).abs() <= bound).all(), ((out.double() - ref).abs() / bound).max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:5], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("alibi", [None, "heads", "batch"])  # batch: (B, Hq) slopes reach the backward too
def test_cpu_gradients_match_reference(dtype, shape, causal, alibi):
    q, k, v, slopes = _case(shape, dtype, alibi=alibi)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)
    got = torch.autograd.grad(ops.attention(q, k, v, causal=causal, alibi_slopes=slopes), (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(reference.attention(q64, k64, v64, causal=causal, alibi_slopes=slopes),
                               (q64, k64, v64), dout.double())
    for name, g, ref, leaf in zip(("dq", "dk", "dv"), got, want, (q, k, v)):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        if ref.norm() < 1e-6 * dout.double().norm():  # e.g. one key: dq, dk are exactly 0 in theory
            assert g.double().norm() <= GRAD_TOL[dtype] * dout.double().norm(), name
        else:
            assert rel_err(g, ref) <= GRAD_TOL[dtype], (name, rel_err(g, ref))


# bf16 backward on the CPU (vdpbf16ps at the avx512_bf16 level: P and dS rounded
# to bf16, query rows paired): every token's gradient row against fp64, so one row dropped
# from a pair (odd seqlen_q; with causal the last key gets its gradient from the last query
# alone) shows even where a whole-tensor norm would hide it
@pytest.mark.parametrize("shape", [(1, 17, 17, 4, 2, 64), (2, 33, 40, 2, 1, 40), (1, 1, 1, 2, 2, 8)], ids=str)
@pytest.mark.parametrize("causal, alibi", [(True, "heads"), (False, None)])
def test_cpu_bf16_gradients_per_row(shape, causal, alibi):
    q, k, v, slopes = _case(shape, torch.bfloat16, alibi=alibi)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ops.attention(q, k, v, causal=causal, alibi_slopes=slopes)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(_reference(q64, k64, v64, slopes, causal)[0], (q64, k64, v64), dout.double())
    for name, g, r in zip(("dq", "dk", "dv"), got, want):
        err = (g.double() - r).flatten(2).norm(dim=-1)  # per (batch, token, head)
        ref = r.flatten(2).norm(dim=-1)
        assert (err <= 3e-2 * ref + 1e-3 * ref.max()).all(), (name, (err / (ref + 1e-9)).max())


def test_cpu_bf16_inputs_only_2_byte_aligned():
    # the bf16 CPU kernels read head_dim in 4-byte pairs: a contiguous view at an odd element
    # offset must give the same bits as an aligned copy, forward and backward
    def odd(t):
        base = torch.empty(t.numel() + 1, dtype=t.dtype)
        view = base[1:].view(t.shape)
        view.copy_(t)
        return view

    q, k, v, slopes = _case((1, 33, 33, 4, 2, 40), torch.bfloat16, alibi="heads")
    dout = torch.randn_like(q)
    results = []
    for make in (lambda t: t.clone(), odd):
        args = [make(t).requires_grad_() for t in (q, k, v)]
        assert make is not odd or all(a.data_ptr() % 4 == 2 for a in args)
        out = ops.attention(*args, causal=True, alibi_slopes=slopes)
        results.append((out, *torch.autograd.grad(out, args, make(dout))))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_backward_is_bitwise_deterministic():
    q, k, v, slopes = _case((2, 70, 70, 8, 2, 32), torch.float32, alibi="heads")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)
    runs = [torch.autograd.grad(ops.attention(q, k, v, causal=True, alibi_slopes=slopes, deterministic=True),
                                (q, k, v), dout) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_softmax_scale_and_float64_reference_path():
    q, k, v, _ = _case((1, 9, 9, 2, 2, 16), torch.float32)
    out = ops.attention(q, k, v, softmax_scale=0.3, causal=True)
    assert rel_err(out, _reference(q, k, v, None, True, scale=0.3)[0]) <= TOL[torch.float32]
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, causal=True), (q64, k64, v64))


def test_opcheck():
    for shape, causal, alibi in [((1, 9, 13, 4, 2, 16), True, "heads"), ((2, 5, 5, 2, 2, 8), False, None)]:
        q, k, v, slopes = _case(shape, torch.float32, alibi=alibi)
        torch.library.opcheck(torch.ops.mptkernels.attention_fwd.default,
                              (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), slopes, 0.25, causal))
        q, k, v = (t.detach() for t in (q, k, v))
        out, lse = torch.ops.mptkernels.attention_fwd(q, k, v, slopes, 0.25, causal)
        torch.library.opcheck(torch.ops.mptkernels.attention_bwd.default,
                              (torch.randn_like(q), q, k, v, out, lse, slopes, 0.25, causal))


def test_torch_compile_fullgraph_block():
    """A pre-norm block on mptkernels ops traces into one graph (no breaks) and trains."""
    d, hq, hk = 64, 4, 2
    w = torch.randn(d, requires_grad=True)
    slopes = reference.alibi_slopes(hq)

    def block(x, resid):
        h, resid = ops.layer_norm(x, w, None, 1e-5, resid)
        b, s, _ = h.shape
        q = h.view(b, s, hq, d // hq)
        kv = h[..., : hk * d // hq].reshape(b, s, hk, d // hq)
        return ops.attention(q, kv, kv, causal=True, alibi_slopes=slopes).reshape(b, s, d), resid

    x, r = torch.randn(2, 33, d, requires_grad=True), torch.randn(2, 33, d)
    want = block(x, r)
    torch._dynamo.reset()
    got = torch.compile(block, fullgraph=True, backend="aot_eager")(x, r)
    assert torch.allclose(got[0], want[0], atol=1e-6) and torch.equal(got[1], want[1])
    got[0].sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("call, match", [
    (lambda q, k, v: ops.attention(q, k[:, :, :3], v[:, :, :3]), r"heads_q \(4\) must be a multiple of heads_kv \(3\)"),
    (lambda q, k, v: ops.attention(q[..., :12], k[..., :12], v[..., :12]), "head_dim must be a multiple of 8"),
    (lambda q, k, v: ops.attention(*(torch.randn(1, 2, 4, 264) for _ in range(3))), "up to 256"),
    (lambda q, k, v: ops.attention(q, k, v[:, :3]), "must have one shape"),
    (lambda q, k, v: ops.attention(q, k.half(), v.half()), "one dtype"),
    (lambda q, k, v: ops.attention(q, k, v, alibi_slopes=reference.alibi_slopes(4).double()), "alibi_slopes must be a float32"),
    (lambda q, k, v: ops.attention(q, k, v, alibi_slopes=reference.alibi_slopes(3)), r"alibi_slopes must have shape \(4,\)"),
    (lambda q, k, v: ops.attention(q[0], k, v), r"q must be a \(batch, seqlen, heads, head_dim\)"),
    (lambda q, k, v: ops.attention(q, k[:1], v[:1]), "must match q"),
    (lambda q, k, v: ops.attention(q, k, v, softmax_scale=0.0), "softmax_scale must be > 0"),
    (lambda q, k, v: ops.attention(q, k, v, causal="yes"), "attention: causal must be True or False, got 'yes'"),
    (lambda q, k, v: ops.alibi_slopes(0), "n_heads must be an int >= 1, got 0"),
    (lambda q, k, v: torch.ops.mptkernels.attention_fwd(q, k[:, :, :3].contiguous(), v[:, :, :3].contiguous(), None,
                                                        1.0, False), "must be a multiple"),
    (lambda q, k, v: torch.ops.mptkernels.attention_fwd(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, None, 1.0,
                                                        False), "q must be contiguous"),
])
def test_bad_input_names_the_argument(call, match):
    q, k, v, _ = _case((2, 6, 6, 4, 4, 16), torch.float32)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(q, k, v)


def test_shape_errors_point_at_the_layout():
    """q, k, v in SDPA's (batch, heads, seqlen, head_dim) layout: wherever that shape cannot be
    ours, the error says which layout the op takes and how to convert; the conversion it
    names then gives SDPA's result."""
    import re

    import torch.nn.functional as F

    hint = re.escape("q, k, v are (batch, seqlen, heads, head_dim), flash-attn's layout; "
                     "SDPA's (batch, heads, seqlen, head_dim) needs .transpose(1, 2)")
    q, k, v = torch.randn(2, 8, 24, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)  # SDPA's: GQA, Sk > Sq
    for call, match in [
        (lambda: ops.attention(q, k, v, causal=True), r"attention: heads_q \(24\) must be a multiple of heads_kv \(40\)"),
        (lambda: ops.attention(q, q, q, alibi_slopes=ops.alibi_slopes(8)), r"alibi_slopes must have shape \(24,\)"),
        (lambda: ops.attention(q, k[:1], v[:1]), "must match q"),
        (lambda: ops.attention(q, k, v[:, :1]), "must have one shape"),
        (lambda: ops.attention(*(torch.randn(1, 4, 8, 264) for _ in range(3))), "head_dim must be a multiple of 8"),
        (lambda: torch.ops.mptkernels.attention_fwd(q, k, v, None, 1.0, False), "must be a multiple of heads_kv"),
    ]:
        with pytest.raises(ValueError, match=match + ".*" + hint):
            call()
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    got = ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert rel_err(got, want) <= TOL[torch.float32]
    # decoding over a cache: the same layout, named with the caches
    kv_hint = re.escape("q, k, v, k_cache, v_cache are (batch, seqlen, heads, head_dim), flash-attn's layout; "
                        "SDPA's (batch, heads, seqlen, head_dim) needs .transpose(1, 2)")
    kc, vc, lens = torch.zeros(2, 32, 2, 16), torch.zeros(2, 32, 2, 16), torch.tensor([3, 5], dtype=torch.int32)
    dq = torch.randn(2, 1, 8, 16)
    for call, match in [
        (lambda: ops.attention_with_kvcache(dq.transpose(1, 2), kc, vc, lens), r"heads_q \(1\) must be a multiple"),
        (lambda: ops.attention_with_kvcache(dq, kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous(), lens),
         r"heads_q \(8\) must be a multiple of heads_kv \(32\), got q \(2, 1, 8, 16\), k_cache \(2, 2, 32, 16\)"),
        (lambda: ops.attention_with_kvcache(dq, kc, vc, lens, k=torch.randn(2, 2, 1, 16), v=torch.randn(2, 2, 1, 16)),
         r"k must be \(2, seqlen_new, 2, 16\), got \(2, 2, 1, 16\)"),
    ]:
        with pytest.raises(ValueError, match=match + ".*" + kv_hint):
            call()
    # packed sequences: (total_tokens, heads, head_dim); (heads, total_tokens, head_dim) given
    varlen_hint = re.escape("q, k, v are (total_tokens, heads, head_dim), the sequences packed along dim 0; "
                            "a (heads, total_tokens, head_dim) tensor needs .transpose(0, 1)")
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    qv, kv = torch.randn(8, 30, 16), torch.randn(2, 30, 16)
    for call, match in [
        (lambda: ops.attention_varlen(qv, kv, kv, cu, cu, 20, 20), "cu_seqlens_q must rise from 0 to at most 8 tokens"),
        (lambda: ops.attention_varlen(qv, torch.randn(2, 7, 16), torch.randn(2, 7, 16), cu, cu, 20, 20),
         r"heads_q \(30\) must be a multiple of heads_kv \(7\), got q \(8, 30, 16\), k \(2, 7, 16\)"),
        (lambda: ops.attention_varlen(qv, kv, kv, cu, cu, 20, 20, alibi_slopes=ops.alibi_slopes(8)),
         r"alibi_slopes must have shape \(30,\)"),
    ]:
        with pytest.raises(ValueError, match=match + ".*" + varlen_hint):
            call()


def test_non_contiguous_inputs():
    qkv = torch.randn(2, 11, 3, 4, 16)  # fused projection output: q, k, v are strided views
    q, k, v = qkv.unbind(2)
    out = ops.attention(q, k, v, causal=True)
    assert rel_err(out, _reference(q, k, v, None, True)[0]) <= TOL[torch.float32]


# ---------------------------------------------------------------- GPU (the lent machine)
GPU_SHAPES = SHAPES + [(2, 1000, 1000, 8, 1, 64), (1, 2048, 2048, 4, 4, 128)]
# every shape in bf16, a few in fp16 (the kernels differ only in the element type); each
# (causal, alibi) pair compiles its own kernels, so the pairs are the ones that matter
GPU_CASES = ([(torch.bfloat16, s) for s in GPU_SHAPES] + [(torch.float16, s) for s in GPU_SHAPES[2:5]])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, shape", GPU_CASES, ids=str)
@pytest.mark.parametrize("causal, alibi", [(False, None), (True, None), (True, "heads"), (False, "batch")])
def test_gpu_forward_and_gradients(dtype, shape, causal, alibi):
    q, k, v, slopes = _case(shape, dtype, device="cuda", alibi=alibi)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ops.attention(q, k, v, causal=causal, alibi_slopes=slopes)
    ref_out, _ = _reference(q.detach(), k.detach(), v.detach(), slopes, causal)
    assert rel_err(out, ref_out) <= TOL[dtype]
    dout = torch.randn_like(q)
    got = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(reference.attention(q64, k64, v64, causal=causal, alibi_slopes=slopes),
                               (q64, k64, v64), dout.double())
    for g, ref in zip(got, want):
        if ref.norm() > 1e-6 * dout.double().norm():
            assert rel_err(g, ref) <= GRAD_TOL[dtype]


# ---------------------------------------------------------------- Triton kernels (interpreter)
INTERP_CASES = [  # (shape, causal, alibi): every feature at least once, small for the interpreter
    ((1, 17, 17, 4, 4, 16), True, "heads"),
    ((2, 17, 128, 4, 1, 40), True, "batch"),   # Sq < Sk (cache), MQA
    ((1, 128, 17, 4, 2, 64), True, None),      # Sq > Sk: rows that see no key
    ((1, 1, 257, 2, 2, 32), False, "heads"),   # one query over a long cache
    ((2, 33, 33, 2, 1, 24), False, None),
]


@pytest.mark.skipif(HAS_CUDA, reason="interpreter run; on a GPU the gpu tests cover Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # interpreter: no bf16 tl.dot
@pytest.mark.parametrize("case", INTERP_CASES, ids=str)
def test_triton_interpreter_forward_backward(dtype, case):
    tl_attn = importlib.import_module("mptkernels.triton.attention")
    shape, causal, alibi = case
    q, k, v, slopes = _case(shape, dtype, alibi=alibi)
    scale = shape[-1] ** -0.5
    out, lse = tl_attn.attention_fwd(q, k, v, slopes, scale, causal)
    ref_out, ref_lse = _reference(q, k, v, slopes, causal)
    assert rel_err(out, ref_out) <= TOL[dtype]
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    assert torch.allclose(lse[seen], ref_lse[seen].float(), atol=1e-3, rtol=1e-4)
    dout = torch.randn_like(q)
    runs = [tl_attn.attention_bwd(dout, q, k, v, out, lse, slopes, scale, causal) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs)), "the backward must be bitwise deterministic"
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(reference.attention(q64, k64, v64, causal=causal, alibi_slopes=slopes),
                               (q64, k64, v64), dout.double())
    for name, g, ref in zip(("dq", "dk", "dv"), runs[0], want):
        if ref.norm() > 1e-6 * dout.double().norm():
            assert rel_err(g, ref) <= GRAD_TOL[dtype], (name, rel_err(g, ref))


def test_scaled_dot_product_attention_matches_torch():
    F = torch.nn.functional
    q, k, v = (torch.randn(2, 4, 19, 32) for _ in range(3))
    for kw in ({}, {"is_causal": True}, {"scale": 0.2}):
        assert rel_err(ops.scaled_dot_product_attention(q, k, v, **kw), F.scaled_dot_product_attention(q, k, v, **kw)) <= 1e-5
    kg, vg = k[:, :2], v[:, :2]  # GQA needs enable_gqa, as in PyTorch
    assert rel_err(ops.scaled_dot_product_attention(q, kg, vg, enable_gqa=True),
                   F.scaled_dot_product_attention(q, kg, vg, enable_gqa=True)) <= 1e-5
    # fallbacks: a mask, top-left causal with Sq != Sk; each equals PyTorch's result
    mask = torch.rand(19, 19) > 0.3
    assert torch.equal(ops.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                       F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert torch.equal(ops.scaled_dot_product_attention(q[:, :, :5], k, v, is_causal=True),
                       F.scaled_dot_product_attention(q[:, :, :5], k, v, is_causal=True))
    # ALiBi on the kernel path and on the fallback path agree
    slopes = reference.alibi_slopes(4)
    fused = ops.scaled_dot_product_attention(q, k, v, is_causal=True, alibi_slopes=slopes)
    via_mask = ops.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(19, 19, dtype=torch.bool),
                                                is_causal=False, alibi_slopes=slopes)
    causal_ref = reference.attention(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, alibi_slopes=slopes)
    assert rel_err(fused, causal_ref.transpose(1, 2)) <= 1e-5
    nocausal_ref = reference.attention(*(t.transpose(1, 2) for t in (q, k, v)), alibi_slopes=slopes)
    assert rel_err(via_mask, nocausal_ref.transpose(1, 2)) <= 1e-5
    # what PyTorch accepts and the kernel does not take falls back, with PyTorch's result
    v48 = torch.randn(2, 4, 19, 48)
    for args, kw in [((q, k, v48), {}),  # v's head dim differs from q's
                     ((q, k[:1], v[:1]), {}),  # batch broadcast
                     ((q[0, 0], k[0, 0], v[0, 0]), {}),  # 2-D
                     ((q[0], k[0], v[0]), {"is_causal": True}),  # 3-D
                     ((q, k, v), {"scale": 0.0}),
                     ((q, k, v), {"scale": -0.3})]:
        want = F.scaled_dot_product_attention(*args, **kw)
        assert rel_err(ops.scaled_dot_product_attention(*args, **kw), want) <= 1e-6
    # ALiBi on the fallback path: the slopes are checked as on the kernel path
    q12 = torch.randn(2, 4, 5, 12)  # head_dim 12: fallback
    bad = [(slopes.view(4, 1), r"alibi_slopes must have shape \(4,\) or \(2, 4\)"),
           (slopes.double(), "alibi_slopes must be a float32 tensor"), (slopes[:3], "must have shape")]
    for s, match in bad:
        with pytest.raises((ValueError, TypeError), match=match):
            ops.scaled_dot_product_attention(q12, q12, q12, alibi_slopes=s)
    got = ops.scaled_dot_product_attention(q12, q12, q12, alibi_slopes=slopes.expand(2, 4).contiguous())
    assert rel_err(got, reference.attention(*(q12.transpose(1, 2),) * 3, alibi_slopes=slopes).transpose(1, 2)) <= 1e-5
    # input PyTorch rejects gets PyTorch's error, not an IndexError of ours
    with pytest.raises(RuntimeError):
        ops.scaled_dot_product_attention(torch.randn(5), torch.randn(5), torch.randn(5))



# ---------------------------------------------------------------- packed variable-length sequences
def _varlen_case(lens_q, lens_k, hq, hk, d, dtype, device="cpu", alibi=None, tail=0):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=device)
    # `tail` extra rows after the last sequence belong to none (they must come back zero)
    q = torch.randn(sum(lens_q) + tail, hq, d, dtype=dtype, device=device)
    k = torch.randn(sum(lens_k), hk, d, dtype=dtype, device=device)
    v = torch.randn(sum(lens_k), hk, d, dtype=dtype, device=device)
    slopes = None
    if alibi == "heads":
        slopes = reference.alibi_slopes(hq).to(device)
    elif alibi == "batch":
        slopes = (reference.alibi_slopes(hq).repeat(len(lens_q), 1) * torch.rand(len(lens_q), 1) * 2).to(device)
    return q, k, v, cu_q, cu_k, slopes


# (lens_q, lens_k, hq, hk, d): lengths 1, 17, 129, an empty sequence, Sq != Sk per sequence
VARLEN_SHAPES = [([17, 1, 129, 5], [17, 1, 129, 5], 4, 2, 32),
                 ([3, 0, 64, 1], [40, 2, 64, 257], 8, 1, 64),
                 ([33, 12], [20, 12], 2, 2, 24)]


def _check_varlen(q, k, v, cu_q, cu_k, slopes, causal, dtype, fwd_tol, grad_tol, call):
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = call(q, k, v)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = reference.attention_varlen(q64, k64, v64, cu_q, cu_k, causal=causal, alibi_slopes=slopes)
    assert rel_err(out, want) <= fwd_tol
    tail = int(cu_q[-1])
    assert torch.equal(out[tail:], torch.zeros_like(out[tail:])), "rows outside every sequence must be zero"
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    ref = torch.autograd.grad(want, (q64, k64, v64), dout.double())
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert rel_err(g, r) <= grad_tol, (name, rel_err(g, r))
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", VARLEN_SHAPES, ids=str)
@pytest.mark.parametrize("causal, alibi", [(False, None), (True, "heads"), (True, "batch"), (False, "heads")])
def test_cpu_varlen_matches_per_sequence_reference(dtype, shape, causal, alibi):
    lens_q, lens_k, hq, hk, d = shape
    q, k, v, cu_q, cu_k, slopes = _varlen_case(lens_q, lens_k, hq, hk, d, dtype, alibi=alibi, tail=3)
    _check_varlen(q, k, v, cu_q, cu_k, slopes, causal, dtype, TOL[dtype], GRAD_TOL[dtype],
                  lambda q, k, v: ops.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                                       alibi_slopes=slopes))


def test_varlen_equals_attention_of_each_sequence():
    """Packing changes nothing: each sequence's rows equal ops.attention on it alone."""
    lens = [7, 30, 1]
    q, k, v, cu, _, slopes = _varlen_case(lens, lens, 4, 2, 16, torch.float32, alibi="heads")
    packed = ops.attention_varlen(q, k, v, cu, cu, 30, 30, causal=True, alibi_slopes=slopes)
    for b in range(3):
        s, e = int(cu[b]), int(cu[b + 1])
        alone = ops.attention(q[None, s:e], k[None, s:e], v[None, s:e], causal=True, alibi_slopes=slopes)[0]
        assert torch.allclose(packed[s:e], alone, atol=1e-6)


# ---------------------------------------------------------------- KV-cache decoding
def _kvcache_case(b, smax, hq, hk, d, sq, sn, dtype, device="cpu", lens=None):
    k_cache = torch.randn(b, smax, hk, d, dtype=dtype, device=device)
    v_cache = torch.randn(b, smax, hk, d, dtype=dtype, device=device)
    if lens is None:
        lens = torch.randint(0, smax - sn + 1, (b,)).tolist()
        lens[0] = 0  # an empty cache
    cache_seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(b, sq, hq, d, dtype=dtype, device=device)
    k = torch.randn(b, sn, hk, d, dtype=dtype, device=device) if sn else None
    v = torch.randn(b, sn, hk, d, dtype=dtype, device=device) if sn else None
    return q, k_cache, v_cache, cache_seqlens, k, v


def _check_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, causal, slopes, tol, call):
    before_k, before_v, lens_before = k_cache.clone(), v_cache.clone(), cache_seqlens.clone()
    out = call(q, k_cache, v_cache, cache_seqlens, k, v)
    assert torch.equal(cache_seqlens, lens_before), "cache_seqlens must not change"
    sn = 0 if k is None else k.shape[1]
    for b, n in enumerate(cache_seqlens.tolist()):
        # the cache holds the new rows at [n, n + sn) and nothing else changed
        want_k, want_v = before_k[b].clone(), before_v[b].clone()
        if sn:
            want_k[n:n + sn], want_v[n:n + sn] = k[b], v[b]
        assert torch.equal(k_cache[b], want_k) and torch.equal(v_cache[b], want_v)
        sl = slopes[b:b + 1] if slopes is not None and slopes.dim() == 2 else slopes
        ref = reference.attention(q[b:b + 1].double(), k_cache[b:b + 1, :n + sn].double(),
                                  v_cache[b:b + 1, :n + sn].double(), causal=causal, alibi_slopes=sl)
        assert rel_err(out[b:b + 1], ref) <= tol, (b, n, rel_err(out[b:b + 1], ref))


# (batch, max_seqlen, hq, hk, d, seqlen_q, seqlen_new)
KVCACHE_SHAPES = [(3, 64, 4, 4, 32, 1, 1), (2, 300, 8, 2, 64, 1, 0), (2, 129, 8, 1, 16, 4, 4),
                  (1, 1000, 2, 2, 128, 1, 1), (2, 40, 4, 2, 24, 17, 17)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", KVCACHE_SHAPES, ids=str)
@pytest.mark.parametrize("causal, alibi", [(True, None), (True, "heads"), (False, "batch")])
def test_cpu_kvcache_matches_attention_over_the_prefix(dtype, shape, causal, alibi):
    b, smax, hq, hk, d, sq, sn = shape
    q, kc, vc, lens, k, v = _kvcache_case(b, smax, hq, hk, d, sq, sn, dtype)
    slopes = _case((b, 1, 1, hq, hk, 8), torch.float32, alibi=alibi)[3]
    _check_kvcache(q, kc, vc, lens, k, v, causal, slopes, TOL[dtype],
                   lambda *a: ops.attention_with_kvcache(*a[:4], k=a[4], v=a[5], causal=causal, alibi_slopes=slopes))


# the CPU decode path (up to 4 query tokens per sequence): scores 16 keys at a time with
# ragged ends (cache lengths around multiples of 16 and of the 64-key block), and the P V
# accumulators in registers for every head_dim width (80-112: 5-7 vectors on AVX-512),
# element by element against fp64
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 2.0 ** -8)])
@pytest.mark.parametrize("d", [8, 64, 80, 96, 104, 112, 256])
@pytest.mark.parametrize("sq", [1, 3])
def test_cpu_decode_path_elementwise(dtype, tol, d, sq):
    lens = [0, 1, 15, 16, 17, 63, 64, 65, 200]
    q, kc, vc, cache_seqlens, k, v = _kvcache_case(len(lens), 220, 8, 2, d, sq, sq, dtype, lens=lens)
    slopes = reference.alibi_slopes(8)
    out = ops.attention_with_kvcache(q, kc, vc, cache_seqlens, k=k, v=v, alibi_slopes=slopes)
    for b, n in enumerate(lens):
        ref = reference.attention(q[b:b + 1].double(), kc[b:b + 1, :n + sq].double(), vc[b:b + 1, :n + sq].double(),
                                  causal=True, alibi_slopes=slopes)
        bound = tol * (ref.abs() + vc[b, :n + sq].double().abs().max())
        assert ((out[b:b + 1].double() - ref).abs() <= bound).all(), (b, n, ((out[b:b + 1].double() - ref).abs() / bound).max())


def test_cached_decoding_equals_full_recompute():
    """Prefill 5 tokens, then decode one at a time: each step equals full causal attention."""
    b, hq, hk, d, total = 2, 4, 2, 32, 23
    q, k, v = torch.randn(b, total, hq, d), torch.randn(b, total, hk, d), torch.randn(b, total, hk, d)
    slopes = reference.alibi_slopes(hq)
    full = ops.attention(q, k, v, causal=True, alibi_slopes=slopes)
    kc, vc = torch.randn(b, 32, hk, d), torch.randn(b, 32, hk, d)
    lens = torch.zeros(b, dtype=torch.int32)
    out = ops.attention_with_kvcache(q[:, :5], kc, vc, lens, k=k[:, :5], v=v[:, :5], alibi_slopes=slopes)
    steps = [out]
    lens += 5
    for t in range(5, total):
        steps.append(ops.attention_with_kvcache(q[:, t:t + 1], kc, vc, lens, k=k[:, t:t + 1], v=v[:, t:t + 1],
                                                alibi_slopes=slopes))
        lens += 1
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_varlen_and_kvcache_opcheck():
    q, k, v, cu_q, cu_k, slopes = _varlen_case([5, 0, 9], [7, 2, 9], 4, 2, 16, torch.float32, alibi="heads", tail=1)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_q, cu_k, 9, 9, slopes, 0.25, True)
    torch.library.opcheck(torch.ops.mptkernels.attention_varlen_fwd.default, args)
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = torch.ops.mptkernels.attention_varlen_fwd(q, k, v, cu_q, cu_k, 9, 9, slopes, 0.25, True)
    torch.library.opcheck(torch.ops.mptkernels.attention_varlen_bwd.default,
                          (torch.randn_like(q), q, k, v, out, lse, cu_q, cu_k, 9, 9, slopes, 0.25, True))
    q, kc, vc, lens, kn, vn = _kvcache_case(2, 20, 4, 2, 16, 2, 2, torch.float32, lens=[3, 11])
    torch.library.opcheck(torch.ops.mptkernels.attention_with_kvcache.default,
                          (q, kc, vc, lens, kn, vn, None, 0.25, True))


def test_torch_compile_decode_step():
    """A decode step (cache write + attention) compiles into one graph and updates the cache."""
    q, kc, vc, lens, k, v = _kvcache_case(2, 16, 4, 2, 16, 1, 1, torch.float32, lens=[3, 9])
    slopes = reference.alibi_slopes(4)

    def step(q, k, v, kc, vc, lens):
        return ops.attention_with_kvcache(q, kc, vc, lens, k=k, v=v, alibi_slopes=slopes) * 2

    kc2, vc2 = kc.clone(), vc.clone()
    want = step(q, k, v, kc2, vc2, lens)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(q, k, v, kc, vc, lens)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.parametrize("call, match", [
    (lambda t: ops.attention_varlen(t["q"], t["k"], t["v"], t["cu"].long(), t["cu"], 8, 8), "cu_seqlens_q must be a 1-D int32"),
    (lambda t: ops.attention_varlen(t["q"], t["k"], t["v"], t["cu"], t["cu"][:2], 8, 8), "both must be batch"),
    (lambda t: ops.attention_varlen(t["q"][None], t["k"], t["v"], t["cu"], t["cu"], 8, 8), r"q must be a \(total_tokens"),
    (lambda t: ops.attention_varlen(t["q"], t["k"], t["v"], t["cu"], t["cu"], 8, 2.5), "max_seqlen_k must be a non-negative int"),
    # the same length checks on the reference path (float64 takes it) as in the kernels
    (lambda t: ops.attention_varlen(t["q"].double(), t["k"].double(), t["v"].double(), t["cu"], t["cu"], 4, 8),
     "exceeds max_seqlen_q = 4"),
    (lambda t: ops.attention_varlen(t["q"].double(), t["k"].double(), t["v"].double(), t["cu"] + 1, t["cu"], 8, 8),
     "must rise from 0"),
    (lambda t: torch.ops.mptkernels.attention_varlen_fwd(t["q"], t["k"], t["v"], t["cu"], t["cu"], 4, 8, None, 1.0, False),
     "exceeds|max_seqlen given"),
    (lambda t: torch.ops.mptkernels.attention_varlen_fwd(t["q"], t["k"], t["v"], t["cu"].flip(0), t["cu"], 8, 8, None, 1.0,
                                                         False), "cu_seqlens_q must rise from 0"),
    (lambda t: ops.attention_with_kvcache(t["dq"], t["kc"], t["vc"], t["lens"].long()), "cache_seqlens must be an int32"),
    (lambda t: ops.attention_with_kvcache(t["dq"], t["kc"], t["vc"], t["lens"], causal=1),
     "attention_with_kvcache: causal must be True or False, got 1"),
    (lambda t: ops.attention_varlen(t["q"], t["k"], t["v"], t["cu"], t["cu"], 8, 8, causal=None),
     "attention_varlen: causal must be True or False, got None"),
    (lambda t: ops.attention_with_kvcache(t["dq"], t["kc"], t["vc"], t["lens"] + 14, k=t["kn"], v=t["vn"]),
     "does not fit the cache"),
    (lambda t: ops.attention_with_kvcache(t["dq"], t["kc"], t["vc"], t["lens"], k=t["kn"]), "both k and v"),
    (lambda t: ops.attention_with_kvcache(t["dq"], t["kc"].transpose(1, 2).contiguous().transpose(1, 2), t["vc"],
                                          t["lens"]), "k_cache must be contiguous"),
    (lambda t: ops.attention_with_kvcache(t["dq"], t["kc"], t["vc"], t["lens"], k=t["kn"][:, :, :1], v=t["vn"][:, :, :1]),
     r"k must be \(2, seqlen_new, 2, 16\)"),
    (lambda t: ops.attention_with_kvcache(t["dq"], t["kc"].half(), t["vc"].half(), t["lens"]), "one dtype"),
    (lambda t: torch.ops.mptkernels.attention_with_kvcache(t["dq"], t["kc"], t["vc"], t["lens"] + 14, t["kn"], t["vn"], None,
                                                      1.0, True), "does not fit the cache"),
    (lambda t: ops.attention_with_kvcache(t["dq"], t["kc"], t["vc"], t["lens"], k=list(t["kn"]), v=list(t["vn"])),
     "k must be a tensor or None, got list"),
    # no backward: a q that requires grad is refused in grad mode (a silent None gradient otherwise)
    (lambda t: ops.attention_with_kvcache(t["dq"].requires_grad_(), t["kc"], t["vc"], t["lens"]),
     "q requires grad, but attention over a KV cache is for inference"),
    (lambda t: ops.attention_with_kvcache(t["dq"], t["kc"], t["vc"], t["lens"], k=t["kn"].requires_grad_(), v=t["vn"]),
     "k requires grad"),
])
def test_varlen_and_kvcache_bad_input(call, match):
    q, k, v, cu, _, _ = _varlen_case([3, 8], [3, 8], 4, 2, 16, torch.float32)
    dq, kc, vc, lens, kn, vn = _kvcache_case(2, 16, 4, 2, 16, 1, 3, torch.float32, lens=[0, 1])
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(dict(q=q, k=k, v=v, cu=cu, dq=dq, kc=kc, vc=vc, lens=lens, kn=kn, vn=vn))


def test_length_checks_read_each_tensor_version_once(monkeypatch):
    """On the GPU the varlen / kvcache length checks copy the lengths to the host (a sync);
    a model passes one tensor to every layer, so a tensor is read once per version, and an
    in-place change to it (or a new tensor) is checked again."""
    attn = importlib.import_module("mptkernels.ops.attention")
    monkeypatch.setattr(attn, "_checked", attn._CheckedTensors())
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or tolist(t))

    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    for _ in range(4):
        attn._check_lengths(cu, 7, 4, "cu_seqlens_q", "max_seqlen_q")
    assert len(reads) == 1
    with pytest.raises(ValueError, match="exceeds max_seqlen_q = 3"):
        attn._check_lengths(cu, 7, 3, "cu_seqlens_q", "max_seqlen_q")  # other arguments: read again
    cu[2] = 9  # in place: the version moves
    with pytest.raises(ValueError, match="at most 7 tokens"):
        attn._check_lengths(cu, 7, 9, "cu_seqlens_q", "max_seqlen_q")
    attn._check_lengths(torch.tensor([0, 3, 7], dtype=torch.int32), 7, 4, "cu_seqlens_q", "max_seqlen_q")
    assert len(reads) == 4

    k_cache = torch.randn(2, 16, 2, 8)
    lens, new = torch.tensor([3, 5], dtype=torch.int32), torch.randn(2, 1, 2, 8)
    q = torch.randn(2, 1, 2, 8)
    for _ in range(3):
        attn._check_cache_room(q, k_cache, lens, new, None, True, (-1, -1))
    assert len(reads) == 5
    lens += 11  # the decode loop advances the lengths in place: 16 + 1 rows do not fit
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 16 plus 1 new tokens does not fit"):
        attn._check_cache_room(q, k_cache, lens, new, None, True, (-1, -1))
    for view in (lens[:1], lens[1:]):  # views of one storage at different offsets are told apart
        with pytest.raises(ValueError, match="does not fit") if view[0] == 16 else contextlib.nullcontext():
            attn._check_cache_room(q[:1], k_cache, view, new[:1], None, True, (-1, -1))


def test_cpu_decode_path_rows_that_see_no_key():
    # <= 4 query rows take the decode path; with fewer keys than queries (causal, bottom-right)
    # the first rows see none: zeros and lse = -inf
    q, k = torch.randn(2, 4, 4, 16), torch.randn(2, 2, 2, 16)
    v = torch.randn_like(k)
    out, lse = torch.ops.mptkernels.attention_fwd(q, k, v, None, 0.25, True)
    ro, rl = reference.attention(q.double(), k.double(), v.double(), causal=True, softmax_scale=0.25, return_lse=True)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(rl)) and rel_err(out, ro) <= 2e-5


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_varlen_decode_path_and_sequences_without_keys(causal):
    # every sequence <= 4 queries (the decode path), an empty one, and one with queries but no keys
    lens_q, lens_k = [1, 0, 3, 4, 2], [40, 2, 64, 257, 0]
    q, k, v, cu_q, cu_k, slopes = _varlen_case(lens_q, lens_k, 8, 2, 32, torch.float32, alibi="heads", tail=2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ops.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, alibi_slopes=slopes)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = reference.attention_varlen(q64, k64, v64, cu_q, cu_k, causal=causal, alibi_slopes=slopes)
    assert rel_err(out, want) <= 2e-5
    dout = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(want, (q64, k64, v64), dout.double())):
        assert rel_err(g, r) <= 1e-4


# ---------------------------------------------------------------- Triton varlen / decode (interpreter)
@pytest.mark.skipif(HAS_CUDA, reason="interpreter run; on a GPU the gpu tests cover Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal, alibi", [(True, "batch"), (False, "heads")])
def test_triton_interpreter_varlen(dtype, causal, alibi):
    tl_attn = importlib.import_module("mptkernels.triton.attention")
    lens_q, lens_k = [17, 0, 5, 1], [17, 3, 40, 1]
    q, k, v, cu_q, cu_k, slopes = _varlen_case(lens_q, lens_k, 4, 2, 24, dtype, alibi=alibi, tail=2)
    scale = 24 ** -0.5
    out, lse = tl_attn.attention_varlen_fwd(q, k, v, cu_q, cu_k, 17, 40, slopes, scale, causal)
    want, want_lse = reference.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, causal=causal,
                                                alibi_slopes=slopes, return_lse=True)
    assert rel_err(out, want) <= TOL[dtype]
    seen = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    assert torch.allclose(lse[seen], want_lse[seen].float(), atol=1e-3, rtol=1e-4)
    dout = torch.randn_like(q)
    got = tl_attn.attention_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, 17, 40, slopes, scale, causal)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(reference.attention_varlen(q64, k64, v64, cu_q, cu_k, causal=causal, alibi_slopes=slopes),
                              (q64, k64, v64), dout.double())
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert rel_err(g, r) <= GRAD_TOL[dtype], (name, rel_err(g, r))


@pytest.mark.skipif(HAS_CUDA, reason="interpreter run; on a GPU the gpu tests cover Triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])  # fp32 takes the forward kernel
@pytest.mark.parametrize("programs_per_sm", [1, 64])  # one split; many splits + the combine kernel
@pytest.mark.parametrize("shape", [(2, 300, 8, 2, 32, 1, 1), (2, 64, 4, 1, 16, 3, 3), (1, 40, 4, 4, 64, 17, 17)],
                         ids=str)
def test_triton_interpreter_kvcache(monkeypatch, programs_per_sm, shape, dtype):
    tl_attn = importlib.import_module("mptkernels.triton.attention")
    monkeypatch.setattr(tl_attn, "DECODE_PROGRAMS_PER_SM", programs_per_sm)
    b, smax, hq, hk, d, sq, sn = shape
    q, kc, vc, lens, k, v = _kvcache_case(b, smax, hq, hk, d, sq, sn, dtype)
    slopes = reference.alibi_slopes(hq)
    _check_kvcache(q, kc, vc, lens, k, v, True, slopes, TOL[dtype],
                   lambda *a: tl_attn.attention_with_kvcache(*a, slopes, d ** -0.5, True)[0])


@pytest.mark.skipif(HAS_CUDA, reason="interpreter run; on a GPU the gpu tests cover Triton")
def test_triton_interpreter_kvcache_splits_with_several_query_tokens(monkeypatch):
    # flash-decoding with several key splits and 3 query tokens, head_dim 24 (a ragged block)
    tl_attn = importlib.import_module("mptkernels.triton.attention")
    monkeypatch.setattr(tl_attn, "DECODE_PROGRAMS_PER_SM", 64)
    b, smax, hq, hk, d, sq = 2, 300, 8, 2, 24, 3
    kc = torch.randn(b, smax, hk, d, dtype=torch.float16)
    vc = torch.randn_like(kc)
    lens = torch.tensor([100, 250], dtype=torch.int32)
    q = torch.randn(b, sq, hq, d, dtype=torch.float16)
    out, _ = tl_attn.attention_with_kvcache(q, kc, vc, lens, None, None, None, d ** -0.5, True)
    for i in range(b):
        n = int(lens[i])
        ref = reference.attention(q[i:i + 1].double(), kc[i:i + 1, :n].double(), vc[i:i + 1, :n].double(), causal=True)
        assert rel_err(out[i:i + 1], ref) <= 2e-3


# ---------------------------------------------------------------- GPU: varlen, decode, CUDA graphs
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", VARLEN_SHAPES + [([1000, 17, 2048, 1], [1000, 17, 2048, 1], 8, 2, 128)], ids=str)
@pytest.mark.parametrize("causal, alibi", [(True, "heads"), (False, "batch")])
def test_gpu_varlen(dtype, shape, causal, alibi):
    lens_q, lens_k, hq, hk, d = shape
    q, k, v, cu_q, cu_k, slopes = _varlen_case(lens_q, lens_k, hq, hk, d, dtype, device="cuda", alibi=alibi, tail=3)
    _check_varlen(q, k, v, cu_q, cu_k, slopes, causal, dtype, TOL[dtype], GRAD_TOL[dtype],
                  lambda q, k, v: ops.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                                       alibi_slopes=slopes))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", KVCACHE_SHAPES + [(1, 4096, 32, 32, 128, 1, 1), (4, 8192, 32, 8, 128, 1, 1),
                                                    (2, 2048, 32, 4, 64, 4, 4), (1, 512, 16, 16, 256, 1, 1)], ids=str)
def test_gpu_kvcache(dtype, shape):
    b, smax, hq, hk, d, sq, sn = shape
    q, kc, vc, lens, k, v = _kvcache_case(b, smax, hq, hk, d, sq, sn, dtype, device="cuda")
    slopes = reference.alibi_slopes(hq).cuda()
    _check_kvcache(q, kc, vc, lens, k, v, True, slopes, TOL[dtype],
                   lambda *a: ops.attention_with_kvcache(*a[:4], k=a[4], v=a[5], alibi_slopes=slopes))


@pytest.mark.gpu
def test_gpu_decode_step_cuda_graph_and_reduce_overhead():
    """A decode step captured in a CUDA graph, replayed as the cache fills, matches eager; and
    torch.compile(mode="reduce-overhead") of it does too."""
    b, smax, hq, hk, d = 2, 1024, 16, 4, 128
    dt = torch.bfloat16
    kc, vc = (torch.randn(b, smax, hk, d, device="cuda", dtype=dt) for _ in range(2))
    lens = torch.tensor([100, 700], dtype=torch.int32, device="cuda")
    q, kn, vn = (torch.randn(b, 1, h, d, device="cuda", dtype=dt) for h in (hq, hk, hk))
    slopes = reference.alibi_slopes(hq).cuda()

    def step():
        return ops.attention_with_kvcache(q, kc, vc, lens, k=kn, v=vn, alibi_slopes=slopes)

    step()  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    for _ in range(3):
        for t in (q, kn, vn):
            t.copy_(torch.randn_like(t))
        lens += 1
        kc_ref, vc_ref = kc.clone(), vc.clone()
        eager = reference.attention_with_kvcache(q, kc_ref, vc_ref, lens, kn, vn, alibi_slopes=slopes)
        graph.replay()
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
        assert rel_err(static_out, eager) <= TOL[dt]
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        lens += 1
        kc_ref, vc_ref = kc.clone(), vc.clone()
        eager = reference.attention_with_kvcache(q, kc_ref, vc_ref, lens, kn, vn, alibi_slopes=slopes)
        got = compiled().clone()
        assert torch.equal(kc, kc_ref)
        assert rel_err(got, eager) <= TOL[dt]
