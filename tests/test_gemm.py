"""The GEMM family (linear + epilogue, int8 quantisation, W8A8 and weight-only int8): every
backend against mptkernels.reference on fresh random inputs."""
import pytest
import torch

from mptkernels import ops, reference
from conftest import HAS_CUDA, rel_err

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
MS = [1, 3, 16, 17, 128, 1000]
ACTS = [None, "relu", "gelu", "gelu_tanh"]


def _x(m, k, dtype, device="cpu", outliers=False):
    x = torch.randn(m, k, dtype=torch.float32, device=device)
    if outliers:  # a few columns x50, as activations of real LLMs have
        x[:, :: max(k // 7, 1)] *= 50
    return x.to(dtype)


def _weight(n, k, dtype, device="cpu"):
    return (torch.randn(n, k, device=device) * k ** -0.5).to(dtype)


# ---------------------------------------------------------------- linear
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("act", ACTS)
def test_cpu_linear_matches_reference(dtype, m, act):
    k, n = 72, 40  # not multiples of 64
    x, w, b = _x(m, k, dtype), _weight(n, k, dtype), torch.randn(n, dtype=dtype)
    for bias in (b, None):
        got = ops.linear(x, w, bias, act)
        want = reference.linear(x.double(), w.double(), None if bias is None else bias.double(), act)
        assert got.dtype == dtype and got.shape == (m, n)
        assert rel_err(got, want) <= TOL[dtype], (act, rel_err(got, want))


# 16-bit linears on the CPU: fewer than 40 rows read the 16-bit weight in place (dot tiles;
# bf16 with vdpbf16ps where the CPU has AVX512-BF16); bf16 from 40 rows runs vdpbf16ps panels
# (even K only; odd K widens to fp32)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, k, n", [(1, 33, 17), (5, 130, 70), (20, 33, 70), (20, 130, 70), (200, 64, 130)])
def test_cpu_linear_16bit_paths(dtype, m, k, n):
    x, w, b = _x(m, k, dtype), _weight(n, k, dtype), torch.randn(n, dtype=dtype)
    for act in (None, "gelu"):
        got = ops.linear(x, w, b, act)
        want = reference.linear(x.double(), w.double(), b.double(), act)
        assert got.dtype == dtype and rel_err(got, want) <= TOL[dtype], (act, rel_err(got, want))


# bf16 products are exact in fp32 and summed in fp32 (dot tiles and panels alike), so every
# element is its fp64 value rounded once to bf16, give or take the fp32 sums' error: checked
# element by element (a norm-wise error would hide one wrong or unwritten element). k: a
# whole number of 32-element steps, and tails of 1, 2 and 8; n: tails of the 4-row tiles.
@pytest.mark.parametrize("m", [1, 3, 5, 17, 39, 40, 64])
@pytest.mark.parametrize("k, n", [(33, 17), (64, 70), (130, 40), (200, 6)])
def test_cpu_bf16_linear_rounds_once(m, k, n):
    x, w, b = _x(m, k, torch.bfloat16), _weight(n, k, torch.bfloat16), torch.randn(n, dtype=torch.bfloat16)
    want = reference.linear(x.double(), w.double(), b.double(), None)
    bound = 2.0 ** -8 * want.abs() + 1e-6 * (x.double().abs() @ w.double().abs().T + b.double().abs())
    got = ops.linear(x, w, b)
    assert got.dtype == torch.bfloat16
    assert ((got.double() - want).abs() <= bound).all(), (got.double() - want).abs().max()


# (m, k, n): from 16 rows the CPU GEMMs (forward, dx, dw) run our AVX-512 kernel; the second
# shape has several row chunks (192), K blocks (128) and column panels (64), all with tails;
# the last two have a reduction 16x longer than the other sides (split over K): in the
# forward (k = 2000) and in dx (n = 2000)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("m, k, n", [(17, 72, 33), (300, 200, 130), (20, 2000, 40), (20, 40, 2000)])
def test_cpu_linear_gradients(dtype, act, m, k, n):
    x = _x(m, k, dtype).reshape(1, m, k).requires_grad_()  # leading dims
    w = _weight(n, k, dtype).requires_grad_()
    b = torch.randn(n, dtype=dtype).requires_grad_()
    out = ops.linear(x, w, b, act)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), dout)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    want = torch.autograd.grad(reference.linear(x64, w64, b64, act), (x64, w64, b64), dout.double())
    for name, g, r in zip(("dx", "dw", "db"), got, want):
        assert g.dtype == dtype
        assert rel_err(g, r) <= GRAD_TOL[dtype], (name, rel_err(g, r))


