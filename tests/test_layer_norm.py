"""LayerNorm / RMSNorm (+ residual): every backend against mptkernels.reference."""
import importlib

import pytest
import torch

import mptkernels
from mptkernels import ops, reference
from conftest import HAS_CUDA, rel_err

# relative error (||out - ref|| / ||ref||) allowed per dtype against the reference, which
# rounds where the kernels round: what remains is fp32 summation order plus at most one
# rounding step of the output dtype.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# the C++ kernels round exactly where the reference does: measured <= 3.5e-5 (fp16) and
# 1.5e-4 (bf16). The cast modes differ from one another by 2.6e-4..4e-4 (fp16) and
# 1.6e-3..2.9e-3 (bf16), so only a bound below those tells a wrong cast mode from a right one.
CPU_TOL = {**TOL, torch.float16: 1e-4, torch.bfloat16: 5e-4}
# gradients go through more arithmetic in the output dtype (dy, dx are stored rounded)
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
SIZES = [1, 17, 129, 1000, 4097]
CASTS = {False: ["torch", "llama", "gemma", "mpt"], True: ["torch", "llama", "gemma"]}


def _inputs(shape, dtype, device, weight_kind, bias, residual):
    n = shape[-1]
    x = torch.randn(shape, dtype=dtype, device=device) * 3 + 0.5  # an offset mean exercises the centring
    wdt = dtype if weight_kind == "same" else torch.float32
    w = None if weight_kind == "none" else torch.randn(n, dtype=wdt, device=device)
    b = torch.randn(n, dtype=wdt, device=device) if (bias and w is not None) else None
    r = torch.randn(shape, dtype=dtype, device=device) if residual else None
    return x, w, b, r


def _call(fn, x, w, b, r, rms, cast, eps=1e-5):
    if rms:
        return fn.rms_norm(x, w, eps, r, cast=cast)
    return fn.layer_norm(x, w, b, eps, r, cast=cast)


def _check_forward(x, w, b, r, rms, cast, tol):
    out = _call(ops, x, w, b, r, rms, cast)
    ref = _call(reference, x, w, b, r, rms, cast)
    if r is None:
        assert out.shape == x.shape and out.dtype == x.dtype
        assert rel_err(out, ref) <= tol, (cast, rel_err(out, ref))
    else:
        assert rel_err(out[0], ref[0]) <= tol, (cast, rel_err(out[0], ref[0]))
        assert torch.equal(out[1], ref[1]), "residual_out must equal x + residual rounded to x's dtype"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_cpu_forward_matches_reference(dtype, n, rms, residual):
    for weight_kind in ("none", "same", "fp32"):
        for cast in CASTS[rms]:
            x, w, b, r = _inputs((2, 3, n), dtype, "cpu", weight_kind, True, residual)
            _check_forward(x, w, b, r, rms, cast, CPU_TOL[dtype])


