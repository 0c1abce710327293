"""flash-attn's attention features on the C++ CPU kernels, against mptkernels.reference in float64:
sliding windows, softcap, the log-sum-exp (and gradients through it), non-causal ALiBi, and
attention_with_kvcache's rotary, cache_batch_idx, cache_leftpad and paged caches.
(tests/test_attention_triton_features.py runs the same features on the Triton kernels.)"""
import itertools
import math

import pytest
import torch

import mptkernels
from mptkernels import ops, reference
from conftest import rel_err

TOL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
# the lse of bf16 inputs: scores of bf16 q, k (up to ~|q||k| * 2^-8) against an fp64 reference
LSE_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim): Sq == Sk, Sq < Sk (a cache), Sq > Sk
# (rows that see nothing), GQA 2 and 4, lengths over one 64-key tile and odd
SHAPES = [(2, 19, 19, 4, 2, 16), (1, 5, 71, 4, 1, 24), (1, 130, 97, 2, 2, 64)]
# (left, right): a single key, the key and its left neighbour, both sides, one-sided both
# ways, and wider than any sequence
WINDOWS = [(0, 0), (1, 0), (3, 2), (-1, 2), (5, -1), (40, 7), (1000, 1000)]


def _qkv(shape, dtype, alibi=None, grad=False):
    b, sq, sk, hq, hk, d = shape
    q, k, v = (torch.randn(b, s, h, d, dtype=dtype).requires_grad_(grad) for s, h in ((sq, hq), (sk, hk), (sk, hk)))
    slopes = None
    if alibi == "heads":
        slopes = reference.alibi_slopes(hq)
    elif alibi == "batch":
        slopes = reference.alibi_slopes(hq).repeat(b, 1) * (torch.rand(b, 1) + 0.5)
    return q, k, v, slopes


def _check_out_lse(out, lse, ref_out, ref_lse, dtype):
    assert out.dtype == dtype and rel_err(out, ref_out) <= TOL[dtype], rel_err(out, ref_out)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen), "rows that see no key: lse -inf, and only those"
    assert (lse[~seen] == -math.inf).all()
    if seen.any():
        assert torch.allclose(lse[seen].double(), ref_lse[seen].double(), atol=LSE_TOL[dtype], rtol=0)


def _grads_with_lse(fn, inputs, dout, dlse):
    """Gradients of <out, dout> + <lse, dlse> (lse's -inf rows carry no gradient)."""
    out, lse = fn(*inputs)
    loss = (out.double() * dout).sum() + (torch.where(torch.isfinite(lse), lse, 0).double() * dlse).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softcap, alibi", [(0.0, None), (0.0, "batch"), (4.0, None), (2.5, "heads")])
def test_window_softcap_alibi_forward_lse_and_gradients(dtype, shape, window, causal, softcap, alibi):
    q, k, v, slopes = _qkv(shape, dtype, alibi, grad=True)
    kw = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes, return_lse=True)
    with mptkernels.backend("cpu"):
        out, lse = ops.attention(q, k, v, **kw)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference.attention(q64, k64, v64, **kw)
    _check_out_lse(out, lse, ref_out.detach(), ref_lse.detach(), dtype)
    # a gradient through both outputs (lse's: merging partial attentions)
    dout, dlse = torch.randn(out.shape, dtype=torch.float64), torch.randn(lse.shape, dtype=torch.float64)
    with mptkernels.backend("cpu"):
        got = _grads_with_lse(lambda q, k, v: ops.attention(q, k, v, **kw), (q, k, v), dout, dlse)
    want = _grads_with_lse(lambda q, k, v: reference.attention(q, k, v, **kw), (q64, k64, v64), dout, dlse)
    for g, w, name in zip(got, want, "qkv"):
        assert g.dtype == dtype and rel_err(g, w) <= GRAD_TOL[dtype], (name, rel_err(g, w))


def test_causal_overrides_the_right_window_as_in_flash_attn():
    """HF passes window_size=(w, w) with causal=True for Mistral: causal keeps right = 0."""
    q, k, v, _ = _qkv((1, 33, 33, 2, 2, 16), torch.float32)
    a = ops.attention(q, k, v, causal=True, window_size=(6, 6))
    assert torch.equal(a, ops.attention(q, k, v, causal=True, window_size=(6, 0)))
    assert torch.equal(a, ops.attention(q, k, v, causal=False, window_size=(6, 0)))


