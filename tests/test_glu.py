"""SwiGLU / GeGLU (the glu family): every backend against mptkernels.reference, values and the
gradients of both inputs, strided inputs, opcheck, torch.compile and the errors."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import mptkernels
from mptkernels import ops, reference
from conftest import HAS_CUDA, rel_err

# ||out - ref|| / ||ref||, per dtype. Against the fp32 reference of the same (rounded) inputs:
# fp32 is at its rounding (the vector exp/erf are within a few ulp of libm's); fp16 / bf16 add
# one rounding of the output (2^-11, 2^-8 relative; rms about a third of that).
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Against the reference in the inputs' own dtype, which rounds once where the kernels do: only
# the elements whose fp32 value sits near a rounding boundary can differ, by one ulp (measured
# <= 1e-4 on the CPU). PyTorch's composite F.silu(gate) * up rounds twice in fp16/bf16 and is
# 1.2e-3 (bf16) off, so this bound tells one rounding from two.
SAME_DTYPE_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 5e-4}
# gradients: dgate = dout * up * act'(gate) and dup = dout * act(gate), each rounded once
GRAD_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SIZES = [1, 7, 129, 1000]
# (public function, reference) per activation of the schema
OPS = {
    "silu": (ops.swiglu, reference.swiglu),
    "gelu": (ops.geglu, reference.geglu),
    "gelu_tanh": (lambda g, u: ops.geglu(g, u, approximate="tanh"), lambda g, u: reference.geglu(g, u, "tanh")),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _inputs(shape, dtype, scale=3.0):
    # gate spans the activations' curved part and both tails; up has an offset mean
    g = (torch.randn(shape) * scale).to(dtype)
    u = (torch.randn(shape) + 0.5).to(dtype)
    return g, u


def _ref_grads(ref, g, u, dout, acc=torch.float64):
    g2, u2 = g.detach().to(acc).requires_grad_(), u.detach().to(acc).requires_grad_()
    out = ref(g2, u2)
    return (out,) + torch.autograd.grad(out, (g2, u2), dout.to(acc))


def _check(fn, ref, g, u, dtype, tol=TOL, grad_tol=GRAD_TOL):
    """fn's value and both gradients against the reference: at fp64 for fp32/fp64 inputs, at fp32
    (of the same rounded inputs) for fp16/bf16; and against the same-dtype reference."""
    gl, ul = g.clone().requires_grad_(), u.clone().requires_grad_()
    out = fn(gl, ul)
    assert out.shape == g.shape and out.dtype == dtype and out.is_contiguous()
    dout = torch.randn(g.shape).to(dtype)
    dg, du = torch.autograd.grad(out, (gl, ul), dout)
    assert dg.shape == g.shape and dg.dtype == dtype and du.shape == u.shape and du.dtype == dtype
    acc = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
    want, wg, wu = _ref_grads(ref, g, u, dout, acc)
    assert rel_err(out, want) <= tol[dtype], ("out", rel_err(out, want))
    assert rel_err(dg, wg) <= grad_tol[dtype], ("dgate", rel_err(dg, wg))
    assert rel_err(du, wu) <= grad_tol[dtype], ("dup", rel_err(du, wu))
    return out, dg, du


# ---------------------------------------------------------------- the C++ CPU kernels (auto)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("act", list(OPS))
def test_cpu_forward_backward_match_reference(dtype, n, act):
    fn, ref = OPS[act]
    g, u = _inputs((3, 5, n), dtype)
    out, dg, du = _check(fn, ref, g, u, dtype)
    # the same-dtype reference rounds once where the kernel does
    assert rel_err(out, ref(g, u)) <= SAME_DTYPE_TOL[dtype], rel_err(out, ref(g, u))
    # the backward gives the same result twice (no uninitialised or racy element)
    gl, ul = g.clone().requires_grad_(), u.clone().requires_grad_()
    dout = torch.randn(g.shape).to(dtype)
    a = torch.autograd.grad(fn(gl, ul), (gl, ul), dout)
    b = torch.autograd.grad(fn(gl, ul), (gl, ul), dout)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_activations_are_told_apart():
    """The fp32 bound is tight enough to tell each activation from the others (so a kernel that
    ran the wrong one fails), and bf16's same-dtype bound tells one rounding from PyTorch's two."""
    g, u = _inputs((64, 257), torch.float32)
    outs = {act: fn(g, u) for act, (fn, _) in OPS.items()}
    for a in OPS:
        for b in OPS:
            if a != b:
                assert rel_err(outs[a], OPS[b][1](g, u)) > 5 * TOL[torch.float32], (a, b)  # gelu vs gelu_tanh: 1e-4
    gb, ub = g.bfloat16(), u.bfloat16()
    assert rel_err(F.silu(gb) * ub, reference.swiglu(gb, ub)) > 2 * SAME_DTYPE_TOL[torch.bfloat16]


@pytest.mark.parametrize("shape", [(7,), (3, 5, 33), (2, 3, 4, 65), (0, 9), (4, 0), (2, 0, 5)])
def test_leading_dims_and_empty(shape):
    g, u = _inputs(shape, torch.float32)
    for act, (fn, ref) in OPS.items():
        gl, ul = g.clone().requires_grad_(), u.clone().requires_grad_()
        out = fn(gl, ul)
        assert out.shape == g.shape
        assert rel_err(out, ref(g, u)) <= TOL[torch.float32], act
        dg, du = torch.autograd.grad(out, (gl, ul), torch.ones_like(out))
        assert dg.shape == g.shape and du.shape == u.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_inputs(dtype):
    """gate, up = h.chunk(2, -1) of a fused projection are read in place (row stride 2N); a
    transposed last dim is made contiguous first. Both give the reference's values and grads."""
    n = 45
    h = (torch.randn(3, 4, 2 * n) * 3).to(dtype)
    g, u = h.chunk(2, -1)
    assert g.stride() == (8 * n, 2 * n, 1)
    for act, (fn, ref) in OPS.items():
        _check(fn, ref, g, u, dtype)
    gt, ut = (torch.randn(n, 6) * 3).to(dtype).t(), torch.randn(n, 6).to(dtype).t()  # last dim stride 6
    for act, (fn, ref) in OPS.items():
        _check(fn, ref, gt, ut, dtype)
    # one-row and one-column views with odd strides
    big = (torch.randn(5, 40) * 3).to(dtype)
    for g1, u1 in ((big[1:2, 3:20], big[3:4, 10:27]), (big[:, 7:8], big[:, 9:10])):
        _check(OPS["silu"][0], OPS["silu"][1], g1, u1, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_rows_and_streamed_outputs(dtype):
    # rows longer than a parallel segment (4096) with a tail; outputs over 8 MiB are written
    # with non-temporal stores (another code path)
    for shape in ((3, 10001), (600, 4000) if dtype == torch.float32 else (1100, 4000)):
        g, u = _inputs(shape, dtype)
        for act, (fn, ref) in OPS.items():
            _check(fn, ref, g, u, dtype)


def test_extreme_gates_stay_finite():
    # exp(-gate) overflows for very negative gates: act -> -0, gradient -> 0, never NaN
    g = torch.tensor([[-1e4, -200.0, -88.0, -20.0, 0.0, 20.0, 88.0, 200.0, 1e4]])
    u = torch.full_like(g, 2.0)
    for act, (fn, ref) in OPS.items():
        gl, ul = g.clone().requires_grad_(), u.clone().requires_grad_()
        out = fn(gl, ul)
        dg, du = torch.autograd.grad(out, (gl, ul), torch.ones_like(out))
        assert torch.isfinite(out).all() and torch.isfinite(dg).all() and torch.isfinite(du).all(), act
        want, wg, wu = _ref_grads(ref, g, u, torch.ones_like(g))
        assert torch.allclose(out.double(), want, rtol=1e-6, atol=1e-6), act
        assert torch.allclose(dg.double(), wg, rtol=1e-5, atol=1e-6), act


# ---------------------------------------------------------------- the custom ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", list(OPS))
def test_opcheck(dtype, act):
    g, u = _inputs((5, 37), dtype)
    torch.library.opcheck(torch.ops.mptkernels.glu_fwd.default,
                          (g.clone().requires_grad_(), u.clone().requires_grad_(), act))
    h = _inputs((5, 74), dtype)[0]
    torch.library.opcheck(torch.ops.mptkernels.glu_fwd.default, (*h.chunk(2, -1), act))  # row stride 74
    dout = torch.randn(5, 37).to(dtype)
    torch.library.opcheck(torch.ops.mptkernels.glu_bwd.default, (dout, g, u, act))
    torch.library.opcheck(torch.ops.mptkernels_cpu.glu_bwd.default, (dout, g, u, act),
                          test_utils=("test_schema", "test_faketensor"))


def test_double_backward_is_a_clear_error():
    g, u = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    (dg,) = torch.autograd.grad(ops.swiglu(g, u).pow(3).sum(), g, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dg.sum().backward()


def test_only_the_inputs_that_need_it_get_a_gradient():
    g, u = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8)
    ops.geglu(g, u).sum().backward()
    assert g.grad is not None and u.grad is None
    g2 = g.detach().double().requires_grad_()
    reference.geglu(g2, u.double()).sum().backward()
    assert rel_err(g.grad, g2.grad) <= 1e-5


def test_torch_compile_fullgraph_forward_and_backward():
    def ffn(h, w):
        gate, up = (h @ w).chunk(2, -1)
        return ops.swiglu(gate, up) + ops.geglu(gate, up, approximate="tanh") * 0.5

    h = torch.randn(2, 5, 16, requires_grad=True)
    w = torch.randn(16, 2 * 24, requires_grad=True)
    dout = torch.randn(2, 5, 24)
    want = ffn(h, w)
    want_grads = torch.autograd.grad(want, (h, w), dout)
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        got = torch.compile(ffn, fullgraph=True, backend=backend)(h, w)
        assert torch.equal(got, want), backend
        grads = torch.autograd.grad(got, (h, w), dout)
        for a, b in zip(grads, want_grads):
            assert rel_err(a, b) <= 1e-6, backend


# ---------------------------------------------------------------- forced backends
@pytest.mark.parametrize("impl", ["cpu", "torch", "reference"])
@pytest.mark.parametrize("act", list(OPS))
def test_each_backend_forced(impl, act):
    fn, ref = OPS[act]
    public = "swiglu" if act == "silu" else "geglu"
    for dtype in (torch.float32, torch.bfloat16):
        g, u = _inputs((3, 4, 50), dtype)
        with mptkernels.backend(**{public: impl}):
            out, dg, du = _check(fn, ref, g, u, dtype)
        if impl == "reference":  # the reference itself: bit-equal
            assert torch.equal(out, ref(g, u))


def test_forcing_runs_the_forced_implementation(monkeypatch):
    from mptkernels import torch_impl

    ran = []
    real = torch_impl.swiglu
    monkeypatch.setattr(torch_impl, "swiglu", lambda g, u: ran.append(1) or real(g, u))
    g, u = torch.randn(3, 8), torch.randn(3, 8)
    with mptkernels.backend(swiglu="torch"):
        ops.swiglu(g, u)
    assert ran == [1]
    ops.swiglu(g, u)  # auto on the CPU: the C++ kernel
    assert ran == [1]
    with pytest.raises(ValueError, match=r"mptkernels.geglu: backend 'cuda' cannot run this call"):
        with mptkernels.backend(geglu="cuda"):
            ops.geglu(g, u)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, exc, match", [
    (lambda: ops.swiglu(torch.randn(4, 8), torch.randn(4, 9)), ValueError,
     r"swiglu: up must have gate's shape \(4, 8\), got \(4, 9\)"),
    (lambda: ops.geglu(torch.randn(4, 8), torch.randn(8)), ValueError, r"geglu: up must have gate's shape"),
    (lambda: ops.swiglu(torch.randn(4, 8), torch.randn(4, 8).half()), TypeError,
     r"swiglu: up must have gate's dtype torch.float32, got torch.float16"),
    (lambda: ops.geglu(torch.randn(4, 8), torch.randn(4, 8), approximate="erf"), ValueError,
     r"geglu: approximate must be 'none' or 'tanh', got 'erf'"),
    (lambda: ops.geglu(torch.randn(4, 8), torch.randn(4, 8), approximate=None), ValueError,
     r"geglu: approximate must be 'none' or 'tanh', got None"),
    (lambda: ops.swiglu(torch.ones(4, 8, dtype=torch.int64), torch.ones(4, 8, dtype=torch.int64)), TypeError,
     r"swiglu: gate must be float32, float16, bfloat16 or float64, got torch.int64"),
    (lambda: ops.swiglu(torch.randn(4, 8), torch.randn(4, 8, device="meta")), ValueError,
     r"swiglu: up is on meta but gate is on cpu"),
    (lambda: ops.swiglu(torch.tensor(1.0), torch.tensor(1.0)), ValueError, r"swiglu: gate must have at least one"),
    (lambda: ops.geglu([1.0], torch.randn(1)), TypeError, r"geglu: gate must be a tensor, got list"),
    (lambda: torch.ops.mptkernels.glu_fwd(torch.randn(4, 8), torch.randn(4, 8), "relu"), ValueError,
     r"glu_fwd: activation must be one of \('silu', 'gelu', 'gelu_tanh'\), got 'relu'"),
    (lambda: torch.ops.mptkernels.glu_fwd(torch.randn(8, 4).t(), torch.randn(4, 8), "silu"), ValueError,
     r"swiglu: gate's last dim must have stride 1 here"),
    (lambda: torch.ops.mptkernels.glu_fwd(torch.randn(2, 4, 8), torch.randn(2, 4, 8), "gelu"), ValueError,
     r"geglu: gate must be a 2-D \(rows, N\) tensor here"),
    (lambda: torch.ops.mptkernels.glu_bwd(torch.randn(4, 7), torch.randn(4, 8), torch.randn(4, 8), "silu"),
     ValueError, r"swiglu \(backward\): dout must be a torch.float32 \(4, 8\) tensor"),
    (lambda: torch.ops.mptkernels_cpu.glu_fwd(torch.randn(4, 8), torch.randn(4, 8), "tanh"), RuntimeError,
     r"glu_fwd: activation must be silu, gelu or gelu_tanh, got 'tanh'"),
])
def test_bad_input_is_a_one_line_error_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match) as e:
        call()
    if exc is not RuntimeError:  # (torch's C++ errors add lines of their own)
        assert "\n" not in str(e.value), str(e.value)