# bf16 backward on the CPU: dpre = dout * act'(h) is rounded to bf16 for the two GEMMs (as
# PyTorch's bf16 autograd rounds it), but db is summed in fp32 from the unrounded products
# (64-row blocks, then the blocks in order) and rounded once: element by element, within
# half a bf16 ulp of the fp64 sum over the same saved h, plus the fp32 derivative's error
# (~1e-7 absolute: 0.5 (1 + tanh u) cancels for negative h)
@pytest.mark.parametrize("m", [1, 17, 64, 130])
@pytest.mark.parametrize("act", ACTS)
def test_cpu_bf16_linear_bias_grad_in_fp32(m, act):
    k, n = 72, 70
    x, w = _x(m, k, torch.bfloat16), _weight(n, k, torch.bfloat16)
    b = torch.randn(n, dtype=torch.bfloat16).requires_grad_()
    out = ops.linear(x, w, b, act)
    dout = torch.randn_like(out)
    (db,) = torch.autograd.grad(out, (b,), dout)
    h = ops.linear(x, w, b.detach()).double()  # the saved pre-activation: the same rounding
    if act == "relu":
        h = out.detach().double()  # relu's derivative reads its output
    h64 = h.detach().requires_grad_()
    (dpre,) = torch.autograd.grad(reference.linear(h64, torch.eye(n, dtype=torch.float64), None, act), (h64,),
                                  dout.double())
    want = dpre.sum(0)
    bound = 2.0 ** -8 * want.abs() + 1e-6 * dout.double().abs().sum(0)
    assert db.dtype == torch.bfloat16
    assert ((db.double() - want).abs() <= bound).all(), ((db.double() - want).abs() / bound).max()


def test_linear_float64_gradcheck():
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    for act in ("none", "relu", "gelu", "gelu_tanh"):  # on the op: ops.linear sends fp64 to the reference
        assert torch.autograd.gradcheck(lambda x, w, b: torch.ops.mptkernels.linear_fwd(x, w, b, act)[0], (x, w, b))


# the CPU GEMM's other paths: bf16 panels over several K blocks, fp32/fp16 split-K in the
# forward (M >= 40, K >= 16 max(M, N)), bf16 with odd K at M >= 40, and chunk-major order
# (more 192-row chunks of x than 64-column panels, the packed weight small) over several
# panels with a column tail
@pytest.mark.parametrize("m, k, n, dtype", [(40, 520, 70, torch.bfloat16), (40, 1300, 40, torch.float32),
                                            (40, 1300, 40, torch.float16), (50, 33, 20, torch.bfloat16),
                                            (1000, 72, 130, torch.float32), (1000, 72, 130, torch.bfloat16)])
def test_cpu_linear_more_gemm_paths(m, k, n, dtype):
    x, w, b = _x(m, k, dtype), _weight(n, k, dtype), torch.randn(n, dtype=dtype)
    got = ops.linear(x, w, b, "gelu")
    assert rel_err(got, reference.linear(x.double(), w.double(), b.double(), "gelu")) <= TOL[dtype]