def test_cpu_single_row_and_single_column():
    for shape in [(1, 1), (1, 5), (7, 1), (1,)]:
        x = torch.randn(shape)
        assert rel_err(ops.layer_norm(x, None), reference.layer_norm(x, None)) <= 1e-5 or shape[-1] == 1
        assert torch.equal(ops.layer_norm(torch.randn(shape[:-1] + (1,)), None), torch.zeros(shape[:-1] + (1,)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_without_weight_in_float32(dtype):
    x, b = torch.randn(5, 33, dtype=dtype), torch.randn(33)
    assert rel_err(ops.layer_norm(x, None, b), reference.layer_norm(x, None, b)) <= TOL[dtype]
    xg, bg = x.clone().requires_grad_(), b.clone().requires_grad_()
    ops.layer_norm(xg, None, bg).float().sum().backward()
    assert bg.grad.dtype == torch.float32 and torch.allclose(bg.grad, torch.full_like(b, 5.0))


def test_non_contiguous_input_is_handled():
    big = torch.randn(6, 40, 130)
    x, r = big[:, ::2, 1:], torch.randn(6, 130, 20).transpose(1, 2)[..., 1:]
    w = torch.randn(129)
    y, s = ops.layer_norm(x, w, None, 1e-5, r)
    ry, rs = reference.layer_norm(x, w, None, 1e-5, r)
    assert rel_err(y, ry) <= 1e-5 and torch.equal(s, rs)


def test_empty_rows():
    x = torch.randn(0, 33)
    assert ops.layer_norm(x, torch.randn(33)).shape == (0, 33)
    y, s = ops.rms_norm(x, None, residual=torch.randn(0, 33))
    assert y.shape == s.shape == (0, 33)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("cast", ["torch", "llama", "gemma"])
def test_cpu_gradcheck_fp64(rms, cast):
    n = 19
    x = torch.randn(2, 3, n, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, n, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, dtype=torch.float64, requires_grad=True)

    def f(x, r, w, b):
        if rms:
            return ops.rms_norm(x, w, 1e-5, r, cast=cast)
        return ops.layer_norm(x, w, b, 1e-5, r, cast=cast)

    assert torch.autograd.gradcheck(f, (x, r, w, b if not rms else b.detach()), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(lambda x: ops.layer_norm(x, None, None, 1e-5), (x,), eps=1e-6, atol=1e-8)


def _grads(fn, x, w, b, r, rms, cast, dy, ds):
    leaves = [t for t in (x, w, b, r) if t is not None]
    out = _call(fn, x, w, b, r, rms, cast)
    loss = (out[0].double() * dy).sum() + (out[1].double() * ds).sum() if r is not None else (out.double() * dy).sum()
    return torch.autograd.grad(loss, leaves)


def _check_grads(device, dtype, n, rms, cast, weight_kind, tol):
    x, w, b, r = _inputs((3, 5, n), dtype, device, weight_kind, not rms, True)
    leaves = [t.requires_grad_() for t in (x, w, b, r) if t is not None]
    dy, ds = torch.randn(x.shape, dtype=torch.float64, device=device), torch.randn(x.shape, dtype=torch.float64, device=device)
    got = _grads(ops, x, w, b, r, rms, cast, dy, ds)
    # the reference gradient in float64 (the same math, no rounding): the ideal answer
    x64, w64, b64, r64 = (None if t is None else t.detach().double().requires_grad_() for t in (x, w, b, r))
    want = _grads(reference, x64, w64, b64, r64, rms, "torch" if cast == "mpt" else cast, dy, ds)
    names = [n for n, t in zip(("dx", "dweight", "dbias", "dresidual"), (x, w, b, r)) if t is not None]
    for name, g, ref, leaf in zip(names, got, want, leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        if n == 1:  # one column: LayerNorm's gradients cancel to ~0: bound the error by the terms' size too
            assert (g.double() - ref).norm() <= tol * ref.norm() + 1e-2 * (dy.norm() + ds.norm()), name
        else:
            assert rel_err(g, ref) <= tol, (name, rel_err(g, ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 17, 1000])
@pytest.mark.parametrize("rms", [False, True])
def test_cpu_gradients_match_reference(dtype, n, rms):
    for weight_kind in ("none", "same", "fp32"):
        for cast in CASTS[rms]:
            _check_grads("cpu", dtype, n, rms, cast, weight_kind, GRAD_TOL[dtype])


def test_backward_is_deterministic():
    x = torch.randn(257, 300, requires_grad=True)
    w = torch.randn(300, requires_grad=True)
    dy = torch.randn(257, 300)
    grads = [torch.autograd.grad((ops.layer_norm(x, w) * dy).sum(), (x, w)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    m, n = 5, 37
    x, w, b, r = _inputs((m, n), dtype, "cpu", "same", True, True)
    for args in [(x, w, b, r, 1e-5, False, 0.0, False), (x, None, None, None, 1e-5, True, 1.0, True),
                 (x, w.float(), None, r, 1e-6, True, 0.0, True)]:
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        torch.library.opcheck(torch.ops.mptkernels.layer_norm_fwd.default, args)
    x, w, b, r = (t.detach() for t in (x, w, b, r))
    y, s, mean, rstd = torch.ops.mptkernels.layer_norm_fwd(x, w, b, r, 1e-5, False, 0.0, False)
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.mptkernels.layer_norm_bwd.default,
                          (dy, torch.randn_like(x), s, w, b, mean, rstd, False, 0.0, False))


def test_double_backward_is_a_clear_error():
    x = torch.randn(3, 8, requires_grad=True)
    (g,) = torch.autograd.grad(ops.layer_norm(x).pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_torch_compile_fullgraph():
    def block(x, r, w, b):
        y, s = ops.layer_norm(x, w, b, 1e-5, r)
        return ops.rms_norm(y * 2, w, 1e-6), s

    x, w, b, r = _inputs((4, 33), torch.float32, "cpu", "same", True, True)
    want = block(x, r, w, b)
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        got = torch.compile(block, fullgraph=True, backend=backend)(x, r, w, b)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_reference_backend_override():
    x, w, b, r = _inputs((3, 40), torch.bfloat16, "cpu", "same", True, True)
    with mptkernels.backend("reference"):
        y, s = ops.layer_norm(x, w, b, 1e-5, r)
    ry, rs = reference.layer_norm(x, w, b, 1e-5, r)
    assert torch.equal(y, ry) and torch.equal(s, rs)
    with pytest.raises(ValueError, match=r"backend 'cuda' cannot run this call \(runs on CUDA tensors\)"):
        with mptkernels.backend("cuda"):
            ops.layer_norm(x, w)
    with pytest.raises(ValueError, match="'fast' is not an implementation"):
        with mptkernels.backend("fast"):
            pass


@pytest.mark.parametrize("call, match", [
    (lambda: ops.layer_norm(torch.randn(4, 8), torch.randn(9)), r"weight must have shape \(8,\)"),
    (lambda: ops.layer_norm(torch.randn(4, 8), torch.ones(8, dtype=torch.int32)), "weight must be float32"),
    (lambda: ops.layer_norm(torch.randn(4, 8), torch.randn(8, device="meta")), "weight is on meta"),
    (lambda: ops.layer_norm(torch.randn(4, 8), torch.randn(8), torch.randn(8, dtype=torch.float64)), "bias"),
    (lambda: ops.layer_norm(torch.randn(4, 8), None, None, 1e-5, torch.randn(4, 9)), "residual must have x's shape"),
    (lambda: ops.rms_norm(torch.randn(4, 8), None, 1e-5, torch.randn(4, 8).half()), "residual must have x's dtype"),
    (lambda: ops.layer_norm(torch.ones(4, 8, dtype=torch.int64)), "x must be float32"),
    (lambda: ops.layer_norm(torch.randn(2, 65537)), r"last dim must be in 1..65536"),
    (lambda: ops.layer_norm(torch.randn(2, 8), cast="fp8"), "cast must be one of"),
    (lambda: ops.layer_norm(torch.randn(2, 8), eps=-1.0), "eps must be >= 0"),
    (lambda: ops.layer_norm(torch.randn(2, 8), eps="1e-5"), "eps must be >= 0, got 1e-5"),
    (lambda: torch.ops.mptkernels.layer_norm_fwd(torch.randn(2, 8), torch.randn(7), None, None, 1e-5, False, 0.0, False),
     r"weight must have shape \(8,\)"),
    (lambda: torch.ops.mptkernels.layer_norm_fwd(torch.randn(2, 8).t(), None, None, None, 1e-5, False, 0.0, False),
     "x must be a contiguous"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call()


def test_large_row():
    x = torch.randn(3, 65536) * 5 + 100  # a large mean: the two-pass variance keeps its accuracy
    w = torch.randn(65536)
    assert rel_err(ops.layer_norm(x, w), reference.layer_norm(x.double(), w.double())) <= 1e-5


def test_cpu_streaming_stores_of_large_outputs():
    # outputs of 8 MiB and more are written with non-temporal stores (another code path)
    for dtype, shape in ((torch.float32, (40, 65536)), (torch.bfloat16, (64, 65536))):
        x = torch.randn(shape, dtype=dtype).requires_grad_()
        r = torch.randn(shape, dtype=dtype)
        w = torch.randn(shape[1], dtype=dtype).requires_grad_()
        y, s = ops.layer_norm(x, w, None, 1e-5, r)
        ry, rs = reference.layer_norm(x.detach(), w.detach(), None, 1e-5, r)
        assert rel_err(y, ry) <= CPU_TOL[dtype] and torch.equal(s, rs)
        dy = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, w), dy)
        x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        wx, ww = torch.autograd.grad(reference.layer_norm(x64, w64, None, 1e-5, r.double())[0], (x64, w64),
                                     dy.double())
        assert rel_err(gx, wx) <= GRAD_TOL[dtype] and rel_err(gw, ww) <= GRAD_TOL[dtype]


# ---------------------------------------------------------------- Triton kernels
def _triton_module():
    return importlib.import_module("mptkernels.triton.layer_norm")


@pytest.mark.skipif(HAS_CUDA, reason="interpreter run; on a GPU the gpu tests cover Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # interpreter: no bf16 arithmetic
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("rms", [False, True])
def test_triton_interpreter_forward_backward(dtype, n, rms):
    _check_triton_against_cpu(dtype, n, rms)


@pytest.mark.skipif(HAS_CUDA, reason="interpreter run; on a GPU the gpu tests cover Triton")
@pytest.mark.parametrize("n", [17, 129, 1000])
@pytest.mark.parametrize("rms", [False, True])
def test_triton_interpreter_looped_path(monkeypatch, n, rms):
    """Rows longer than the register-resident limit are walked in chunks: lower the limits so
    small rows take that path (the default limits are 16384 / 8192 elements)."""
    tl_norm = _triton_module()
    monkeypatch.setattr(tl_norm, "FWD_FUSED_MAX_BLOCK_N", 16)
    monkeypatch.setattr(tl_norm, "BWD_FUSED_MAX_BLOCK_N", 16)
    monkeypatch.setattr(tl_norm, "LOOPED_BLOCK_N", 32)
    _check_triton_against_cpu(torch.float32, n, rms)


def _check_triton_against_cpu(dtype, n, rms):
    tl_norm = _triton_module()
    for weight_kind, cast, residual in [("same", "torch", True), ("fp32", "llama", False), ("none", "torch", True),
                                        ("same", "gemma", False)]:
        x, w, b, r = _inputs((3, n), dtype, "cpu", weight_kind, not rms, residual)
        off, cast_before = (1.0 if cast == "gemma" else 0.0), cast == "llama"
        got = tl_norm.layer_norm_fwd(x, w, b, r, 1e-5, rms, off, cast_before)
        want = torch.ops.mptkernels.layer_norm_fwd(x, w, b, r, 1e-5, rms, off, cast_before)  # CPU C++
        ref = _call(reference, x, w, b, r, rms, cast)
        assert rel_err(got[0], ref[0] if r is not None else ref) <= TOL[dtype]
        if r is not None:
            assert torch.equal(got[1], want[1])
        assert rel_err(got[3], want[3]) <= 1e-5
        if not rms:
            assert rel_err(got[2], want[2]) <= 1e-5 or want[2].abs().max() < 1e-3
        s = got[1] if r is not None else x
        dy, dres = torch.randn_like(x), (torch.randn_like(x) if r is not None else None)
        g_tl = tl_norm.layer_norm_bwd(dy, dres, s, w, b, want[2], want[3], rms, off, cast_before)
        g_cpu = torch.ops.mptkernels.layer_norm_bwd(dy, dres, s, w, b, want[2], want[3], rms, off, cast_before)
        for name, a, c in zip(("dx", "dweight", "dbias"), g_tl, g_cpu):
            assert a.shape == c.shape and a.dtype == c.dtype, name
            if name == "dx" and n == 1 and dres is None:
                # one column: dx = dy*w*rstd*(1 - xhat^2) cancels to rounding noise; measure
                # the error against the size of the terms that cancelled instead
                assert (a.double() - c.double()).norm() <= GRAD_TOL[dtype] * dy.double().norm() * 10
            elif c.numel():
                assert rel_err(a, c) <= GRAD_TOL[dtype], (name, rel_err(a, c))


@pytest.mark.skipif(HAS_CUDA, reason="interpreter run; on a GPU the gpu tests cover Triton")
@pytest.mark.parametrize("n, looped", [(17, False), (1000, False), (129, True)])
def test_triton_interpreter_backward_many_rows_per_program(monkeypatch, n, looped):
    # enough rows that each backward program loops over several tiles (fused) or rows (looped)
    tl_norm = _triton_module()
    if looped:
        monkeypatch.setattr(tl_norm, "FWD_FUSED_MAX_BLOCK_N", 16)
        monkeypatch.setattr(tl_norm, "BWD_FUSED_MAX_BLOCK_N", 16)
        monkeypatch.setattr(tl_norm, "LOOPED_BLOCK_N", 32)
    m = 11 if looped else 200
    x, w, b, dy = torch.randn(m, n), torch.randn(n), torch.randn(n), torch.randn(m, n)
    _, _, mean, rstd = torch.ops.mptkernels.layer_norm_fwd(x, w, b, None, 1e-5, False, 0.0, False)
    got = tl_norm.layer_norm_bwd(dy, None, x, w, b, mean, rstd, False, 0.0, False)
    want = torch.ops.mptkernels.layer_norm_bwd(dy, None, x, w, b, mean, rstd, False, 0.0, False)
    for a, c in zip(got, want):
        assert rel_err(a, c) <= 1e-4


# ---------------------------------------------------------------- GPU (the lent machine)
GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", SIZES + [8192, 65536])
@pytest.mark.parametrize("rms", [False, True])
def test_gpu_forward_matches_reference(backend, dtype, n, rms):
    with mptkernels.backend(backend):
        for weight_kind in ("none", "same", "fp32"):
            for cast in CASTS[rms]:
                for residual in (False, True):
                    x, w, b, r = _inputs((2, 33, n), dtype, "cuda", weight_kind, True, residual)
                    _check_forward(x, w, b, r, rms, cast, TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [17, 1000, 4097, 65536])
@pytest.mark.parametrize("rms", [False, True])
def test_gpu_gradients_match_reference(backend, dtype, n, rms):
    with mptkernels.backend(backend):
        for weight_kind in ("none", "same", "fp32"):
            for cast in CASTS[rms]:
                _check_grads("cuda", dtype, n, rms, cast, weight_kind, GRAD_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_opcheck_and_compile(backend):
    x, w, b, r = _inputs((64, 1024), torch.bfloat16, "cuda", "same", True, True)
    with mptkernels.backend(backend):
        torch.library.opcheck(torch.ops.mptkernels.layer_norm_fwd.default,
                              (x.requires_grad_(), w.requires_grad_(), b, r, 1e-5, False, 0.0, False))
        f = torch.compile(lambda x, r: ops.layer_norm(x, w, b, 1e-5, r), fullgraph=True)
        got, want = f(x, r), ops.layer_norm(x, w, b, 1e-5, r)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
def test_gpu_opcheck_cuda_cpp_ops():
    x, w, b, r = _inputs((64, 1000), torch.bfloat16, "cuda", "fp32", True, True)
    torch.library.opcheck(torch.ops.mptkernels_cuda.layer_norm_fwd.default, (x, w, b, r, 1e-5, False, 0.0, False))
    y, s, mean, rstd = torch.ops.mptkernels_cuda.layer_norm_fwd(x, w, b, r, 1e-5, False, 0.0, False)
    torch.library.opcheck(torch.ops.mptkernels_cuda.layer_norm_bwd.default,
                          (torch.randn_like(x), torch.randn_like(x), s, w, b, mean, rstd, False, 0.0, False))


@pytest.mark.gpu
def test_gpu_auto_choice_is_recorded(monkeypatch, tmp_path):
    from mptkernels import _dispatch

    monkeypatch.setenv("MPTK_CACHE_DIR", str(tmp_path))
    _dispatch.measured.clear()
    x, w, b, r = _inputs((512, 4096), torch.bfloat16, "cuda", "same", True, True)
    ops.layer_norm(x, w, b, 1e-5, r)
    keys = [k for table in _dispatch.measured.tables.values() for k in table]
    # ours against F.layer_norm at the public function, CUDA C++ against Triton inside the op
    assert any(k.startswith("layer_norm|") for k in keys) and any(k.startswith("layer_norm_fwd|") for k in keys)
    _dispatch.measured.clear()
