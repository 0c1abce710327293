"""Rotary embedding: every backend against mptkernels.reference."""
import pytest
import torch

import mptkernels
from mptkernels import ops, reference
from conftest import rel_err

TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# the C++ kernel rounds once, as the reference: measured <= 9e-6 (fp16), 3.5e-5 (bf16); tables
# rounded to x's dtype (a plausible bug) give ~1e-4 / 1e-3, which TOL would let through
CPU_TOL = {**TOL, torch.float16: 5e-5, torch.bfloat16: 2e-4}


def _case(dtype, device, batch=2, seqlen=17, heads=3, head_dim=40, rotary_dim=24, table=300):
    x = torch.randn(batch, seqlen, heads, head_dim, dtype=dtype, device=device)
    cos, sin = reference.rotary_cos_sin(table, rotary_dim, device=device)
    return x, cos, sin


def _offsets_cases(batch, device):
    return [0, 5, torch.tensor([0, 7, 3, 11][:batch], dtype=torch.int32, device=device),
            torch.tensor([2, 0, 9, 1][:batch], dtype=torch.int64, device=device)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 8, 8), (2, 17, 3, 40, 24), (3, 129, 2, 64, 64), (1, 5, 4, 130, 2)])
def test_cpu_matches_reference(dtype, interleaved, shape):
    b, s, h, d, r = shape
    x, cos, sin = _case(dtype, "cpu", b, s, h, d, r)
    for offsets in _offsets_cases(b, "cpu"):
        out = ops.apply_rotary(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
        ref = reference.apply_rotary(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert rel_err(out, ref) <= CPU_TOL[dtype]
        assert torch.equal(out[..., r:], x[..., r:]), "features past rotary_dim must pass through unchanged"


def test_strided_views_of_a_fused_qkv():
    qkv = torch.randn(2, 9, 3, 4, 32)  # (batch, seqlen, q|k|v, heads, head_dim) as a fused projection gives
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    cos, sin = reference.rotary_cos_sin(16, 32)
    assert not q.is_contiguous()
    for t in (q, k, qkv.transpose(2, 3)[..., 0, :], torch.randn(2, 9, 1, 32).expand(2, 9, 3, 32)):
        assert rel_err(ops.apply_rotary(t, cos, sin), reference.apply_rotary(t, cos, sin)) <= 1e-6
    xt = torch.randn(2, 32, 9, 4).permute(0, 2, 3, 1)  # head_dim not innermost in memory
    assert rel_err(ops.apply_rotary(xt, cos, sin), reference.apply_rotary(xt, cos, sin)) <= 1e-6


def test_rotation_is_invertible_and_norm_preserving():
    x, cos, sin = _case(torch.float64, "cpu", rotary_dim=40)
    out = ops.apply_rotary(x, cos, sin, seqlen_offsets=3)
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1))
    back = torch.ops.mptkernels.apply_rotary(out, cos, sin, None, 3, False, True)  # conjugate: the inverse
    assert torch.allclose(back, x)


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_fp64(interleaved):
    x, cos, sin = _case(torch.float64, "cpu", 2, 5, 2, 12, 8, 20)
    x.requires_grad_()
    for offsets in (2, torch.tensor([1, 4], dtype=torch.int32)):
        assert torch.autograd.gradcheck(
            lambda x: ops.apply_rotary(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference(dtype):
    x, cos, sin = _case(dtype, "cpu")
    x.requires_grad_()
    dy = torch.randn(x.shape, dtype=dtype)
    (g,) = torch.autograd.grad((ops.apply_rotary(x, cos, sin, seqlen_offsets=4) * dy).sum(), x)
    x64 = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad((reference.apply_rotary(x64, cos, sin, seqlen_offsets=4) * dy.double()).sum(), x64)
    assert g.dtype == dtype and rel_err(g, ref) <= 2 * TOL[dtype]


def test_opcheck():
    x, cos, sin = _case(torch.float32, "cpu")
    for offsets, off in ((None, 3), (torch.tensor([1, 2], dtype=torch.int32), 0)):
        for interleaved in (False, True):
            torch.library.opcheck(torch.ops.mptkernels.apply_rotary.default,
                                  (x.clone().requires_grad_(), cos, sin, offsets, off, interleaved, False))


def test_torch_compile_fullgraph():
    x, cos, sin = _case(torch.float32, "cpu")
    rope = mptkernels.nn.RotaryEmbedding(24, max_seqlen=64)

    def f(q, k, offsets):
        q, k = rope(q, k, seqlen_offsets=offsets)
        return ops.layer_norm(q, None) + k

    k = torch.randn_like(x)
    offs = torch.tensor([3, 1], dtype=torch.int32)
    want = f(x, k, offs)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, k, offs)
    assert torch.equal(got, want)


def test_rotary_embedding_module():
    rope = mptkernels.nn.RotaryEmbedding(16, max_seqlen=8)
    q, k = torch.randn(2, 5, 4, 32), torch.randn(2, 5, 1, 32)
    q2, k2 = rope(q, k, seqlen_offsets=6)  # needs 11 rows: the tables grow
    cos, sin = reference.rotary_cos_sin(11, 16)
    assert rel_err(q2, reference.apply_rotary(q, cos, sin, seqlen_offsets=6)) <= 1e-6
    assert rel_err(k2, reference.apply_rotary(k, cos, sin, seqlen_offsets=6)) <= 1e-6
    assert rope.state_dict() == {}
    with pytest.raises(ValueError, match="must be a positive even number"):
        mptkernels.nn.RotaryEmbedding(15)


def test_rotary_embedding_tables_stay_float32_and_survive_to_empty():
    want = mptkernels.nn.RotaryEmbedding(16, max_seqlen=8)
    rope = mptkernels.nn.RotaryEmbedding(16, max_seqlen=8).to(torch.bfloat16)  # a model cast: tables kept exact
    assert rope.cos.dtype == torch.float32 and torch.equal(rope.cos, want.cos) and torch.equal(rope.sin, want.sin)
    for made_on in ("cpu", "meta"):  # to_empty leaves buffers uninitialised: the tables are kept or made anew
        rope = mptkernels.nn.RotaryEmbedding(16, max_seqlen=8, device=made_on).to_empty(device="cpu")
        assert torch.equal(rope.cos, want.cos) and torch.equal(rope.sin, want.sin)


@pytest.mark.parametrize("call, match", [
    (lambda x, c, s: ops.apply_rotary(x, c[:10], s[:10], seqlen_offsets=0), "cos/sin have 10 rows but .* needs 17"),
    (lambda x, c, s: ops.apply_rotary(x, c, s, seqlen_offsets=290), "needs 307"),
    (lambda x, c, s: ops.apply_rotary(x, c, s, seqlen_offsets=-1), "seqlen_offsets=-1"),
    (lambda x, c, s: ops.apply_rotary(x, c, s, seqlen_offsets=torch.tensor([0, 290], dtype=torch.int32)),
     "outside the cos/sin table of 300 rows"),
    (lambda x, c, s: ops.apply_rotary(x, c, s, seqlen_offsets=torch.tensor([0, 1, 2])), r"\(2,\) integer tensor"),
    (lambda x, c, s: ops.apply_rotary(x, c, s, seqlen_offsets=torch.tensor([-1, 0])),
     r"holds -1, which puts tokens at rows \[-1, 16\), outside the cos/sin table of 300 rows"),
    # int64 offsets that an int32 cast would wrap back into the table
    (lambda x, c, s: ops.apply_rotary(x, c, s, seqlen_offsets=torch.tensor([2**32 + 1, 0])), "holds 4294967297"),
    (lambda x, c, s: ops.apply_rotary(x, c, s, seqlen_offsets=torch.tensor([2**31 + 5, 0])), "holds 2147483653"),
    (lambda x, c, s: ops.apply_rotary(x, c, s, seqlen_offsets=torch.tensor([0.0, 1.0])), "integer tensor"),
    (lambda x, c, s: ops.apply_rotary(x, c, s, seqlen_offsets=torch.tensor([True, False])), "integer tensor"),
    (lambda x, c, s: ops.apply_rotary(x, c, s[:, :5]), "must have one shape"),
    (lambda x, c, s: ops.apply_rotary(x[..., :20], c, s), "rotary_dim = 2 \\* cos.shape\\[1\\] = 24 exceeds head_dim 20"),
    (lambda x, c, s: ops.apply_rotary(x[0], c, s), r"x must be a \(batch, seqlen, heads, head_dim\)"),
    (lambda x, c, s: ops.apply_rotary(x.int(), c, s), "x must be float32"),
    (lambda x, c, s: ops.apply_rotary(x, c.requires_grad_(), s), "cos requires grad"),
    (lambda x, c, s: reference.rotary_cos_sin(10, 7), "rotary_dim must be an even int"),
    (lambda x, c, s: ops.rotary_cos_sin(-1, 8), "max_seqlen must be an int >= 0, got -1"),
    (lambda x, c, s: torch.ops.mptkernels.apply_rotary(x, c.double(), s, None, 0, False, False), "cos must be a contiguous float32"),
    # the kernel's own check: a negative position is as bad as one past the table
    (lambda x, c, s: torch.ops.mptkernels.apply_rotary(x, c, s, torch.tensor([-3, 0], dtype=torch.int32), 0, False, False),
     "position -[123], outside the cos/sin table of 300 rows"),
    (lambda x, c, s: torch.ops.mptkernels.apply_rotary(x, c, s, torch.tensor([0, 290], dtype=torch.int32), 0, False, False),
     "position 3[01][0-9], outside the cos/sin table of 300 rows"),
])
def test_bad_input_names_the_argument(call, match):
    x, cos, sin = _case(torch.float32, "cpu")
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(x, cos, sin)


def test_compiled_out_of_table_tensor_offsets_raise():
    # under torch.compile the offsets are clamped (no data-dependent check in the graph); the
    # clamp must keep an int64 offset that an int32 cast would wrap out of the table
    x, cos, sin = _case(torch.float32, "cpu")
    f = torch.compile(lambda x, o: ops.apply_rotary(x, cos, sin, seqlen_offsets=o), fullgraph=True)
    assert rel_err(f(x, torch.tensor([3, 0])), reference.apply_rotary(x, cos, sin, seqlen_offsets=torch.tensor([3, 0]))) <= 1e-6
    for bad in ([2**32 + 1, 0], [0, -2**31 - 7]):
        with pytest.raises(RuntimeError, match="outside the cos/sin table of 300 rows"):
            f(x, torch.tensor(bad))


@pytest.mark.parametrize("shape", [(0, 3, 2, 8), (2, 0, 2, 8), (2, 3, 0, 8)])
def test_empty_input_and_its_gradient(shape):
    cos, sin = reference.rotary_cos_sin(8, 8)
    # an expanded empty tensor: torch calls it contiguous although its strides are 0
    for x in (torch.randn(shape), torch.randn(*shape[:3], 1).expand(shape)):
        x = x.detach().requires_grad_()
        out = ops.apply_rotary(x, cos, sin, seqlen_offsets=torch.zeros(shape[0], dtype=torch.int32))
        assert out.shape == x.shape
        out.sum().backward()
        assert x.grad.shape == x.shape


# ---------------------------------------------------------------- GPU (the lent machine)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 8, 8), (2, 17, 3, 40, 24), (3, 129, 2, 64, 64), (2, 257, 32, 128, 128),
                                   (1, 5, 4, 130, 2)])
