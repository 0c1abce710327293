"""Fused attention (causal, ALiBi, GQA): every backend against mptkernels.reference (fp64)."""
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:5], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("alibi", [None, "heads"])
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
    (lambda q, k, v: torch.ops.mptkernels.attention_fwd(q, k[:, :, :3].contiguous(), v[:, :, :3].contiguous(), None,
                                                        1.0, False), "must be a multiple"),
    (lambda q, k, v: torch.ops.mptkernels.attention_fwd(q.transpose(1, 2), k, v, None, 1.0, False), "q must be"),
])
def test_bad_input_names_the_argument(call, match):
    q, k, v, _ = _case((2, 6, 6, 4, 4, 16), torch.float32)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(q, k, v)


def test_non_contiguous_inputs():
    qkv = torch.randn(2, 11, 3, 4, 16)  # fused projection output: q, k, v are strided views
    q, k, v = qkv.unbind(2)
    out = ops.attention(q, k, v, causal=True)
    assert rel_err(out, _reference(q, k, v, None, True)[0]) <= TOL[torch.float32]


# ---------------------------------------------------------------- GPU (the lent machine)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + [(2, 1000, 1000, 8, 1, 64), (1, 2048, 2048, 4, 4, 128)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("alibi", [None, "heads", "batch"])
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