def test_non_causal_alibi_is_minus_slope_times_distance():
    """flash-attn's and llm-foundry's non-causal ALiBi, -slope * |i + Sk - Sq - j|, from its own
    formula (k = 0: every score is the bias alone), not from the reference."""
    sq, sk, h, d = 3, 8, 2, 16
    q, v = torch.randn(1, sq, h, d), torch.randn(1, sk, h, d)
    k = torch.zeros(1, sk, h, d)
    slopes = torch.tensor([0.5, 0.125])
    out = ops.attention(q, k, v, alibi_slopes=slopes)
    for i, hh in itertools.product(range(sq), range(h)):
        w = torch.tensor([-slopes[hh] * abs(i + sk - sq - j) for j in range(sk)]).softmax(0)
        assert torch.allclose(out[0, i, hh], w @ v[0, :, hh], atol=1e-6)
    # causal: unchanged, MPT's slope * (j - i - (Sk - Sq)) over the visible keys
    causal = ops.attention(q, k, v, alibi_slopes=slopes, causal=True)
    w = torch.tensor([slopes[0] * (j - 0 - (sk - sq)) for j in range(sk - sq + 1)]).softmax(0)
    assert torch.allclose(causal[0, 0, 0], w @ v[0, :sk - sq + 1, 0], atol=1e-6)


def test_softcap_with_alibi_caps_the_scores_before_the_bias():
    """Gemma 2's cap on the scaled scores, then the bias: with large scores the capped call
    equals softmax(cap * tanh(s / cap) - slope |rel|) written out by hand."""
    q, k, v, _ = _qkv((1, 4, 9, 1, 1, 8), torch.float64)
    q = q * 10
    slopes = torch.tensor([0.3])
    out = ops.attention(q, k, v, softcap=2.0, alibi_slopes=slopes, softmax_scale=0.5)
    s = 0.5 * q[0, :, 0] @ k[0, :, 0].T
    rel = torch.arange(9).view(1, -1) - torch.arange(4).view(-1, 1) - 5
    want = (2.0 * torch.tanh(s / 2.0) - 0.3 * rel.abs()).softmax(-1) @ v[0, :, 0]
    assert torch.allclose(out[0, :, 0], want, atol=1e-12)


def test_sliding_window_equals_attention_over_the_window_slice():
    """Mistral's layer: causal with window (w, 0); every row attends to exactly its last w + 1
    keys, computed here by slicing, independently of the masks."""
    w = 5
    q, k, v, _ = _qkv((1, 23, 23, 2, 1, 32), torch.float32)
    out = ops.attention(q, k, v, causal=True, window_size=(w, 0))
    for i in range(23):
        lo = max(0, i - w)
        want = ops.attention(q[:, i:i + 1], k[:, lo:i + 1], v[:, lo:i + 1], causal=True)
        assert torch.allclose(out[:, i:i + 1], want, atol=1e-6)


def test_lse_merges_partial_attentions_and_their_gradients():
    """Attention over two halves of the keys merged by their lse (ring / split-KV attention)
    equals attention over all keys, forward and backward (the gradient flows through lse)."""
    q, k, v, _ = _qkv((2, 37, 80, 4, 2, 32), torch.float32, grad=True)

    def merged(q, k, v):
        o1, l1 = ops.attention(q, k[:, :30], v[:, :30], return_lse=True)
        o2, l2 = ops.attention(q, k[:, 30:], v[:, 30:], return_lse=True)
        lse = torch.logaddexp(l1, l2)  # (B, H, Sq)
        w1, w2 = (torch.exp(l - lse).transpose(1, 2).unsqueeze(-1) for l in (l1, l2))
        return w1 * o1 + w2 * o2

    dout = torch.randn(q.shape)
    got = torch.autograd.grad(merged(q, k, v), (q, k, v), dout)
    full = ops.attention(q, k, v)
    assert rel_err(merged(q, k, v), full) <= 1e-5
    want = torch.autograd.grad(full, (q, k, v), dout)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-4


# ---- varlen
def _varlen(lens_q, lens_k, hq, hk, d, dtype, alibi=False):
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32)
    q = torch.randn(sum(lens_q) + 2, hq, d, dtype=dtype, requires_grad=True)  # 2 rows past the last sequence
    k = torch.randn(sum(lens_k), hk, d, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), hk, d, dtype=dtype, requires_grad=True)
    return q, k, v, cu_q, cu_k, reference.alibi_slopes(hq) if alibi else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [(0, 0), (2, 1), (-1, 3), (70, -1)], ids=str)