# ---------------------------------------------------------------- int8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("outliers", [False, True])
def test_quantize_rowwise_exact(dtype, outliers):
    x = _x(130, 333, dtype, outliers=outliers)
    x[5] = 0  # an all-zero row: scale 1, zeros
    q, s = ops.quantize_rowwise(x.reshape(2, 65, 333))
    rq, rs = reference.quantize_rowwise(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (2, 65)
    assert torch.equal(q.reshape(130, 333), rq) and torch.equal(s.reshape(130), rs)
    assert s.reshape(-1)[5] == 1 and (q.reshape(130, 333)[5] == 0).all()
    assert q.abs().max() <= 127


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_quantize_rowwise_nan_wherever_it_sits(device):
    # 333 = 20 vectors of 16 + a tail of 13: a NaN in the vector part and in the tail alike
    for col in (3, 40, 325, 332):
        x = torch.randn(4, 333, device=device)
        x[1, col] = float("nan")
        x[2, col] = float("inf")
        q, s = ops.quantize_rowwise(x)
        rq, rs = reference.quantize_rowwise(x)
        assert torch.equal(q, rq) and torch.equal(s, rs), col
        assert s[1] == 1 and q[1, col] == 0  # a NaN row: scale 1, the NaN element 0


# below 16 rows the CPU kernel uses dot-product tiles; from 16 (VNNI builds) panels of 64 B
# rows: the cases cover partial panels (N % 64), row tails (M % 6), several row chunks (192),
# two K blocks (2048) and K % 4 != 0 / K % 64 != 0
@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (3, 5, 17), (17, 33, 72), (128, 40, 1000), (16, 129, 64),
                                     (1000, 70, 2100), (23, 1, 4099), (385, 191, 129)])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_int8_mm_is_exact(m, n, k, layout):
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    a[0, :] = 127  # extremes: the largest products
    b[0, :] = -127
    if layout == "strided":  # views with a column stride of 2 and transposed storage
        a = torch.stack([a, a], dim=-1)[..., 0]
        b = b.t().contiguous().t()
    assert torch.equal(torch.ops.mptkernels.int8_mm(a, b), reference.int8_mm(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("outliers", [False, True])
def test_cpu_int8_linear(dtype, m, outliers):
    k, n = 200, 72
    x, w = _x(m, k, dtype, outliers=outliers), _weight(n, k, torch.float32)
    wq, ws = ops.quantize_rowwise(w)
    bias = torch.randn(n)
    for act in ACTS:
        got = ops.int8_linear(x, wq, ws, bias, act)
        # against the same maths on the dequantised operands: fp rounding only
        want = reference.int8_linear(x, wq, ws, bias, act)
        assert rel_err(got, want.double()) <= max(TOL[dtype], 1e-6), act
    # against the unquantised fp32 linear: the quantisation error, stated. Per-row absmax
    # scales give ~0.5/127 relative error per operand; outlier columns inflate the x rows'
    # scale, so the bound is looser there.
    full = torch.nn.functional.linear(x.float(), w, bias)
    assert rel_err(ops.int8_linear(x, wq, ws, bias), full) <= (0.08 if outliers else 0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", MS)
def test_cpu_weight_only_int8_linear(dtype, m):
    k, n = 200, 72
    x, w = _x(m, k, dtype), _weight(n, k, torch.float32)
    wq, ws = ops.quantize_rowwise(w)
    bias = torch.randn(n)
    for b in (bias, None):
        got = ops.weight_only_int8_linear(x.reshape(1, m, k), wq, ws, b)
        want = reference.weight_only_int8_linear(x.double(), wq, ws, None if b is None else b.double())
        assert got.shape == (1, m, n) and got.dtype == dtype
        assert rel_err(got.reshape(m, n), want) <= TOL[dtype]
    # weight-only error vs the fp32 weight: only the weight's rounding (~0.5/127 relative)
    assert rel_err(ops.weight_only_int8_linear(x.float(), wq, ws), torch.nn.functional.linear(x.float(), w)) <= 0.01


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gemm_family_with_empty_k(device):
    """K = 0 (no products): every op returns act(bias) or zeros, with the leading dims kept."""
    x = torch.randn(2, 5, 0, device=device)
    w, wq, ws, b = (torch.randn(7, 0, device=device), torch.zeros(7, 0, dtype=torch.int8, device=device),
                    torch.rand(7, device=device), torch.randn(7, device=device))
    for act in ACTS:
        want = reference.activation(b.expand(2, 5, 7), act)
        assert torch.allclose(ops.linear(x, w, b, act), want)
        assert torch.allclose(ops.int8_linear(x, wq, ws, b, act), want)
    assert torch.allclose(ops.weight_only_int8_linear(x, wq, ws, b), b.expand(2, 5, 7))
    q, s = ops.quantize_rowwise(x)
    assert q.shape == (2, 5, 0) and torch.equal(s, torch.ones(2, 5, device=device))


@pytest.mark.parametrize("backend, device", [("auto", "cpu"), ("reference", "cpu"),
                                             pytest.param("auto", "cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op, act", [("w8a8", None), ("w8a8", "relu"), ("w8a8", "gelu"), ("w8a8", "gelu_tanh"),
                                     ("weight_only", None)])
def test_int8_linears_gradients(backend, device, dtype, op, act):
    """dx straight-through the quantisation: the gradient of act(x @ w_deq.T + b) at the int8
    result's own pre-activation; dbias the same sum. The int8 weight and scale get none."""
    import mptkernels
    m, k, n = 17, 72, 33
    x = _x(m, k, dtype, device).requires_grad_()
    b = torch.randn(n, dtype=dtype, device=device, requires_grad=True)
    wq, ws = ops.quantize_rowwise(_weight(n, k, torch.float32, device))
    w_deq = wq.double() * ws.double()[:, None]
    with mptkernels.backend(backend):
        if op == "w8a8":
            out = ops.int8_linear(x, wq, ws, b, act)
            pre = ops.int8_linear(x.detach(), wq, ws, b.detach(), None).double()
        else:
            out = ops.weight_only_int8_linear(x, wq, ws, b)
            pre = reference.weight_only_int8_linear(x.detach().double(), wq, ws, b.detach().double())
        dout = torch.randn_like(out)
        dx, db = torch.autograd.grad(out, (x, b), dout)
    p = pre.requires_grad_()
    (dpre,) = torch.autograd.grad(reference.activation(p, act), p, dout.double())
    assert dx.dtype == dtype and db.dtype == dtype
    assert rel_err(dx, dpre @ w_deq) <= GRAD_TOL[dtype] and rel_err(db, dpre.sum(0)) <= GRAD_TOL[dtype]
    # activation_grad (the closed forms the backward uses) against autograd, away from the rounding
    h = torch.randn(1000, dtype=torch.float64, device=device)
    for name in ACTS:
        hg = h.clone().requires_grad_()
        (want,) = torch.autograd.grad(reference.activation(hg, name).sum(), hg)
        assert rel_err(reference.activation_grad(torch.ones_like(h), h, name), want) <= 1e-12


def test_non_differentiable_parts_are_explicit():
    w = torch.randn(7, 24, requires_grad=True)
    q, s = ops.quantize_rowwise(w)  # quantising a trainable weight: outputs carry no graph
    assert not q.requires_grad and not s.requires_grad
    with pytest.raises(ValueError, match="w_scale requires grad, but gradients flow to x and bias only"):
        ops.weight_only_int8_linear(torch.randn(3, 24), q, s.requires_grad_())
    with torch.no_grad():  # no gradient asked: fine
        ops.int8_linear(torch.randn(3, 24), q, s)


def test_int8_linears_compile_with_backward():
    x = torch.randn(5, 40, requires_grad=True)
    wq, ws = ops.quantize_rowwise(torch.randn(24, 40))
    b = torch.randn(24, requires_grad=True)

    def f(x, b):
        return ops.weight_only_int8_linear(ops.int8_linear(x, wq, ws, None, "gelu"), wq[:, :24], ws, b).sum()

    want = torch.autograd.grad(f(x, b), (x, b))
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(x, b), (x, b))
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-6


def test_gemm_opcheck():
    x, w, b = torch.randn(5, 24), torch.randn(7, 24), torch.randn(7)
    for act in ("none", "relu", "gelu", "gelu_tanh"):
        torch.library.opcheck(torch.ops.mptkernels.linear_fwd.default,
                              (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), act))
    x, w = x.detach(), w.detach()
    out, pre = torch.ops.mptkernels.linear_fwd(x, w, b.detach(), "gelu")
    torch.library.opcheck(torch.ops.mptkernels.linear_bwd.default, (torch.randn_like(out), x, w, pre, "gelu", True))
    torch.library.opcheck(torch.ops.mptkernels.quantize_rowwise.default, (x,))
    wq, ws = torch.ops.mptkernels.quantize_rowwise(w)
    xq, _ = torch.ops.mptkernels.quantize_rowwise(x)
    torch.library.opcheck(torch.ops.mptkernels.int8_mm.default, (xq, wq))
    for act in ("relu", "gelu"):
        torch.library.opcheck(torch.ops.mptkernels.int8_linear.default,
                              (x.clone().requires_grad_(), wq, ws, b.detach().requires_grad_(), act))
    torch.library.opcheck(torch.ops.mptkernels.weight_only_int8_linear.default, (x.clone().requires_grad_(), wq, ws, None))


def test_torch_compile_fullgraph_mlp():
    """An MPT FFN (up + GELU, down) on the fused linear compiles into one graph and trains."""
    w1, w2 = torch.randn(64, 16, requires_grad=True), torch.randn(16, 64, requires_grad=True)

    def ffn(x):
        return ops.linear(ops.linear(x, w1, activation="gelu"), w2)

    x = torch.randn(3, 5, 16, requires_grad=True)
    want = ffn(x)
    torch._dynamo.reset()
    got = torch.compile(ffn, fullgraph=True)(x)
    assert torch.allclose(got, want, atol=1e-5)
    got.sum().backward()
    assert torch.isfinite(w1.grad).all() and x.grad.shape == x.shape


@pytest.mark.parametrize("call, match", [
    (lambda x, w, q, s: ops.linear(x, w[:, :5]), r"weight is \(N, K\) = \(7, 5\) but x has K = 24"),
    (lambda x, w, q, s: ops.linear(x, w.double()), "weight must have x's dtype"),
    (lambda x, w, q, s: ops.linear(x, w, torch.randn(3)), r"bias must be a float \(7,\)"),
    (lambda x, w, q, s: ops.linear(x, w, activation="swish"), "activation must be one of"),
    (lambda x, w, q, s: ops.linear(x.long(), w.long()),
     r"linear: x must be a float tensor \(\.\.\., K\), got a torch.int64 tensor of shape \(5, 24\)"),
    (lambda x, w, q, s: ops.int8_linear(x, q.float(), s), "w_int8 must be an int8"),
    (lambda x, w, q, s: ops.int8_linear(x[:, :20], q, s), r"w_int8 is \(N, K\) = \(7, 24\) but x has K = 20"),
    (lambda x, w, q, s: ops.int8_linear(x, q, s[:3]), r"w_scale must be a float32 \(7,\)"),
    (lambda x, w, q, s: ops.weight_only_int8_linear(x, q, s.double()), "w_scale must be a float32"),
    (lambda x, w, q, s: ops.weight_only_int8_linear(x.int(), q, s), "x must be a float32"),
    (lambda x, w, q, s: ops.quantize_rowwise(x.double()), "x must be float32, float16 or bfloat16"),
    (lambda x, w, q, s: torch.ops.mptkernels.int8_mm(q, q[:, :5].contiguous()), "their K must match"),
    (lambda x, w, q, s: torch.ops.mptkernels.linear_fwd(x, w, None, "tanh"), "activation must be"),
])
def test_gemm_bad_input(call, match):
    x, w = torch.randn(5, 24), torch.randn(7, 24)
    q, s = ops.quantize_rowwise(w)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(x, w, q, s)


# int8 4x4 dot tiles (4 <= M < 16), B used as is (K % 64 == 0); weight-only's N % 4 tail
@pytest.mark.parametrize("m, k, n", [(5, 128, 72), (12, 384, 33), (4, 64, 4)])
def test_cpu_int8_dot_tiles(m, k, n):
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    assert torch.equal(torch.ops.mptkernels.int8_mm(a, b), reference.int8_mm(a, b))
    x, bias = _x(m, k, torch.float32), torch.randn(n)
    wq, ws = ops.quantize_rowwise(_weight(n, k, torch.float32))
    assert rel_err(ops.int8_linear(x, wq, ws, bias, "gelu"), reference.int8_linear(x, wq, ws, bias, "gelu")) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 70])  # 1-4: the weight read row by row; more: converted blocks
def test_cpu_weight_only_int8_column_tail(dtype, m):
    k, n = 203, 33  # N % 4 != 0; K odd: a partial last vector
    x, bias = _x(m, k, dtype), torch.randn(n)
    wq, ws = ops.quantize_rowwise(_weight(n, k, torch.float32))
    got = ops.weight_only_int8_linear(x, wq, ws, bias)
    assert rel_err(got, reference.weight_only_int8_linear(x.double(), wq, ws, bias.double())) <= TOL[dtype]


# Few rows of x read the weight as several streams: each task's weight rows are cut into equal
# parts and a step takes one row from each (dot_gemm; weight-only int8's direct rows). Every
# element is checked against the reference (a row written to the wrong column, or not at all,
# shows: the output's memory is first filled with NaN by a NaN run of the same shape), for
# tasks of every remainder (n, 1-3 threads), and the result is the same bit for bit whatever
# the thread count (a row's arithmetic does not depend on where it lands in a step).
@pytest.mark.parametrize("kind", [torch.float32, torch.bfloat16, torch.float16, "weight_only"])
@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_cpu_few_row_linears_read_rows_as_streams(kind, m):
    dtype = torch.float32 if kind == "weight_only" else kind
    out_eps = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    k = 77  # a partial last step for every tile
    threads = torch.get_num_threads()
    try:
        for n in (7, 67, 201, 1030):
            x, b = _x(m, k, dtype), torch.randn(n, dtype=dtype)
            if kind == "weight_only":
                wq, ws = ops.quantize_rowwise(_weight(n, k, torch.float32))
                run = lambda x: ops.weight_only_int8_linear(x, wq, ws, b)  # noqa: E731
                want = reference.weight_only_int8_linear(x.double(), wq, ws, b.double())
                w_abs = wq.double().abs() * ws.double()[:, None]
            else:
                w = _weight(n, k, dtype)
                run = lambda x: ops.linear(x, w, b)  # noqa: E731
                want = reference.linear(x.double(), w.double(), b.double(), None)
                w_abs = w.double().abs()
            bound = out_eps * want.abs() + 1e-5 * (x.double().abs() @ w_abs.T + b.double().abs())
            outs = []
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                run(torch.full_like(x, float("nan")))  # leaves NaN where the next output may land
                outs.append(run(x))
                bad = ~((outs[-1].double() - want).abs() <= bound)
                assert not bad.any(), (n, t, bad.nonzero()[:5].tolist())
            assert all(torch.equal(outs[0], o) for o in outs[1:]), n
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- GPU (the lent machine)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 16, 17, 1000, 4096])
def test_gpu_gemm_family(dtype, m):
    k, n = 1000, 1100
    x, w, b = _x(m, k, dtype, "cuda"), _weight(n, k, dtype, "cuda"), torch.randn(n, device="cuda", dtype=dtype)
    for act in ACTS:
        got = ops.linear(x, w, b, act)
        assert rel_err(got, reference.linear(x.double(), w.double(), b.double(), act)) <= TOL[dtype]
    q, s = ops.quantize_rowwise(x)
    rq, rs = reference.quantize_rowwise(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    wq, ws = ops.quantize_rowwise(w)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
    assert torch.equal(torch.ops.mptkernels.int8_mm(a, wq), reference.int8_mm(a, wq))
    for act in ACTS:
        assert rel_err(ops.int8_linear(x, wq, ws, b, act), reference.int8_linear(x, wq, ws, b, act).double()) <= TOL[dtype]
    assert rel_err(ops.weight_only_int8_linear(x, wq, ws, b),
                   reference.weight_only_int8_linear(x.double(), wq, ws, b.double())) <= TOL[dtype]
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    out = ops.linear(xg, wg, bg, "gelu")
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (xg, wg, bg), dout)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    want = torch.autograd.grad(reference.linear(x64, w64, b64, "gelu"), (x64, w64, b64), dout.double())
    for g, r in zip(got, want):
        assert rel_err(g, r) <= GRAD_TOL[dtype]