def test_gpu_matches_reference(dtype, interleaved, shape):
    b, s, h, d, r = shape
    x, cos, sin = _case(dtype, "cuda", b, s, h, d, r)
    for offsets in _offsets_cases(b, "cuda"):
        out = ops.apply_rotary(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
        ref = reference.apply_rotary(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
        assert rel_err(out, ref) <= TOL[dtype]
        assert torch.equal(out[..., r:], x[..., r:])
    q = torch.randn(b, s, 3, h, d, dtype=dtype, device="cuda")[:, :, 1]  # strided view
    assert rel_err(ops.apply_rotary(q, cos, sin), reference.apply_rotary(q, cos, sin)) <= TOL[dtype]


@pytest.mark.gpu
def test_gpu_out_of_table_tensor_offset_gives_nan():
    x, cos, sin = _case(torch.float32, "cuda")
    out = ops.apply_rotary(x, cos, sin, seqlen_offsets=torch.tensor([0, 295], dtype=torch.int32, device="cuda"))
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1, 5:, :, :24]).all() and torch.isfinite(out[1, :5]).all()


@pytest.mark.gpu
def test_gpu_opcheck_gradients_compile():
    x, cos, sin = _case(torch.bfloat16, "cuda")
    torch.library.opcheck(torch.ops.mptkernels.apply_rotary.default,
                          (x.clone().requires_grad_(), cos, sin, None, 3, False, False))
    x.requires_grad_()
    dy = torch.randn_like(x)
    (g,) = torch.autograd.grad((ops.apply_rotary(x, cos, sin) * dy).sum(), x)
    x64 = x.detach().double().requires_grad_()  # the CUDA backward against fp64 autograd of the reference
    (ref,) = torch.autograd.grad((reference.apply_rotary(x64, cos, sin) * dy.double()).sum(), x64)
    assert rel_err(g, ref) <= 2 * TOL[torch.bfloat16]
    f = torch.compile(lambda x: ops.apply_rotary(x, cos, sin, seqlen_offsets=2), fullgraph=True)
    assert torch.equal(f(x.detach()), ops.apply_rotary(x.detach(), cos, sin, seqlen_offsets=2))
