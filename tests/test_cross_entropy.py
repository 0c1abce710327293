"""linear_cross_entropy (mptkernels/ops/cross_entropy.py): every implementation against the
float64 reference and against F.cross_entropy on the materialised logits (an oracle that is not
ours), many chunks (a small forced chunk), ignored rows, label smoothing, z-loss, softcap, bias,
the three reductions; gradients of x, weight and bias; bf16 against the fp32 reference; opcheck
of both custom ops; torch.compile(fullgraph=True) forward + backward; bad input."""
import types

import pytest
import torch
import torch.nn.functional as F

import mptkernels
from mptkernels import _dispatch, ops, reference
from mptkernels.ops import cross_entropy as ce
from conftest import rel_err as _rel_err


def rel_err(out, ref):
    """conftest's relative error; against an exact zero (V = 1: every loss and gradient is 0) the
    absolute error (float64 rounding, ~1e-16, is then what the reference adds)."""
    if ref.double().norm() < 1e-12:
        return (out.double() - ref.double()).norm().item() if torch.isfinite(out).all() else float("inf")
    return _rel_err(out, ref)

# ||out - ref|| / ||ref|| against the float64 reference, per dtype: fp32 and fp64 at the house's
# fp32 bound (sums of V terms in fp32, ~1e-7 here); bf16: the logits chunk and dlogits rounded
# to bf16 (2^-9 relative) and the GEMMs' bf16 inputs, at the house's 2e-2
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# Without a GPU the Triton kernel runs on CPU tensors under the interpreter (tests/conftest.py sets
# it; triton is a dependency): these tests then require it. On a GPU they use no interpreter.
HAS_CUDA = torch.cuda.is_available()
ON_GPU = "on a GPU Triton runs on CUDA tensors, not under the interpreter these tests use"


@pytest.fixture
def small_chunks(monkeypatch):
    """16 rows of a 33-class vocabulary per chunk (fewer rows for bigger V): many chunks."""
    monkeypatch.setattr(ce, "CHUNK_BYTES", 16 * 33 * 4)


def _inputs(shape, H, V, dtype, *, bias=False, ignore_every=0, grad=True):
    x = torch.randn(*shape, H, dtype=dtype) * 2
    w = torch.randn(V, H, dtype=dtype) / H ** 0.5 * 3
    b = torch.randn(V, dtype=dtype) if bias else None
    t = torch.randint(0, V, shape)
    if ignore_every:
        t.view(-1)[1::ignore_every] = -100
    leaves = [a.requires_grad_(grad) if a is not None else None for a in (x, w, b)]
    return leaves[0], leaves[1], t, leaves[2]


def _materialised(x, w, t, b, kw, dtype=torch.float64):
    """F.cross_entropy on the whole logits in dtype (+ the z-loss term by hand): PyTorch's loss."""
    z = F.linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))
    z = z.reshape(-1, w.shape[0])
    if kw.get("logit_softcap") is not None:
        z = kw["logit_softcap"] * torch.tanh(z / kw["logit_softcap"])
    tt = t.reshape(-1)
    red = kw.get("reduction", "mean")
    loss = F.cross_entropy(z, tt, ignore_index=-100, reduction=red, label_smoothing=kw.get("label_smoothing", 0.0))
    if kw.get("z_loss"):
        valid = tt != -100
        zl = torch.where(valid, z.logsumexp(-1) ** 2, 0.0)
        loss = loss + kw["z_loss"] * (zl if red == "none" else zl.sum() / (valid.sum() if red == "mean" else 1))
    return loss.reshape(t.shape) if red == "none" else loss


def _grads(loss, inputs, g):
    return torch.autograd.grad(loss, [a for a in inputs if a is not None], g)


