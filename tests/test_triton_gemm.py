"""Triton GEMM kernels (mptkernels/triton/gemm.py) against mptkernels.reference.

Interpreter tests (no GPU: TRITON_INTERPRET=1, CPU tensors, small shapes) cover fp32 and fp16
wherever a kernel calls tl.dot on floating-point inputs: the interpreter's tl.dot returns garbage
for bf16 inputs. Kernels without a floating-point dot (quantize_rowwise, activation_bwd, the
epilogue of int8_linear) are also run on bf16 there; the int8 tl.dot (out_dtype=int32) is exact
in the interpreter. The interpreter's fp32 -> bf16 conversion truncates (the GPU rounds to
nearest even), so bf16 outputs there are held to the bf16 tolerance only. The gpu tests repeat
the comparisons with bf16/fp16 and large shapes.
"""
import importlib

import pytest
import torch

import mptkernels.triton as mptkernels_triton
from mptkernels import reference
from conftest import HAS_CUDA, rel_err

# ||out - ref|| / ||ref|| against the reference run on the same inputs (fp32 accumulation,
# rounded once to the dtype): what is left is the output rounding (rms ~0.3 ulp: fp16 2e-4,
# bf16 2e-3), fp32 summation order and the erf/exp implementations (~1e-7).
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
# gradients through the activation: one fp32 formula each, rounded to the dtype
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")
# (M, K, N): M = 1 (decode), tiny, odd, and above the small-M class (64); K and N not
# multiples of 16 (ragged K edge, wrapped rows and columns), K spanning several BLOCK_K
# steps, and one shape with K a multiple of BLOCK_K (the unmasked EVEN_K loop)
INTERP_SHAPES = [(1, 40, 72), (3, 72, 33), (17, 300, 40), (80, 136, 72), (16, 256, 48)]

interpreter_only = pytest.mark.skipif(HAS_CUDA, reason="interpreter run; on a GPU the gpu tests cover Triton")


def _gemm():
    return importlib.import_module("mptkernels.triton.gemm")


def _ref_act(activation):
    return None if activation == "none" else activation


def _linear_case(M, K, N, dtype, device="cpu", bias=True, bias_dtype=None):
    x = torch.randn(M, K, dtype=dtype, device=device)
    w = (torch.randn(N, K, device=device) / K ** 0.5).to(dtype)  # unit-variance outputs
    b = torch.randn(N, dtype=bias_dtype or dtype, device=device) if bias else None
    return x, w, b


def _int8_weight(N, K, device="cpu"):
    """A per-row quantised weight: int8 in [-127, 127] and its fp32 scale (N,)."""
    return reference.quantize_rowwise(torch.randn(N, K, device=device) / K ** 0.5)


def _check_linear(tg, x, w, b, activation, tol):
    out, preact = tg.linear_fwd(x, w, b, activation)
    assert out.dtype == x.dtype and out.shape == (x.shape[0], w.shape[0])
    assert rel_err(out, reference.linear(x, w, b, _ref_act(activation))) <= tol
    if activation in ("gelu", "gelu_tanh"):
        assert preact.dtype == x.dtype and preact.shape == out.shape
        assert rel_err(preact, reference.linear(x, w, b, None)) <= tol
    else:
        assert preact.shape == (0,)


# ------------------------------------------------------------------ interpreter: linear
@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # interpreter: no bf16 tl.dot
@pytest.mark.parametrize("shape", INTERP_SHAPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_triton_interpreter_linear(dtype, shape, activation):
    tg = _gemm()
    for bias in (True, False):
        x, w, b = _linear_case(*shape, dtype, bias=bias)
        _check_linear(tg, x, w, b, activation, TOL[dtype])
    # an fp32 bias with 16-bit x and weight
    x, w, b = _linear_case(*shape, dtype, bias_dtype=torch.float32)
    _check_linear(tg, x, w, b, activation, TOL[dtype])


@interpreter_only
# gelu_tanh's exp(-2u) overflows to inf for large negative h by design (h / inf = -0); NumPy warns
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "none"])
def test_triton_interpreter_activation_bwd(dtype, activation):
    tg = _gemm()
    # spans the ragged last block; values around the kinks and the gelus' tails
    h = (torch.randn(37, 61) * 3).to(dtype)
    h[0, :5] = torch.tensor([0.0, -0.0, 1e-3, -1e-3, 30.0], dtype=dtype)
    dout = torch.randn_like(h)
    h64 = h.double().requires_grad_()
    want = torch.autograd.grad(reference.activation(h64, _ref_act(activation)), h64, dout.double())[0]
    saved = reference.activation(h, "relu") if activation == "relu" else h
    dpre = tg.activation_bwd(dout, saved, activation)
    assert dpre.dtype == dtype and dpre.shape == h.shape
    assert rel_err(dpre, want) <= GRAD_TOL[dtype]
    # the backward of linear_fwd's own outputs: preact for the gelus, out for relu
    x, w, b = _linear_case(3, 40, 72, torch.float32)
    out, preact = tg.linear_fwd(x, w, b, activation)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    h64 = torch.nn.functional.linear(x64, w64, b64)
    g = torch.randn_like(out)
    want = torch.autograd.grad(reference.activation(h64, _ref_act(activation)), h64, g.double())[0]
    got = tg.activation_bwd(g, preact if activation in ("gelu", "gelu_tanh") else out, activation)
    assert rel_err(got, want) <= 1e-5