@pytest.mark.parametrize("causal, softcap, alibi", [(True, 0.0, True), (False, 3.0, True), (True, 5.0, False)])
def test_varlen_window_softcap(dtype, window, causal, softcap, alibi):
    q, k, v, cu_q, cu_k, slopes = _varlen([7, 0, 66, 3], [7, 4, 80, 1], 4, 2, 16, dtype, alibi)
    kw = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes)
    out, lse = ops.attention_varlen(q, k, v, cu_q, cu_k, 66, 80, return_lse=True, **kw)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference.attention_varlen(q64, k64, v64, cu_q, cu_k, return_lse=True, **kw)
    _check_out_lse(out, lse, ref_out.detach(), ref_lse.detach(), dtype)
    dout, dlse = torch.randn(out.shape, dtype=torch.float64), torch.randn(lse.shape, dtype=torch.float64)
    got = _grads_with_lse(lambda q, k, v: ops.attention_varlen(q, k, v, cu_q, cu_k, 66, 80, return_lse=True, **kw),
                          (q, k, v), dout, dlse)
    want = _grads_with_lse(lambda q, k, v: reference.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw),
                           (q64, k64, v64), dout, dlse)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= GRAD_TOL[dtype]


# ---- the KV cache
def _poisoned(shape, dtype):
    """A cache whose every row is NaN until written: a kernel that reads a row outside a
    sequence's range (or an unwritten page) turns the output into NaN."""
    return torch.full(shape, math.nan, dtype=dtype)


def _cache_case(layout, lens, pad, sn, sq, hq, hk, d, dtype, block=5, seqlen=40, extra_rows=2):
    """Caches holding random rows [pad[b], lens[b]) of each sequence (NaN elsewhere) in one of
    the layouts: "contiguous", "batch_idx" (rows of a larger cache, permuted) or "paged"
    (random distinct pages of `block` rows, a block table wider than needed)."""
    b = len(lens)
    kw, where = {}, {}
    if layout == "paged":
        per_seq = -(-seqlen // block)
        pages = torch.randperm(b * per_seq + 3).to(torch.int32)  # 3 pages nobody owns
        kw["block_table"] = pages[:b * per_seq].view(b, per_seq).contiguous()
        shape = (b * per_seq + 3, block)
    elif layout == "batch_idx":
        kw["cache_batch_idx"] = torch.randperm(b + extra_rows)[:b].to(torch.int32)
        shape = (b + extra_rows, seqlen)
    else:
        shape = (b, seqlen)
    kc, vc = _poisoned(shape + (hk, d), dtype), _poisoned(shape + (hk, d), dtype)
    for i in range(b):
        where[i] = reference.cache_rows(i, list(range(pad[i], lens[i])), kw.get("cache_batch_idx"),
                                        kw.get("block_table"), block)
        n = lens[i] - pad[i]
        kc[where[i]] = torch.randn(n, hk, d, dtype=dtype)
        vc[where[i]] = torch.randn(n, hk, d, dtype=dtype)
    if any(pad):
        kw["cache_leftpad"] = torch.tensor(pad, dtype=torch.int32)
    q = torch.randn(b, sq, hq, d, dtype=dtype)
    k = torch.randn(b, sn, hk, d, dtype=dtype) if sn else None
    v = torch.randn(b, sn, hk, d, dtype=dtype) if sn else None
    return q, kc, vc, torch.tensor(lens, dtype=torch.int32), k, v, kw


def _check_kvcache(q, kc, vc, lens, k, v, dtype, **kw):
    kc_ref, vc_ref = kc.double(), vc.double()
    with mptkernels.backend("cpu"):
        out, lse = ops.attention_with_kvcache(q, kc, vc, lens, k=k, v=v, return_lse=True, **kw)
    ref_out, ref_lse = reference.attention_with_kvcache(
        q.double(), kc_ref, vc_ref, lens, None if k is None else k.double(), None if v is None else v.double(),
        return_lse=True, **kw)
    # the caches: new rows written (rotated, rounded to the cache's dtype), every other row as it was (NaN stays NaN)
    assert torch.equal(torch.isnan(kc), torch.isnan(kc_ref)) and torch.equal(torch.isnan(vc), torch.isnan(vc_ref))
    ok = ~torch.isnan(kc_ref)
    assert rel_err(kc[ok], kc_ref[ok]) <= TOL[dtype] and torch.equal(vc[ok].double(), vc_ref[ok])
    if "rotary_cos" in kw and dtype == torch.bfloat16:
        # the kernel attends with q and k rotated and rounded to bf16, the reference with them exact
        assert rel_err(out, ref_out) <= 2 * TOL[dtype]
        seen = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), seen)
        assert torch.allclose(lse[seen].double(), ref_lse[seen].double(), atol=5e-2, rtol=0)
    else:
        _check_out_lse(out, lse, ref_out, ref_lse, dtype)
    return out