FEATURES = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "zloss_softcap": {"z_loss": 1e-2, "logit_softcap": 4.0},
    "all": {"label_smoothing": 0.25, "z_loss": 1e-3, "logit_softcap": 2.5},
}
SIZES = [((1,), 17, 1), ((7,), 64, 33), ((3, 100), 17, 1000)]  # N = 1, 7, 300; V = 1, 33, 1000


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("shape, H, V", SIZES, ids=lambda v: str(v))
def test_cpu_matches_reference_and_f_cross_entropy(small_chunks, shape, H, V, feature, reduction):
    kw = dict(FEATURES[feature], reduction=reduction)
    x, w, t, b = _inputs(shape, H, V, torch.float32, bias=feature != "plain", ignore_every=5)
    n = t.numel()
    assert ce.chunk_rows(n, V) < n or n <= 16  # several chunks where there are rows for them
    with mptkernels.backend("cpu"):
        loss = ops.linear_cross_entropy(x, w, t, bias=b, **kw)
    inputs64 = [a.detach().double().requires_grad_() if a is not None else None for a in (x, w, b)]
    want = reference.linear_cross_entropy(inputs64[0], inputs64[1], t, inputs64[2], **kw)
    torch_loss = _materialised(*[a.detach() if a is not None else None for a in (x, w)], t, b, kw)
    assert loss.dtype == torch.float32 and loss.shape == want.shape == torch_loss.shape
    assert rel_err(want, torch_loss) <= 1e-12  # the reference is F.cross_entropy's loss
    assert rel_err(loss, want) <= TOL[torch.float32], rel_err(loss, want)
    g = torch.randn_like(want)  # not 1: the backward's scaling runs
    got = _grads(loss, (x, w, b), g.float())
    ref = _grads(want, inputs64, g)
    # PyTorch's own fp32 error: where the softcap saturates, its derivative sech^2(z / c) turns
    # the fp32 GEMM's rounding of z into a relative error of ~|z| / c times it; flash-attn's bar
    inputs32 = [a.detach().clone().requires_grad_() if a is not None else None for a in (x, w, b)]
    torch32 = _grads(_materialised(*inputs32[:2], t, inputs32[2], kw, torch.float32), inputs32, g.float())
    for a, r, p in zip(got, ref, torch32):
        tol = max(TOL[torch.float32], 2 * rel_err(p, r))
        assert a.dtype == torch.float32 and rel_err(a, r) <= tol, (rel_err(a, r), rel_err(p, r))