# ------------------------------------------------------------------ interpreter: int8
@interpreter_only
@pytest.mark.parametrize("shape", INTERP_SHAPES + [(2, 1000, 5)], ids=str)
def test_triton_interpreter_int8_mm_is_exact(shape):
    tg = _gemm()
    M, K, N = shape
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    b = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    out = tg.int8_mm(a, b)
    assert out.dtype == torch.int32 and torch.equal(out, reference.int8_mm(a, b))
    # the extremes: |acc| = 128 * 128 * K
    a.fill_(-128)
    assert torch.equal(tg.int8_mm(a, b.fill_(-128)), reference.int8_mm(a, b))


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", INTERP_SHAPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_triton_interpreter_int8_linear(dtype, shape, activation):
    tg = _gemm()
    M, K, N = shape
    for bias in (True, False):
        x = torch.randn(M, K, dtype=dtype)
        w, ws = _int8_weight(N, K)
        b = torch.randn(N, dtype=dtype) if bias else None
        out = tg.int8_linear(x, w, ws, b, activation)
        assert out.dtype == dtype and out.shape == (M, N)
        # the same fp32 epilogue in the same order: equal up to erf/exp and one output rounding
        assert rel_err(out, reference.int8_linear(x, w, ws, b, _ref_act(activation))) <= TOL[dtype] / 2


@interpreter_only
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_interpreter_int8_linear_out_dtype(out_dtype):
    tg = _gemm()
    x = torch.randn(17, 72).to(out_dtype)  # the output has x's dtype (quantize_rowwise has no dot: bf16 runs)
    w, ws = _int8_weight(33, 72)
    b = torch.randn(33)
    out = tg.int8_linear(x, w, ws, b, "gelu")
    # fp32 reference rounded once to out_dtype, as the kernel rounds its fp32 epilogue. The
    # interpreter converts fp32 to bf16 by truncation (round toward zero, up to one bf16 ulp off;
    # the GPU rounds to nearest even), so bf16 gets the full bf16 tolerance here.
    want = reference.int8_linear(x, w, ws, b, "gelu").to(out_dtype)
    tol = TOL[out_dtype] if out_dtype == torch.bfloat16 else TOL[out_dtype] / 4
    assert out.dtype == out_dtype and rel_err(out, want) <= tol


def _quantize_case(M, K, dtype):
    x = (torch.randn(M, K) * 2).to(dtype)
    if M >= 3:
        x[1] = 0  # all-zero row: scale 1, q 0
        x[2, K // 2] = x[2].abs().max() * 50  # an outlier squashes the rest of its row
    if M >= 4:
        # absmax 127 gives scale exactly 1: ties x.5 must round to even, both signs
        ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5])
        x[3] = 0
        x[3, : min(K, ties.numel())] = ties[:K].to(dtype)
    return x


def _check_quantize(tg, x):
    q, scale = tg.quantize_rowwise(x)
    want_q, want_scale = reference.quantize_rowwise(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(scale, want_scale), "scale must be bit-identical to the reference"
    assert torch.equal(q, want_q)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 40), (3, 72), (17, 33), (80, 300), (5, 4096)], ids=str)