KV_LAYOUTS = ["contiguous", "batch_idx", "paged"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", KV_LAYOUTS)
@pytest.mark.parametrize("sq, sn", [(1, 1), (3, 0), (2, 2), (9, 9)])  # decode path (<= 4 rows) and prefill path
@pytest.mark.parametrize("leftpad", [False, True])
@pytest.mark.parametrize("causal, window, softcap, alibi", [
    (True, (-1, -1), 0.0, True), (True, (4, 0), 0.0, False), (False, (-1, -1), 3.0, True), (False, (2, 3), 0.0, True)])
def test_kvcache_layouts_windows_softcap(dtype, layout, sq, sn, leftpad, causal, window, softcap, alibi):
    lens, pad = [11, 0, 23], ([3, 0, 17] if leftpad else [0, 0, 0])
    q, kc, vc, lens, k, v, kw = _cache_case(layout, lens, pad, sn, sq, 4, 2, 16, dtype)
    kw.update(causal=causal, window_size=window, softcap=softcap,
              alibi_slopes=reference.alibi_slopes(4) if alibi else None)
    _check_kvcache(q, kc, vc, lens, k, v, dtype, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", KV_LAYOUTS)
@pytest.mark.parametrize("sq, causal, window", [(1, True, (-1, -1)), (3, True, (5, 0)), (3, False, (-1, -1)),
                                                (6, False, (2, 2))])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_kvcache_rotary_inside_the_call(dtype, layout, sq, causal, window, interleaved, rotary_dim):
    """q and the new k rotated at each sequence's position (flash-attn: k at cache_seqlens + t,
    q the same when causal or windowed, else all of q at cache_seqlens), left padding counted."""
    q, kc, vc, lens, k, v, kw = _cache_case(layout, [11, 2, 23], [3, 0, 0], sq, sq, 4, 2, 16, dtype)
    cos, sin = reference.rotary_cos_sin(40, rotary_dim)
    kw.update(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved, causal=causal, window_size=window)
    _check_kvcache(q, kc, vc, lens, k, v, dtype, **kw)


def test_kvcache_rotary_equals_rotating_first():
    """Rotary inside the call = ops.apply_rotary on q and k at cache_seqlens, then the call."""
    q, kc, vc, lens, k, v, _ = _cache_case("contiguous", [11, 2, 23], [0, 0, 0], 2, 2, 4, 2, 32, torch.float32)
    cos, sin = reference.rotary_cos_sin(40, 32)
    kc2, vc2 = kc.clone(), vc.clone()
    got = ops.attention_with_kvcache(q, kc, vc, lens, k=k, v=v, rotary_cos=cos, rotary_sin=sin,
                                     rotary_interleaved=False)
    rq, rk = (ops.apply_rotary(t, cos, sin, seqlen_offsets=lens) for t in (q, k))
    want = ops.attention_with_kvcache(rq, kc2, vc2, lens, k=rk, v=v)
    assert torch.equal(got, want) and torch.equal(kc.nan_to_num(7), kc2.nan_to_num(7))


@pytest.mark.parametrize("block", [1, 3, 5, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_equals_the_contiguous_cache(block, dtype):
    """The same keys in pages or in one contiguous cache give the same bits (decode reads the
    pages in place; the tiles see the same keys in the same order)."""
    lens = [70, 1, 33]
    q, kc, vc, lens_t, k, v, kw = _cache_case("paged", lens, [0, 0, 0], 1, 1, 8, 2, 64, dtype, block=block,
                                              seqlen=72)
    flat_k, flat_v = _poisoned((3, 72, 2, 64), dtype), _poisoned((3, 72, 2, 64), dtype)
    for b, n in enumerate(lens):
        where = reference.cache_rows(b, list(range(n)), None, kw["block_table"], block)
        flat_k[b, :n], flat_v[b, :n] = kc[where], vc[where]
    paged = ops.attention_with_kvcache(q, kc, vc, lens_t, k=k, v=v, **kw)
    flat = ops.attention_with_kvcache(q, flat_k, flat_v, lens_t, k=k, v=v)
    assert torch.equal(paged, flat)


def test_cache_batch_idx_repeated_rows():
    """Two sequences reading one cache row (a shared prompt) see the same keys; the third row of
    the cache is read by nobody and stays NaN-free of consequence."""
    q, kc, vc, lens, _, _, kw = _cache_case("batch_idx", [9, 9, 9], [0, 0, 0], 0, 1, 4, 2, 16, torch.float32)
    kw["cache_batch_idx"] = torch.tensor([2, 2, 0], dtype=torch.int32)
    kc[2, :9], vc[2, :9] = torch.randn(9, 2, 16), torch.randn(9, 2, 16)
    kc[0, :9], vc[0, :9] = torch.randn(9, 2, 16), torch.randn(9, 2, 16)
    _check_kvcache(q, kc, vc, lens, None, None, torch.float32, **kw)
    q[1] = q[0]
    out = ops.attention_with_kvcache(q, kc, vc, lens, **kw)
    assert torch.equal(out[0], out[1])


def test_kvcache_opcheck_and_compile_with_every_feature():
    q, kc, vc, lens, k, v, kw = _cache_case("paged", [11, 2, 23], [3, 0, 0], 1, 1, 4, 2, 16, torch.float32)
    kc, vc = kc.nan_to_num(0), vc.nan_to_num(0)  # opcheck compares copies of the caches; NaN != NaN
    cos, sin = reference.rotary_cos_sin(40, 16)
    torch.library.opcheck(torch.ops.mptkernels.attention_with_kvcache.default,
                          (q, kc, vc, lens, k, v, reference.alibi_slopes(4), 0.25, True, 5, 0, 2.0, cos, sin, True,
                           None, kw["cache_leftpad"], kw["block_table"]))

    def step(q, k, v, kc, vc):
        out, lse = ops.attention_with_kvcache(q, kc, vc, lens, k=k, v=v, rotary_cos=cos, rotary_sin=sin,
                                              window_size=(5, 0), softcap=2.0, return_lse=True, **kw)
        return out * 2, lse

    kc2, vc2 = kc.clone(), vc.clone()
    want = step(q, k, v, kc2, vc2)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(q, k, v, kc, vc)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(kc, kc2)


def test_opcheck_window_softcap_dlse():
    q, k, v, slopes = _qkv((1, 9, 13, 4, 2, 16), torch.float32, "heads")
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), slopes, 0.25, True, 3, 0, 2.0)
    torch.library.opcheck(torch.ops.mptkernels.attention_fwd.default, args)
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = torch.ops.mptkernels.attention_fwd(q, k, v, slopes, 0.25, False, 3, 2, 2.0)
    torch.library.opcheck(torch.ops.mptkernels.attention_bwd.default,
                          (torch.randn_like(q), q, k, v, out, lse, slopes, 0.25, False, 3, 2, 2.0, torch.randn_like(lse)))
    q, k, v, cu_q, cu_k, slopes = _varlen([5, 0, 9], [7, 2, 9], 4, 2, 16, torch.float32, True)
    torch.library.opcheck(torch.ops.mptkernels.attention_varlen_fwd.default,
                          (q, k, v, cu_q, cu_k, 9, 9, slopes, 0.25, True, 2, 0, 3.0))
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = torch.ops.mptkernels.attention_varlen_fwd(q, k, v, cu_q, cu_k, 9, 9, slopes, 0.25, True, 2, 0, 3.0)
    torch.library.opcheck(torch.ops.mptkernels.attention_varlen_bwd.default,
                          (torch.randn_like(q), q, k, v, out, lse, cu_q, cu_k, 9, 9, slopes, 0.25, True, 2, 0, 3.0,
                           torch.randn_like(lse)))


def test_compiled_window_softcap_lse_trains():
    q, k, v, slopes = _qkv((2, 21, 21, 4, 2, 16), torch.float32, "heads", grad=True)

    def f(q, k, v):
        out, lse = ops.attention(q, k, v, causal=True, window_size=(4, 4), softcap=3.0, alibi_slopes=slopes,
                                 return_lse=True)
        return out.sum() + lse.sum()

    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v), (q, k, v))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6)