# ---------------------------------------------------------------- modules, quantize_, patch(int8=)
def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.GELU(), torch.nn.Linear(160, 96),
                               torch.nn.LayerNorm(96), torch.nn.Linear(96, 40, bias=False))


@pytest.mark.parametrize("mode, tol", [("w8a8", 0.03), ("weight_only", 0.01)])
def test_quantize_keeps_outputs_and_state_dict_loads(mode, tol):
    import mptkernels

    model, x = _mlp(), torch.randn(4, 7, 96)
    want = model(x)
    report = mptkernels.quantize_(model, mode)
    assert len(report) == 3 and report.bytes_after < report.bytes_before / 3
    assert all(isinstance(model[i], mptkernels.nn.Int8Linear) for i in (0, 2, 4))
    with torch.no_grad():
        got = model(x)
    assert rel_err(got, want) <= tol, rel_err(got, want)  # the stated quantisation error
    # the quantised state_dict loads into another model quantised the same way
    other = _mlp()
    torch.nn.init.zeros_(other[0].weight)
    mptkernels.quantize_(other, mode)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), got)
    assert "w_int8" in "".join(model.state_dict())


def test_quantize_filter_and_errors():
    import mptkernels

    model = _mlp()
    report = mptkernels.quantize_(model, "weight_only", filter=lambda name, m: name != "4")
    assert [c.name for c in report.swapped] == ["0", "2"] and type(model[4]) is torch.nn.Linear
    with pytest.raises(ValueError, match="mode must be one of"):
        mptkernels.quantize_(model, "int4")
    with pytest.raises(ValueError, match="needs a calibration batch"):
        mptkernels.quantize_(model, "auto")
    with pytest.raises(ValueError, match="mode must be one of"):
        mptkernels.nn.Int8Linear(4, 4, mode="fp8")