def test_triton_interpreter_quantize_rowwise_is_exact(dtype, shape):
    _check_quantize(_gemm(), _quantize_case(*shape, dtype))


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_interpreter_quantize_rowwise_looped(monkeypatch, dtype):
    """Rows longer than QUANT_FUSED_MAX_BLOCK_K take the two-pass chunked kernel."""
    tg = _gemm()
    monkeypatch.setattr(tg, "QUANT_FUSED_MAX_BLOCK_K", 64)
    monkeypatch.setattr(tg, "QUANT_LOOPED_BLOCK_K", 32)
    _check_quantize(tg, _quantize_case(6, 300, dtype))  # 300 = 9 chunks + a ragged one


@interpreter_only
def test_triton_interpreter_quantize_rowwise_exact_on_many_rows():
    """Every fp32 row scale and quotient of 4000 random rows, including values that round
    to +-127 and ties hit by chance; catches an inexact divide or a wrong rounding mode."""
    x = torch.randn(4000, 24) * torch.logspace(-6, 6, 4000).unsqueeze(1)
    _check_quantize(_gemm(), x)


# ------------------------------------------------------------------ interpreter: weight-only int8
@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # interpreter: no bf16 tl.dot
@pytest.mark.parametrize("shape", INTERP_SHAPES, ids=str)
def test_triton_interpreter_weight_only_int8_linear(dtype, shape):
    tg = _gemm()
    M, K, N = shape
    for bias in (True, False):
        x = torch.randn(M, K, dtype=dtype)
        w, ws = _int8_weight(N, K)
        b = torch.randn(N, dtype=dtype) if bias else None
        out = tg.weight_only_int8_linear(x, w, ws, b)
        assert out.dtype == dtype and out.shape == (M, N)
        assert rel_err(out, reference.weight_only_int8_linear(x, w, ws, b)) <= TOL[dtype]


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 16])
def test_triton_interpreter_weight_only_split_k(monkeypatch, dtype, M):
    """The decode path with several K splits and the deterministic second-pass reduction."""
    tg = _gemm()
    monkeypatch.setattr(tg, "WO_DECODE_PROGRAMS_PER_SM", 64)  # the interpreter counts one SM
    monkeypatch.setattr(tg, "WO_DECODE_MIN_K_BLOCKS", 1)
    K, N = 300, 72
    block_n, block_k = tg.WO_DECODE_CONFIGS["fp32" if dtype == torch.float32 else "16bit"][:2]
    fit = mptkernels_triton.fit
    splits, k_per_split = tg.wo_decode_splits(N, K, fit(block_n, N), fit(block_k, K), 1)
    assert splits > 1 and (splits - 1) * k_per_split < K  # no empty split
    x = torch.randn(M, K, dtype=dtype)
    w, ws = _int8_weight(N, K)
    b = torch.randn(N, dtype=torch.float32)
    runs = [tg.weight_only_int8_linear(x, w, ws, b) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]), "the split-K reduction must be deterministic"
    assert rel_err(runs[0], reference.weight_only_int8_linear(x, w, ws, b)) <= TOL[dtype]


# ------------------------------------------------------------------ interpreter: tiling and edges
@interpreter_only
def test_triton_interpreter_grouped_order_with_many_tiles(monkeypatch):
    """Small (still GPU-legal) tiles make a 5 x 5 grid of tiles walked in groups of 2 row
    tiles (the last group short): every tile written exactly once, in every tiled kernel."""
    tg = _gemm()
    for table in ("LINEAR_CONFIGS", "WO_CONFIGS"):
        monkeypatch.setattr(tg, table, {key: (16, 16, 16, 2, 4, 2) for key in getattr(tg, table)})
    monkeypatch.setattr(tg, "INT8_CONFIGS", {key: (16, 16, 32, 2, 4, 2) for key in tg.INT8_CONFIGS})
    M, K, N = 80, 72, 70
    x, w, b = _linear_case(M, K, N, torch.float32)
    _check_linear(tg, x, w, b, "gelu", TOL[torch.float32])
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    wq, ws = _int8_weight(N, K)
    assert torch.equal(tg.int8_mm(a, wq), reference.int8_mm(a, wq))
    assert rel_err(tg.int8_linear(x, wq, ws, b, "relu"),
                   reference.int8_linear(x, wq, ws, b, "relu")) <= TOL[torch.float32]
    assert rel_err(tg.weight_only_int8_linear(x, wq, ws, b),
                   reference.weight_only_int8_linear(x, wq, ws, b)) <= TOL[torch.float32]