# ---------------------------------------------------------------- Triton kernels (interpreter)
def _triton_module():
    return importlib.import_module("mptkernels.triton.glu")


INTERP = pytest.mark.skipif(HAS_CUDA, reason="interpreter run; on a GPU the gpu tests cover Triton")


@INTERP
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)  # interpreter: no bf16 arithmetic
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("act", list(OPS))
def test_triton_interpreter_forced_forward_backward(dtype, n, act):
    """The Triton kernels forced through the public function (forward and its backward, which
    runs under the forward's forcing), against the reference; and they ran."""
    fn, ref = OPS[act]
    public = "swiglu" if act == "silu" else "geglu"
    g, u = _inputs((3, 5, n), dtype)
    with mptkernels.backend(**{public: "triton"}):
        out, dg, du = _check(fn, ref, g, u, dtype)
    assert rel_err(out, ref(g, u)) <= SAME_DTYPE_TOL[dtype]


@INTERP
def test_triton_interpreter_kernels_ran_and_read_strides(monkeypatch):
    tg = _triton_module()
    calls = []
    for name in ("glu_fwd", "glu_bwd"):
        real = getattr(tg, name)
        monkeypatch.setattr(tg, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    # the dispatcher's cached choice holds the function it found: start from a fresh cache
    from mptkernels import _dispatch
    monkeypatch.setattr(_dispatch, "_available_cache", {})
    h = (torch.randn(7, 2, 2 * 45) * 3)
    g, u = h.chunk(2, -1)  # row stride 90: read in place
    for act, (fn, ref) in OPS.items():
        public = "swiglu" if act == "silu" else "geglu"
        with mptkernels.backend(**{public: "triton"}):
            _check(fn, ref, g, u, torch.float32)
    assert calls == ["glu_fwd", "glu_bwd"] * 3
    # tiles: several short rows per program, and a long row split over programs (with a tail)
    for m, n in ((37, 3), (2, 2 * tg.MAX_BLOCK_N + 5)):
        g, u = _inputs((m, n), torch.float32)
        dout = torch.randn(m, n)
        for act in OPS:
            assert rel_err(tg.glu_fwd(g, u, act), torch.ops.mptkernels_cpu.glu_fwd(g, u, act)) <= 1e-6
            for a, b in zip(tg.glu_bwd(dout, g, u, act), torch.ops.mptkernels_cpu.glu_bwd(dout, g, u, act)):
                assert rel_err(a, b) <= 1e-6


@INTERP
def test_triton_interpreter_empty():
    tg = _triton_module()
    for shape in ((0, 8), (5, 0)):
        g = torch.randn(shape)
        assert tg.glu_fwd(g, g, "silu").shape == shape
        assert all(t.shape == shape for t in tg.glu_bwd(g, g, g, "gelu"))