def _fused_mlp():
    import mptkernels

    torch.manual_seed(0)
    return torch.nn.Sequential(mptkernels.nn.Linear(96, 160, activation="gelu"),
                               mptkernels.nn.Linear(160, 128, bias=False, activation="relu"),
                               torch.nn.Linear(128, 96), mptkernels.nn.Linear(96, 40))


@pytest.mark.parametrize("mode, tol", [("w8a8", 0.03), ("weight_only", 0.01)])
def test_quantize_carries_the_fused_activation(mode, tol):
    # mptkernels.nn.Linear's activation goes into the Int8Linear: fused into the W8A8 epilogue, applied
    # to the GEMM's output in weight_only; the model keeps the float model's output within the stated error
    import mptkernels

    model, x = _fused_mlp(), torch.randn(4, 7, 96)
    with torch.no_grad():
        want = model(x)
    first = model[0]
    report = mptkernels.quantize_(model, mode)
    assert [c.name for c in report.swapped] == ["0", "1", "2", "3"]
    assert all(type(m) is mptkernels.nn.Int8Linear and m.mode == mode for m in model)
    assert [m.activation for m in model] == ["gelu", "relu", None, None]
    with torch.no_grad():
        got = model(x)
        assert rel_err(got, want) <= tol, rel_err(got, want)
        q, s = ops.quantize_rowwise(first.weight.detach())
        one = (ops.int8_linear(x, q, s, first.bias, "gelu") if mode == "w8a8" else
               torch.nn.functional.gelu(ops.weight_only_int8_linear(x, q, s, first.bias)))
        assert torch.equal(model[0](x), one)
    # "auto" measures each layer against its own output, activation included
    model = _fused_mlp()
    report = mptkernels.quantize_(model, "auto", calibration=x, max_error=0.03, repeats=1)
    assert all(max(c.errors.values()) <= 0.03 for c in report.layers), str(report)
    assert [getattr(m, "activation", None) for m in model] == ["gelu", "relu", None, None]