@interpreter_only
def test_triton_interpreter_empty_and_k0():
    tg = _gemm()
    x, w, b = _linear_case(5, 8, 6, torch.float32)
    wq, ws = _int8_weight(6, 8)
    xq, xs = reference.quantize_rowwise(x)
    for m, n in ((0, 6), (5, 0), (0, 0)):
        out, pre = tg.linear_fwd(x[:m], w[:n], b[:n], "gelu")
        assert out.shape == (m, n) and pre.shape == (m, n)
        assert tg.int8_mm(xq[:m], wq[:n]).shape == (m, n)
        assert tg.int8_linear(x[:m], wq[:n], ws[:n], b[:n], "relu").shape == (m, n)
        assert tg.weight_only_int8_linear(x[:m], wq[:n], ws[:n], b[:n]).shape == (m, n)
    q, scale = tg.quantize_rowwise(x[:0])
    assert q.shape == (0, 8) and scale.shape == (0,)
    assert tg.activation_bwd(torch.empty(0, 6), torch.empty(0, 6), "gelu").shape == (0, 6)
    # K = 0: the product is empty, only the bias (through the activation) remains
    out, pre = tg.linear_fwd(x[:, :0], w[:, :0], b, "gelu")
    assert torch.equal(pre, b.expand(5, 6)) and rel_err(out, reference.activation(b, "gelu").expand(5, 6)) <= 1e-6
    assert torch.equal(tg.int8_mm(xq[:, :0], wq[:, :0]), torch.zeros(5, 6, dtype=torch.int32))
    assert torch.equal(tg.weight_only_int8_linear(x[:, :0], wq[:, :0], ws, None), torch.zeros(5, 6))
    q, scale = tg.quantize_rowwise(x[:, :0])
    assert q.shape == (5, 0) and torch.equal(scale, torch.ones(5))


# ------------------------------------------------------------------ GPU
GPU_DTYPES = [torch.bfloat16, torch.float16]
# (K, N): a square layer (K a multiple of every BLOCK_K: the unmasked loop) and a ragged one
# (K and N not multiples of 16)
GPU_KN = [(4096, 4096), (1000, 4104)]
GPU_M = [1, 16, 1000, 4096]
# every activation at every M on the ragged shape, gelu on the square one: each (activation,
# bias, EVEN_K, M class, dtype) is a separate compiled kernel, so the full cross product would
# spend minutes compiling variants that test nothing new
GPU_EPILOGUE_CASES = ([(M, GPU_KN[1], act) for M in GPU_M for act in ACTIVATIONS]
                      + [(M, GPU_KN[0], "gelu") for M in GPU_M])


def _int8_linear_expected(xq, xs, w, ws, b, activation, out_dtype):
    """reference.int8_linear after its quantisation step, with the integer product done in
    fp64 on the GPU (exact: every partial sum is an integer below 2**53). reference.int8_mm's
    int64 matmul does not run on CUDA tensors (torch has no CUDA integer matmul,
    pytorch/pytorch#44428: "addmm_cuda" not implemented for 'Long')."""
    acc = (xq.double() @ w.double().t()).float()
    h = acc * xs.unsqueeze(1) * ws.float().unsqueeze(0)
    if b is not None:
        h = h + b.float()
    return reference.activation(h, _ref_act(activation)).to(out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("M, kn, activation", GPU_EPILOGUE_CASES, ids=str)
def test_gpu_linear(dtype, M, kn, activation):
    _check_gpu_linear(dtype, M, kn, activation)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 1000])  # both M classes
@pytest.mark.parametrize("kn", GPU_KN, ids=str)
@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh"])  # fp32 tells MPT's gelu from gelu_tanh
def test_gpu_linear_fp32(M, kn, activation):
    _check_gpu_linear(torch.float32, M, kn, activation)


def _check_gpu_linear(dtype, M, kn, activation):
    tg = _gemm()
    K, N = kn
    for bias in (True, False):
        x, w, b = _linear_case(M, K, N, dtype, device="cuda", bias=bias)
        # fp64 reference: the fp32 case is compared at fp32 accuracy, not against cuBLAS
        out, preact = tg.linear_fwd(x, w, b, activation)
        x64, w64 = x.double(), w.double()
        b64 = None if b is None else b.double()
        assert rel_err(out, reference.linear(x64, w64, b64, _ref_act(activation))) <= TOL[dtype]
        if activation in ("gelu", "gelu_tanh"):
            assert rel_err(preact, reference.linear(x64, w64, b64, None)) <= TOL[dtype]
        else:
            assert preact.shape == (0,)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES + [torch.float32])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_gpu_activation_bwd(dtype, activation):
    tg = _gemm()
    h = (torch.randn(4099, 1031, device="cuda") * 3).to(dtype)
    dout = torch.randn_like(h)
    h64 = h.double().requires_grad_()
    want = torch.autograd.grad(reference.activation(h64, activation), h64, dout.double())[0]
    saved = torch.relu(h) if activation == "relu" else h
    assert rel_err(tg.activation_bwd(dout, saved, activation), want) <= GRAD_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("M", GPU_M)