@pytest.mark.parametrize("V", [1000, 40])  # dx's K = V: the panel GEMM's split-K path, and its panels
def test_cpu_fp32_chunks_on_the_panel_gemm(monkeypatch, V):
    """fp32 chunks of >= 16 rows run on our AVX-512 panel GEMM (where built): logits and dx."""
    monkeypatch.setattr(ce, "CHUNK_BYTES", 24 * V * 4)
    kw = {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 6.0}
    x, w, t, b = _inputs((77,), 40, V, torch.float32, bias=True, ignore_every=9)
    assert ce.chunk_rows(77, V) == 24
    with mptkernels.backend("cpu"):
        loss = ops.linear_cross_entropy(x, w, t, bias=b, **kw)
    inputs64 = [a.detach().double().requires_grad_() for a in (x, w, b)]
    want = reference.linear_cross_entropy(*inputs64[:2], t, inputs64[2], **kw)
    assert rel_err(loss, want) <= TOL[torch.float32]
    loss.backward()
    for a, r in zip((x, w, b), _grads(want, inputs64, torch.ones_like(want))):
        assert rel_err(a.grad, r) <= TOL[torch.float32], rel_err(a.grad, r)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_cpu_other_dtypes(small_chunks, dtype):
    kw = {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 6.0}
    x, w, t, b = _inputs((4, 75), 64, 1000, dtype, bias=True, ignore_every=7)
    with mptkernels.backend("cpu"):
        loss = ops.linear_cross_entropy(x, w, t, bias=b, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # 16-bit vs the fp32 reference
    inputs32 = [a.detach().to(ref_dtype).requires_grad_() for a in (x, w, b)]
    want = reference.linear_cross_entropy(*inputs32[:2], t, inputs32[2], **kw)
    assert rel_err(loss, want) <= TOL[dtype], rel_err(loss, want)
    loss.backward()  # a gradient of exactly 1: the forward's gradients as they are
    ref = _grads(want, inputs32, torch.ones_like(want))
    for a, r in zip((x, w, b), ref):
        assert a.grad.dtype == dtype and rel_err(a.grad, r) <= TOL[dtype], rel_err(a.grad, r)


def test_unit_gradient_returns_the_forward_gradients_uncopied(small_chunks, monkeypatch):
    """loss.backward() skips the backward op (nothing to scale), loss * 2 runs it; both right."""
    calls = []
    real = _dispatch.CUSTOM_OPS.linear_cross_entropy_bwd.default
    monkeypatch.setattr(_dispatch.CUSTOM_OPS, "linear_cross_entropy_bwd",
                        types.SimpleNamespace(default=lambda *a: calls.append(1) or real(*a)))
    x, w, t, b = _inputs((50,), 17, 33, torch.float32, bias=True, ignore_every=3)
    for factor in (1.0, 2.0):
        for a in (x, w, b):
            a.grad = None
        with mptkernels.backend("cpu"):
            (ops.linear_cross_entropy(x, w, t, bias=b) * factor).backward()
        x64, w64, b64 = [a.detach().double().requires_grad_() for a in (x, w, b)]
        (reference.linear_cross_entropy(x64, w64, t, b64) * factor).backward()
        for a, r in zip((x, w, b), (x64, w64, b64)):
            assert rel_err(a.grad, r.grad) <= TOL[torch.float32]
        assert len(calls) == (0 if factor == 1.0 else 1)


def test_forward_gradients_become_grad_uncopied_and_retain_graph_recomputes(small_chunks):
    """Eager loss.backward(): weight.grad is the forward's dW itself (no second V x H buffer); a
    second backward through the retained graph computes the gradients again, still right."""
    x, w, t, b = _inputs((40,), 17, 33, torch.float32, bias=True, ignore_every=3)
    seen = []
    real = torch.ops.mptkernels.linear_cross_entropy_fwd.default

    class Spy(torch.overrides.TorchFunctionMode):  # the forward op's dW, by its storage
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is real:
                seen.append(out[2].untyped_storage().data_ptr())
            return out

    with mptkernels.backend("cpu"):
        with Spy():
            loss = ops.linear_cross_entropy(x, w, t, bias=b)
        loss.backward(retain_graph=True)
    assert seen and w.grad.untyped_storage().data_ptr() == seen[0]
    first = [a.grad.clone() for a in (x, w, b)]
    for a in (x, w, b):
        a.grad = None
    with mptkernels.backend("cpu"):
        loss.backward()
    for a, f in zip((x, w, b), first):
        assert rel_err(a.grad, f) <= 1e-6


def test_backward_of_mean_allocates_no_second_weight_gradient():
    """loss.backward() after the forward adds no memory at its peak: no copy of dW, and no zero
    tensors for the non-differentiable outputs (each would be a V x H buffer, 20 MB here)."""
    from mptkernels.bench.cross_entropy import _status_kb

    x, w, t, _ = _inputs((256,), 256, 20000, torch.float32)
    with mptkernels.backend("cpu"):
        ops.linear_cross_entropy(x[:8], w, t[:8]).backward()  # warm-up
        loss = ops.linear_cross_entropy(x, w, t)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        before = _status_kb("VmRSS")
        loss.backward()
    grown_mb = (_status_kb("VmHWM") - before) / 1024
    assert grown_mb < 0.25 * w.numel() * 4 / 2 ** 20, grown_mb


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored_matches_f_cross_entropy(reduction):
    """mean over no rows: NaN, as F.cross_entropy (0 / 0); sum: 0; gradients: zeros."""
    x, w, t, b = _inputs((6,), 17, 33, torch.float32, bias=True)
    t.fill_(-100)
    kw = {"reduction": reduction, "label_smoothing": 0.1}
    with mptkernels.backend("cpu"):
        loss = ops.linear_cross_entropy(x, w, t, bias=b, **kw)
    want = _materialised(x.detach(), w.detach(), t, b.detach(), kw)
    assert torch.equal(loss.isnan(), want.isnan()) and (reduction != "mean" or loss.isnan())
    assert torch.equal(loss.nan_to_num(), want.float().nan_to_num())
    z = F.linear(x, w, b)
    torch_grads = _grads(F.cross_entropy(z, t, reduction=reduction, label_smoothing=0.1).sum(), (x, w, b), None)
    for a, r in zip(_grads(loss.sum(), (x, w, b), None), torch_grads):
        assert torch.equal(a, torch.zeros_like(a)) and torch.equal(a, r)


def test_ignore_index_other_than_default_and_leading_dims(small_chunks):
    x, w, t, _ = _inputs((2, 3, 9), 17, 33, torch.float32)
    t[0, 1, :4] = 5  # rows of class 5, ignored
    with mptkernels.backend("cpu"):
        loss = ops.linear_cross_entropy(x, w, t, ignore_index=5, reduction="none")
    assert loss.shape == t.shape and torch.equal(loss[t == 5], torch.zeros(int((t == 5).sum())))
    want = F.cross_entropy(F.linear(x.double(), w.double()).reshape(-1, 33), t.reshape(-1), ignore_index=5,
                           reduction="none").reshape(t.shape)
    assert rel_err(loss, want) <= TOL[torch.float32]


def test_no_gradients_computed_without_grad():
    """Under no_grad (and for inputs that need none) the forward computes the loss only."""
    x, w, t, b = _inputs((9,), 17, 33, torch.float32, bias=True, grad=False)
    out = torch.ops.mptkernels.linear_cross_entropy_fwd(x, w, t, b, -100, "mean", 0.0, 0.0, 0.0,
                                                        [False, False, False], 4)
    assert [o.numel() for o in out[1:]] == [0, 0, 0]
    out = torch.ops.mptkernels.linear_cross_entropy_fwd(x, w, t, b, -100, "mean", 0.0, 0.0, 0.0,
                                                        [False, True, False], 4)
    assert [o.shape for o in out[1:]] == [(0,), w.shape, (0,)]
    assert rel_err(out[2], torch.autograd.functional.jacobian(
        lambda w: reference.linear_cross_entropy(x.double(), w, t, b.double()), w.double())) <= TOL[torch.float32]


def test_chunk_size_rule():
    """A few tens of MB of fp32 logits per chunk at an LM's vocabulary, all rows when V is small."""
    rows = ce.chunk_rows(4096, 128256)
    assert 16 <= rows < 4096 and 10 << 20 <= rows * 128256 * 4 <= ce.CHUNK_BYTES
    assert ce.chunk_rows(300, 1000) == 300 and ce.chunk_rows(0, 33) == 1 and ce.chunk_rows(5, 10 ** 9) == 1


def _backends():
    impls = ["cpu", "torch", "reference"] + ([] if HAS_CUDA else ["triton"])
    return impls


@pytest.mark.parametrize("impl", ["cpu", "triton", "torch", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_each_backend_forced(small_chunks, impl, reduction):
    if impl not in _backends():
        pytest.skip(ON_GPU)
    kw = {"reduction": reduction, "label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 3.0}
    x, w, t, b = _inputs((70,), 24, 50, torch.float32, bias=True, ignore_every=4)
    with mptkernels.backend(linear_cross_entropy=impl):
        loss = ops.linear_cross_entropy(x, w, t, bias=b, **kw)
    want = _materialised(x.detach(), w.detach(), t, b.detach(), kw)
    assert loss.dtype == torch.float32 and rel_err(loss, want) <= TOL[torch.float32]
    g = torch.randn_like(want)
    z = F.linear(x.double(), w.double(), b.double())
    got, ref = _grads(loss, (x, w, b), g.float()), _grads(_materialised_z(z, t, kw), (x, w, b), g)
    for a, r in zip(got, ref):
        assert rel_err(a, r) <= TOL[torch.float32], (impl, rel_err(a, r))


def _materialised_z(z, t, kw):
    c = kw["logit_softcap"]
    s = c * torch.tanh(z / c)
    loss = F.cross_entropy(s, t, reduction=kw["reduction"], label_smoothing=kw["label_smoothing"])
    valid = t != -100
    zl = torch.where(valid, s.logsumexp(-1) ** 2, 0.0)
    return loss + kw["z_loss"] * (zl if kw["reduction"] == "none" else zl.sum() / valid.sum())


@pytest.mark.skipif(HAS_CUDA, reason=ON_GPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_against_reference(small_chunks, dtype):
    x, w, t, b = _inputs((40,), 32, 1000, dtype, bias=True, ignore_every=6)
    kw = {"label_smoothing": 0.05, "z_loss": 1e-3, "logit_softcap": 8.0, "reduction": "sum"}
    with mptkernels.backend("triton"):
        loss = ops.linear_cross_entropy(x, w, t, bias=b, **kw)
    inputs32 = [a.detach().float().requires_grad_() for a in (x, w, b)]
    want = reference.linear_cross_entropy(*inputs32[:2], t, inputs32[2], **kw)
    assert rel_err(loss, want) <= TOL[dtype]
    loss.backward()
    for a, r in zip((x, w, b), _grads(want, inputs32, torch.ones_like(want))):
        assert a.grad.dtype == dtype and rel_err(a.grad, r) <= TOL[dtype], rel_err(a.grad, r)


def test_opcheck_both_custom_ops():
    x, w, t, b = _inputs((11,), 17, 33, torch.float32, bias=True, ignore_every=4)
    fwd, bwd = torch.ops.mptkernels.linear_cross_entropy_fwd.default, torch.ops.mptkernels.linear_cross_entropy_bwd.default
    for red, mask in (("mean", [True, True, True]), ("sum", [True, False, False]), ("none", [False, False, False])):
        args = (x, w, t, b, -100, red, 0.1, 3.0, 1e-3, mask, 4)
        torch.library.opcheck(fwd, args)
        torch.library.opcheck(fwd, (x, w, t, None, -100, red, 0.0, 0.0, 0.0, mask, 32))
        _, dx, dw, db = fwd(*args)
        g = torch.randn(11) if red == "none" else torch.tensor(1.5)
        want = [True, True, True] if red == "none" else mask
        torch.library.opcheck(bwd, (g, x.detach(), w.detach(), t, b.detach(), dx, dw, db, -100, red, 0.1, 3.0, 1e-3,
                                    want, 4))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_forward_and_backward(small_chunks, reduction):
    torch._dynamo.reset()
    x, w, t, b = _inputs((2, 20), 17, 33, torch.float32, bias=True, ignore_every=3)
    kw = {"reduction": reduction, "label_smoothing": 0.1, "logit_softcap": 5.0, "z_loss": 1e-3}

    def f(x, w, t, b):
        return ops.linear_cross_entropy(x, w, t, bias=b, **kw).sum() * 1.5

    with mptkernels.backend("cpu"):
        got = torch.compile(f, fullgraph=True)(x, w, t, b)
        grads = _grads(got, (x, w, b), None)
    x64, w64, b64 = [a.detach().double().requires_grad_() for a in (x, w, b)]
    want = reference.linear_cross_entropy(x64, w64, t, b64, **kw).sum() * 1.5
    assert rel_err(got, want) <= TOL[torch.float32]
    for a, r in zip(grads, _grads(want, (x64, w64, b64), None)):
        assert rel_err(a, r) <= TOL[torch.float32]


def _bad_cases():
    x, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    return [
        (lambda: ops.linear_cross_entropy(x.int(), w, t), TypeError, "x must be a float32"),
        (lambda: ops.linear_cross_entropy(x, w[:, :5], t), ValueError, r"weight must be a \(V, H\) tensor with H = "),
        (lambda: ops.linear_cross_entropy(x, w[:0], t), ValueError, r"weight must have at least one row"),
        (lambda: ops.linear_cross_entropy(x, w.double(), t), TypeError, "weight must have x's dtype"),
        (lambda: ops.linear_cross_entropy(x, w, t.int()), TypeError, "target must be an int64 tensor"),
        (lambda: ops.linear_cross_entropy(x, w, t[:3]), ValueError, r"target must have x's leading shape \(4,\)"),
        (lambda: ops.linear_cross_entropy(x, w, t, bias=torch.randn(9)), ValueError, r"bias must be a float32 \(10,\)"),
        (lambda: ops.linear_cross_entropy(x, w, t, reduction="avg"), ValueError, "reduction must be one of mean"),
        (lambda: ops.linear_cross_entropy(x, w, t, label_smoothing=1.5), ValueError, r"label_smoothing must be a number in \[0, 1\]"),
        (lambda: ops.linear_cross_entropy(x, w, t, logit_softcap=-2.0), ValueError, "logit_softcap must be a positive"),
        (lambda: ops.linear_cross_entropy(x, w, t, logit_softcap=0.0), ValueError, "logit_softcap must be a positive"),
        (lambda: ops.linear_cross_entropy(x, w, t, z_loss=-1.0), ValueError, "z_loss must be a finite number >= 0"),
        (lambda: ops.linear_cross_entropy(x, w, t, ignore_index=1.5), TypeError, "ignore_index must be an int"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_is_a_clear_error(case):
    fn, exc, match = _bad_cases()[case]
    with pytest.raises(exc, match="linear_cross_entropy: " + match):
        fn()


@pytest.mark.parametrize("impl", ["cpu", "triton", "torch", "reference"])
@pytest.mark.parametrize("bad", [10, -1, -101])
def test_target_out_of_range_is_an_error_on_every_backend(impl, bad):
    if impl not in _backends():
        pytest.skip(ON_GPU)
    x, w, t = torch.randn(5, 8, requires_grad=True), torch.randn(10, 8), torch.randint(0, 10, (5,))
    t[2], t[3] = -100, bad  # -100 is ignored, never an error
    with mptkernels.backend(linear_cross_entropy=impl), pytest.raises(ValueError, match=(
            rf"linear_cross_entropy: target holds {bad}, out of range: expected 0 <= target < V = 10")):
        ops.linear_cross_entropy(x, w, t)


def test_cpu_kernel_refuses_a_bad_target_itself():
    """Called directly (no Python check before it), the C++ kernel still reads no memory outside W."""
    x, w, t = torch.randn(5, 8), torch.randn(10, 8), torch.tensor([1, 2, 10, 3, 4])
    with pytest.raises(RuntimeError, match=r"target\[2\] = 10 is out of range"):
        torch.ops.mptkernels_cpu.linear_cross_entropy_fwd(x, w, t, None, -100, "mean", 0.0, 0.0, 0.0,
                                                          [True, True, False], 2)