def test_quantize_registry_leaves_unknown_module_types():
    import mptkernels
    from mptkernels import quantize

    class MyLinear(torch.nn.Linear):  # a subclass is another type: not swapped, as before
        pass

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), MyLinear(8, 8), torch.nn.Conv1d(8, 8, 1),
                                torch.nn.Embedding(4, 8), mptkernels.nn.Linear(8, 8, activation="relu"))
    report = mptkernels.quantize_(model, "weight_only")
    assert [c.name for c in report.layers] == ["0", "4"]
    assert [type(m).__name__ for m in model] == ["Int8Linear", "MyLinear", "Conv1d", "Embedding", "Int8Linear"]
    assert len(mptkernels.quantize_(model, "w8a8")) == 0  # Int8Linear: already quantised, left alone
    for lone in (torch.nn.Linear(8, 8), mptkernels.nn.Linear(8, 8)):
        with pytest.raises(ValueError, match="the model itself is an"):
            mptkernels.quantize_(lone)
    with pytest.raises(ValueError, match="activation must be one of"):
        mptkernels.nn.Int8Linear(4, 4, mode="weight_only", activation="tanh")
    # from_float keeps a fused linear's activation by default and refuses another one
    assert mptkernels.nn.Int8Linear.from_float(mptkernels.nn.Linear(8, 8, activation="gelu"),
                                               mode="weight_only").activation == "gelu"
    with pytest.raises(ValueError, match="the layer applies activation 'gelu'"):
        mptkernels.nn.Int8Linear.from_float(mptkernels.nn.Linear(8, 8, activation="gelu"), activation="relu")
    # one handler per type: registering one makes quantize_ take that type
    quantize.register_handler(MyLinear)(lambda lin, mode: mptkernels.nn.Int8Linear.from_float(lin, mode=mode))
    try:
        assert [c.name for c in mptkernels.quantize_(model, "weight_only").layers] == ["1"]
        assert type(model[1]) is mptkernels.nn.Int8Linear
    finally:
        del quantize._HANDLERS[MyLinear]