@pytest.mark.parametrize("kn", GPU_KN + [(72, 40)], ids=str)
def test_gpu_int8_mm_is_exact(M, kn):
    tg = _gemm()
    K, N = kn
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, device="cuda")
    b = torch.randint(-128, 128, (N, K), dtype=torch.int8, device="cuda")
    want = (a.double() @ b.double().t()).to(torch.int32)  # exact, see _int8_linear_expected
    assert torch.equal(tg.int8_mm(a, b), want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("M, kn, activation", GPU_EPILOGUE_CASES, ids=str)
def test_gpu_int8_linear(dtype, M, kn, activation):
    tg = _gemm()
    K, N = kn
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    w, ws = _int8_weight(N, K, device="cuda")
    for b in (torch.randn(N, dtype=dtype, device="cuda"), None):
        xq, xs = tg.quantize_rowwise(x)  # bit-exact, tested below
        out = tg.int8_linear(x, w, ws, b, activation)
        assert out.dtype == dtype
        assert rel_err(out, _int8_linear_expected(xq, xs, w, ws, b, activation, dtype)) <= TOL[dtype] / 2
        # and the whole W8A8 path against the dequantised float reference
        deq = reference.linear(x.float(), w.float() * ws.unsqueeze(1), None if b is None else b.float(),
                               _ref_act(activation))
        assert rel_err(out, deq) <= 3e-2  # int8 quantisation error of x and w


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES + [torch.float32])
@pytest.mark.parametrize("shape", [(1, 4096), (4096, 4096), (1000, 1000), (3, 20000), (4096, 40)], ids=str)
def test_gpu_quantize_rowwise_is_exact(dtype, shape):
    """(3, 20000) takes the two-pass kernel. The reference runs on the CPU: on CUDA tensors torch
    computes ``absmax / 127.0`` as absmax * fl(1/127) (a division by a CPU scalar becomes a
    multiplication), which is off by one ulp from the exact quotient for ~4% of rows."""
    tg = _gemm()
    x = _quantize_case(*shape, dtype).cuda()
    q, scale = tg.quantize_rowwise(x)
    want_q, want_scale = reference.quantize_rowwise(x.cpu())
    assert torch.equal(scale.cpu(), want_scale)
    assert torch.equal(q.cpu(), want_q)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES + [torch.float32])
@pytest.mark.parametrize("M", GPU_M + [3])
# on 132 SMs at M <= 16: a fused QKV projection (192 column tiles x 2 K splits), a ragged shape
# (65 x 2, the last split short), an FFN down-projection (64 x 8, long K)
@pytest.mark.parametrize("kn", [(4096, 12288), (1000, 4104), (11008, 4096)], ids=str)
def test_gpu_weight_only_int8_linear(dtype, M, kn):
    tg = _gemm()
    K, N = kn
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    w, ws = _int8_weight(N, K, device="cuda")
    for b in (torch.randn(N, dtype=dtype, device="cuda"), None):
        runs = [tg.weight_only_int8_linear(x, w, ws, b) for _ in range(2)]
        assert torch.equal(runs[0], runs[1]), "must be deterministic (split-K: fixed reduction order)"
        w64 = w.double() * ws.double().unsqueeze(1)
        want = torch.nn.functional.linear(x.double(), w64, None if b is None else b.double())
        assert runs[0].dtype == dtype and rel_err(runs[0], want) <= TOL[dtype]


@pytest.mark.gpu
def test_gpu_weight_only_decode_splits_fill_the_gpu():
    tg = _gemm()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    block_n, block_k = tg.WO_DECODE_CONFIGS["16bit"][:2]
    splits, k_per_split = tg.wo_decode_splits(4096, 4096, block_n, block_k, sms)
    assert splits > 1 and k_per_split % block_k == 0 and (splits - 1) * k_per_split < 4096