# ---- errors name what is wrong
def _bad(**over):
    q, kc, vc, lens, k, v, kw = _cache_case("contiguous", [3, 5], [0, 0], 1, 1, 4, 2, 16, torch.float32, seqlen=8)
    args = dict(k=k, v=v, **kw)
    args.update(over)
    return lambda: ops.attention_with_kvcache(q, kc, vc, lens, **args)


def _paged_bad(lens=(3, 5), **over):
    q, kc, vc, lens, k, v, kw = _cache_case("paged", list(lens), [0, 0], 1, 1, 4, 2, 16, torch.float32, block=4,
                                            seqlen=8)
    args = dict(k=k, v=v, **kw)
    args.update(over)
    return lambda: ops.attention_with_kvcache(q, kc, vc, lens, **args)


_q = torch.randn(1, 4, 2, 16)
COS, SIN = reference.rotary_cos_sin(8, 16)


@pytest.mark.parametrize("call, match", [
    (lambda: ops.attention(_q, _q, _q, window_size=(-2, 0)), r"window_size must be \(left, right\).*got \(-2, 0\)"),
    (lambda: ops.attention(_q, _q, _q, window_size=4), r"window_size must be \(left, right\).*got 4"),
    (lambda: ops.attention(_q, _q, _q, window_size=(1.5, 0)), r"window_size .* got \(1.5, 0\)"),
    (lambda: ops.attention(_q, _q, _q, window_size=(True, 0)), r"window_size .* got \(True, 0\)"),
    (lambda: ops.attention(_q, _q, _q, softcap=-1.0), "softcap must be a finite number >= 0.*got -1.0"),
    (lambda: ops.attention(_q, _q, _q, softcap=math.nan), "softcap must be .*got nan"),
    (lambda: ops.attention(_q, _q, _q, return_lse=1), "return_lse must be True or False, got 1"),
    (lambda: ops.attention_varlen(_q[0], _q[0], _q[0], torch.tensor([0, 4], dtype=torch.int32),
                                  torch.tensor([0, 4], dtype=torch.int32), 4, 4, window_size=(0,)),
     "attention_varlen: window_size"),
    (_bad(rotary_cos=COS), "give both rotary_cos and rotary_sin"),
    (_bad(k=None, v=None, rotary_cos=COS, rotary_sin=SIN), "rotary_cos/rotary_sin rotate the new k.*need k and v"),
    (_bad(rotary_cos=torch.zeros(8, 9), rotary_sin=torch.zeros(8, 9)), r"rotary_cos must be \(seqlen_ro, rotary_dim"),
    (_bad(rotary_cos=COS[:4], rotary_sin=SIN[:4]), "rotary_cos has 4 rows, but cache_seqlens.* up to 5"),
    (_bad(rotary_interleaved="yes"), "rotary_interleaved must be True or False"),
    (_bad(cache_leftpad=torch.tensor([4, 0], dtype=torch.int32)), r"cache_leftpad\[0\] = 4 must be in \[0, "),
    (_bad(cache_leftpad=torch.tensor([0, 0])), r"cache_leftpad must be an int32 \(2,\) tensor, got torch.int64"),
    (_bad(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)), r"cache_batch_idx\[1\] = 2 is not a row"),
    (_bad(cache_batch_idx=torch.tensor([0], dtype=torch.int32)), r"cache_batch_idx must be an int32 \(2,\)"),
    (_paged_bad(cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32)),
     "cache_batch_idx and block_table cannot be combined"),
    (_paged_bad(block_table=torch.zeros(2, 2)), r"block_table must be an int32 \(2, max_blocks_per_seq\)"),
    (_paged_bad(block_table=torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)),
     "block_table.1. holds page 9, outside the 7 pages"),
    (_paged_bad(lens=(3, 7), block_table=torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)),
     "sequences 0 and 1 both write row 3 of page 0"),
    (_paged_bad(block_table=torch.tensor([[0], [2]], dtype=torch.int32)),
     r"cache_seqlens\[1\] = 5 plus 1 new tokens does not fit the 1 pages of 4 rows of block_table"),
])
def test_bad_feature_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