def test_quantize_auto_refuses_modes_over_the_error_threshold():
    """An input with a huge outlier column makes W8A8's per-token scale useless for the rest of
    the row: auto must measure that and keep the layer out of W8A8; every chosen mode's
    measured error is within max_error."""
    import mptkernels

    model = _mlp()
    x = torch.randn(64, 96)
    x[:, 3] = 500.0  # dominates every row's absmax, so the other features quantise to ~0 ...
    with torch.no_grad():
        model[0].weight[:, 3] = 0.0  # ... while contributing nothing to the output
    ref_first = model[0](x)
    report = mptkernels.quantize_(model, "auto", calibration=x, max_error=0.02, repeats=2)
    first = report.layers[0]
    assert first.errors["w8a8"] > 0.02 and first.mode != "w8a8"
    for c in report.layers:
        assert set(c.errors) == {"weight_only", "w8a8"} and set(c.times_ms) == {"float", "weight_only", "w8a8"}
        assert c.mode == "float" or c.errors[c.mode] <= 0.02
    with torch.no_grad():
        assert rel_err(model[0](x), ref_first) <= 0.02
    assert "err" in str(report) and "float: " in str(report)  # every mode's time, the float one too


def test_patch_int8_and_fused_linear_module():
    import mptkernels

    model, x = _mlp(), torch.randn(5, 96)
    want = model(x)
    report = mptkernels.patch(model, int8="weight_only")
    assert len(report.swapped) == 1 and len(report.int8) == 3  # the LayerNorm and three linears
    with torch.no_grad():
        assert rel_err(model(x), want) <= 0.01
    lin = mptkernels.nn.Linear(96, 40, activation="gelu")
    ref = torch.nn.functional.gelu(torch.nn.functional.linear(x, lin.weight, lin.bias))
    assert rel_err(lin(x), ref) <= 1e-5 and set(lin.state_dict()) == {"weight", "bias"}
