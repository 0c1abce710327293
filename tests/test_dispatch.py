"""The dispatch table (mptkernels/_dispatch.py): every op run with every implementation this
machine has, forced; the errors of impossible forcings; per-thread forcing; the measured choice
with a stubbed timer and its disk cache; info() and the docs' table made from the table."""
import json
import os
import re
import threading

import pytest
import torch

import mptkernels
from mptkernels import _dispatch, ops, reference, torch_impl
from conftest import HAS_CUDA, rel_err

# ||out - ref|| / ||ref|| against the fp32 reference, per dtype: the output rounding (fp16 ~2e-4,
# bf16 ~2e-3 rms), fp32 summation order; PyTorch's ALiBi path adds its bias rounded to the
# activation dtype (HF's way), a few times the output rounding at these distances
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
TORCH_TOL = {torch.float32: 2e-5, torch.float16: 6e-3, torch.bfloat16: 4e-2}


def _here(device="cpu"):
    """(public op, implementation) pairs this process can force on the device's tensors."""
    out = []
    for public in _dispatch.OPS:
        for impl in _dispatch.available_kernels(public, device):
            out.append((public, impl))
        if _dispatch.TABLE[public].torch:
            out.append((public, "torch"))
        out.append((public, "reference"))
    return out


def _case(public, dtype, device="cpu"):
    """(fn(), reference output, differentiable inputs) of one small call of a public op, odd sizes."""
    g = torch.Generator().manual_seed(sum(map(ord, public)))
    torch.set_default_device(device)  # the tables and index tensors below; reset by the caller

    def rnd(*shape, dt=dtype, grad=False):
        t = torch.randn(*shape, generator=g, device="cpu").to(device=device, dtype=dt)
        return t.requires_grad_(grad)

    if public in ("layer_norm", "rms_norm"):
        x, w, r = rnd(3, 5, 40, grad=True), rnd(40, grad=True), rnd(3, 5, 40)
        if public == "layer_norm":
            b = rnd(40, grad=True)
            return (lambda: ops.layer_norm(x, w, b, 1e-5, r)[0]), reference.layer_norm(x, w, b, 1e-5, r)[0], (x, w, b)
        return (lambda: ops.rms_norm(x, w, 1e-6, r)[0]), reference.rms_norm(x, w, 1e-6, r)[0], (x, w)
    if public == "apply_rotary":
        x = rnd(2, 7, 3, 16, grad=True)
        cos, sin = ops.rotary_cos_sin(20, 12)
        off = torch.tensor([0, 5])
        return (lambda: ops.apply_rotary(x, cos, sin, seqlen_offsets=off),
                reference.apply_rotary(x, cos, sin, seqlen_offsets=off), (x,))
    if public == "attention":
        q, k, v = rnd(2, 5, 4, 16, grad=True), rnd(2, 7, 2, 16, grad=True), rnd(2, 7, 2, 16, grad=True)
        s = ops.alibi_slopes(4)
        return (lambda: ops.attention(q, k, v, causal=True, alibi_slopes=s),
                reference.attention(q, k, v, causal=True, alibi_slopes=s), (q, k, v))
    if public == "attention_varlen":
        q, k, v = rnd(10, 4, 16, grad=True), rnd(10, 2, 16, grad=True), rnd(10, 2, 16, grad=True)
        cu = torch.tensor([0, 4, 10], dtype=torch.int32)
        return (lambda: ops.attention_varlen(q, k, v, cu, cu, 6, 6, causal=True),
                reference.attention_varlen(q, k, v, cu, cu, causal=True), (q, k, v))
    if public == "attention_with_kvcache":
        q, kc, vc, kn, vn = rnd(2, 1, 4, 16), rnd(2, 12, 2, 16), rnd(2, 12, 2, 16), rnd(2, 1, 2, 16), rnd(2, 1, 2, 16)
        lens = torch.tensor([3, 7], dtype=torch.int32)
        want = reference.attention_with_kvcache(q, kc.clone(), vc.clone(), lens, kn, vn)
        return (lambda: ops.attention_with_kvcache(q, kc.clone(), vc.clone(), lens, k=kn, v=vn)), want, ()
    if public == "linear":
        x, w, b = rnd(5, 24, grad=True), rnd(16, 24, grad=True), rnd(16, grad=True)
        return (lambda: ops.linear(x, w, b, "gelu")), reference.linear(x, w, b, "gelu"), (x, w, b)
    if public == "quantize_rowwise":
        x = rnd(5, 40)
        return (lambda: ops.quantize_rowwise(x)[0]), reference.quantize_rowwise(x)[0], ()
    if public == "int8_mm":
        # more than 16 rows and K, N multiples of 8: what torch._int_mm takes on CUDA too
        a = torch.randint(-127, 128, (24, 40), generator=g, dtype=torch.int8, device="cpu").to(device)
        b = torch.randint(-127, 128, (16, 40), generator=g, dtype=torch.int8, device="cpu").to(device)
        return (lambda: ops.int8_mm(a, b)), reference.int8_mm(a, b), ()
    if public in ("swiglu", "geglu"):
        gate, up = rnd(3, 5, 33, grad=True), rnd(3, 5, 33, grad=True)
        if public == "swiglu":
            return (lambda: ops.swiglu(gate, up)), reference.swiglu(gate, up), (gate, up)
        return (lambda: ops.geglu(gate, up, "tanh")), reference.geglu(gate, up, "tanh"), (gate, up)
    if public == "linear_cross_entropy":
        x, w, b = rnd(3, 5, 24, grad=True), rnd(30, 24, grad=True), rnd(30, grad=True)
        t = torch.randint(0, 30, (3, 5), generator=g, device="cpu").to(device)
        t[0, 1] = -100
        kw = dict(label_smoothing=0.1, logit_softcap=4.0, z_loss=1e-3, reduction="none")
        return (lambda: ops.linear_cross_entropy(x, w, t, bias=b, **kw),
                reference.linear_cross_entropy(x, w, t, b, **kw), (x, w, b))
    wq, ws = reference.quantize_rowwise(torch.randn(16, 40, generator=g, device="cpu").to(device))
    x, b = rnd(24, 40, grad=True), rnd(16, grad=True)
    if public == "int8_linear":
        return (lambda: ops.int8_linear(x, wq, ws, b, "relu")), reference.int8_linear(x, wq, ws, b, "relu"), (x, b)
    assert public == "weight_only_int8_linear"
    return (lambda: ops.weight_only_int8_linear(x, wq, ws, b)), reference.weight_only_int8_linear(x, wq, ws, b), (x, b)


def _dtypes(public, impl):
    if public == "int8_mm":
        return [torch.int8]
    if impl == "triton":  # the interpreter's tl.dot is garbage on bf16 inputs (GPU.md); no dot in quantize
        return [torch.float32, torch.float16] + ([torch.bfloat16] if public == "quantize_rowwise" else [])
    return [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("public, impl", _here(), ids=lambda v: str(v))
def test_every_op_with_every_implementation_forced(public, impl):
    _forced_against_reference(public, impl, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("public, impl", _here("cuda") if HAS_CUDA else [], ids=lambda v: str(v))
def test_every_op_with_every_implementation_forced_on_the_gpu(public, impl):
    _forced_against_reference(public, impl, "cuda")


def _forced_against_reference(public, impl, device):
    for dtype in _dtypes(public, impl if device == "cpu" else "gpu"):
        try:
            fn, want, inputs = _case(public, dtype if dtype != torch.int8 else torch.float32, device)
        finally:
            torch.set_default_device(None)
        with mptkernels.backend(**{public: impl}):
            got = fn()
        if want.dtype in (torch.int8, torch.int32):
            assert torch.equal(got, want), (public, impl)
            continue
        tol = (TORCH_TOL if impl == "torch" else TOL)[dtype]
        assert got.dtype == want.dtype and rel_err(got, want) <= tol, (public, impl, dtype, rel_err(got, want))
        if inputs and dtype == torch.float32:
            # the backward of a forced forward runs under the same forcing, outside the block too
            dout = torch.randn_like(want)
            grads = torch.autograd.grad(got, inputs, dout)
            ref_grads = torch.autograd.grad(want, inputs, dout)
            for a, r in zip(grads, ref_grads):
                assert rel_err(a, r) <= 1e-4, (public, impl)


def test_forced_backward_runs_the_forced_language(monkeypatch):
    """with backend("triton"): y = f(x), then y.backward() outside the block: Triton's backward."""
    if "triton" not in _dispatch.available_kernels("layer_norm", "cpu"):
        pytest.skip("no Triton here (needs the interpreter)")
    import mptkernels.triton.layer_norm as tln

    calls = []
    real = tln.layer_norm_bwd
    monkeypatch.setattr(tln, "layer_norm_bwd", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(_dispatch, "_available_cache", {})  # the dispatcher keeps the functions it chose
    x = torch.randn(4, 24, requires_grad=True)
    with mptkernels.backend(layer_norm="triton"):
        y = ops.layer_norm(x, torch.randn(24))
    y.sum().backward()
    assert calls == [1]


BAD_FORCINGS = [
    (dict(layer_norm="cuda"), lambda: ops.layer_norm(torch.randn(3, 8)),
     "backend 'cuda' cannot run this call (runs on CUDA tensors); implementations for these cpu tensors: cpu, "),
    (dict(apply_rotary="torch"), lambda: ops.apply_rotary(torch.randn(1, 2, 1, 8), *ops.rotary_cos_sin(4, 8)),
     "PyTorch has no op for it"),
    (dict(layer_norm="torch"), lambda: ops.layer_norm(torch.randn(3, 8), torch.randn(8), cast="llama"),
     "cast='llama' is not a PyTorch op"),
    (dict(attention="cpu"), lambda: ops.attention(*(torch.randn(1, 3, 2, 8, dtype=torch.float64) for _ in range(3))),
     "takes float32, float16, bfloat16, not float64"),
    (dict(attention="torch"), lambda: ops.attention(torch.randn(1, 5, 2, 8), torch.randn(1, 3, 2, 8),
                                                    torch.randn(1, 3, 2, 8), causal=True), "rows that see no key"),
    (dict(linear="cuda"), lambda: ops.linear(torch.randn(2, 8), torch.randn(3, 8)), "none exists"),
]


@pytest.mark.parametrize("forcing, call, match", BAD_FORCINGS)
def test_forcing_what_cannot_run_names_what_exists(forcing, call, match):
    with mptkernels.backend(**forcing):
        op = next(iter(forcing))
        with pytest.raises(ValueError, match=re.escape(f"mptkernels.{op}: ") + ".*" + re.escape(match)):
            call()


def test_triton_needs_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.setattr(_dispatch, "_available_cache", {})
    monkeypatch.setattr(mptkernels.triton, "interpreting", lambda: False)
    with mptkernels.backend("triton"):
        with pytest.raises(ValueError, match="backend 'triton' cannot run this call"):
            ops.layer_norm(torch.randn(3, 8))


def test_backend_arguments_are_checked():
    with pytest.raises(ValueError, match="'fast' is not an implementation; choose from auto, cpu, cuda, triton"):
        with mptkernels.backend("fast"):
            pass
    with pytest.raises(ValueError, match="unknown op 'atention'"):
        with mptkernels.backend(atention="triton"):
            pass
    with pytest.raises(ValueError, match=r"MPTK_BACKEND='attention=gpu'"):
        _dispatch._parse_env("attention=gpu")
    assert _dispatch._parse_env("cpu, attention=reference") == {"*": "cpu", "attention": "reference"}


def test_backend_nests_and_restores():
    assert _dispatch.forced("attention") == "auto"
    with mptkernels.backend("torch"):
        with mptkernels.backend(attention="reference"):
            assert (_dispatch.forced("attention"), _dispatch.forced("linear")) == ("reference", "torch")
            with mptkernels.backend("cpu"):  # a name replaces the outer settings
                assert _dispatch.forced("attention") == "cpu"
            with mptkernels.backend(linear="auto"):
                assert _dispatch.forced("linear") == "auto"
        assert _dispatch.forced("attention") == "torch"
    assert _dispatch.forced("attention") == "auto"


def test_threads_do_not_share_the_forcing(monkeypatch):
    ran = {}
    real_ref, real_torch = reference.layer_norm, torch_impl.layer_norm

    def spy(name, real):
        def f(*a, **k):
            ran.setdefault(threading.current_thread().name, []).append(name)
            return real(*a, **k)
        return f

    monkeypatch.setattr(reference, "layer_norm", spy("reference", real_ref))
    monkeypatch.setattr(torch_impl, "layer_norm", spy("torch", real_torch))
    barrier = threading.Barrier(2)
    errors = []

    def work(impl):
        try:
            with mptkernels.backend(layer_norm=impl):
                barrier.wait()  # both forcings are in effect at once
                for _ in range(3):
                    ops.layer_norm(torch.randn(2, 8))
                    barrier.wait()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(impl,), name=impl) for impl in ("reference", "torch")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert ran == {"reference": ["reference"] * 3, "torch": ["torch"] * 3}


# ---- the measured choice (what auto does on a GPU), with a stubbed timer on the CPU
@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """The CPU made to choose as a GPU does: by timing, with a timer that says what we want and
    counts its calls; the disk cache in a fresh folder."""
    monkeypatch.setenv("MPTK_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(_dispatch.POLICY, "cpu", "measure")
    monkeypatch.setattr(_dispatch, "_available_cache", {})  # choices kept under the real policy
    speeds = {}
    calls = []

    def timer(name, fn, device):
        fn()
        calls.append(name)
        return speeds.get(name, 1.0)

    monkeypatch.setattr(_dispatch.measured, "timer", timer)
    _dispatch.measured.clear()
    yield speeds, calls, tmp_path
    _dispatch.measured.clear()


def _spy_torch_layer_norm(monkeypatch):
    ran = []
    real = torch_impl.layer_norm
    monkeypatch.setattr(torch_impl, "layer_norm", lambda *a: ran.append(1) or real(*a))
    return ran


def test_auto_runs_pytorch_where_it_measures_faster(measuring, monkeypatch):
    speeds, calls, tmp = measuring
    ran = _spy_torch_layer_norm(monkeypatch)
    x, w = torch.randn(64, 32), torch.randn(32)
    speeds.update(kernel=2.0, torch=1.0)
    y = ops.layer_norm(x, w)
    assert "torch" in calls and "kernel" in calls and ran  # timed, then PyTorch's op ran
    assert rel_err(y, reference.layer_norm(x, w)) <= TOL[torch.float32]
    facts = mptkernels.info(file=open(os.devnull, "w"))
    (key, entry), = [(k, e) for k, e in facts["measured choices"].items() if "layer_norm|" in k]
    assert entry["choice"] == "torch" and entry["ms"] == {"kernel": 2.0, "torch": 1.0}
    # the other shape class is measured on its own; our kernel wins there
    speeds.update(kernel=0.5)
    x2 = torch.randn(4096, 32)
    ops.layer_norm(x2, w)  # timed (both candidates run once)
    ran.clear()
    ops.layer_norm(x2, w)
    assert not ran


def test_measured_choices_are_kept_on_disk(measuring, monkeypatch):
    speeds, calls, tmp = measuring
    ran = _spy_torch_layer_norm(monkeypatch)
    speeds.update(kernel=2.0, torch=1.0)
    x, w = torch.randn(64, 32), torch.randn(32)
    ops.layer_norm(x, w)
    files = list(tmp.glob("dispatch-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["build"]["torch"] == torch.__version__
    # a new process: nothing in memory, the file answers, nothing is timed
    _dispatch.measured.clear()
    calls.clear()
    ran.clear()
    ops.layer_norm(x, w)
    assert calls == [] and ran == [1]
    # stale (another build): ignored with a warning, timed again, rewritten
    data["build"]["torch"] = "0.0.1"
    files[0].write_text(json.dumps(data))
    _dispatch.measured.clear()
    with pytest.warns(RuntimeWarning, match="stale dispatch cache"):
        ops.layer_norm(x, w)
    assert "torch" in calls
    assert json.loads(files[0].read_text())["build"]["torch"] == torch.__version__
    # corrupt: ignored with a warning, timed again, rewritten as valid JSON
    files[0].write_text("{not json")
    _dispatch.measured.clear()
    calls.clear()
    with pytest.warns(RuntimeWarning, match="ignoring the dispatch cache"):
        ops.layer_norm(x, w)
    assert "torch" in calls
    assert json.loads(files[0].read_text())["choices"]


def test_a_candidate_that_fails_while_timed_is_not_chosen(measuring, monkeypatch):
    speeds, calls, _ = measuring
    speeds.update(kernel=2.0, torch=1.0)

    def broken(*a):
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(torch_impl, "layer_norm", broken)
    with pytest.warns(RuntimeWarning, match="torch failed while timing layer_norm"):
        ops.layer_norm(torch.randn(64, 32))
    entry, = [e for k, e in _dispatch.measured.tables[next(iter(_dispatch.measured.tables))].items()
              if k.startswith("layer_norm|")]
    assert entry["choice"] == "kernel" and "no kernel image" in entry["failed"]["torch"]


def test_training_calls_are_timed_with_their_backward(measuring, monkeypatch):
    speeds, calls, _ = measuring
    speeds.update(kernel=1.0, torch=2.0)
    x = torch.randn(64, 32, requires_grad=True)
    y = ops.layer_norm(x, torch.randn(32))
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    key, = [k for k in _dispatch.measured.tables[next(iter(_dispatch.measured.tables))] if k.startswith("layer_norm|")]
    assert key.endswith(",train")  # a class of its own, timed with its backward


def test_kernel_languages_are_measured_inside_the_op(measuring):
    """On a GPU the custom op times its languages (CUDA C++ vs Triton); here C++ vs the
    interpreter's Triton, with the stub deciding."""
    speeds, calls, _ = measuring
    if "triton" not in _dispatch.available_kernels("linear", "cpu"):
        pytest.skip("no Triton here (needs the interpreter)")
    speeds.update(cpu=3.0, triton=1.0, kernel=1.0, torch=5.0)
    x, w = torch.randn(5, 24), torch.randn(16, 24)
    ops.linear(x, w)
    table = _dispatch.measured.tables[next(iter(_dispatch.measured.tables))]
    assert table[next(k for k in table if k.startswith("linear_fwd|"))]["choice"] == "triton"


# ---- the table and what is made from it
def test_table_matches_the_cpp_registrations():
    for public, op in _dispatch.TABLE.items():
        for schema in op.schema:
            assert hasattr(torch.ops.mptkernels, schema), schema
            assert ("cpu" in op.kernels) == hasattr(torch.ops.mptkernels_cpu, schema), (public, schema)
            assert ("cuda" in op.kernels) == hasattr(torch.ops.mptkernels_cuda, schema), (public, schema)
            assert schema in _dispatch.SCHEMAS  # registered by its family module


def test_python_kernels_exist_with_the_schema_signature():
    import inspect

    pytest.importorskip("triton")
    if not mptkernels.triton.usable():
        pytest.skip("triton cannot run here")
    import importlib

    for public, op in _dispatch.TABLE.items():
        if "triton" not in op.kernels:
            continue
        mod = importlib.import_module(f"mptkernels.triton.{op.family}")
        for schema in op.schema:
            names = [a.name for a in getattr(torch.ops.mptkernels, schema).default._schema.arguments]
            assert list(inspect.signature(getattr(mod, schema)).parameters) == names, schema


def test_info_matches_the_table():
    facts = mptkernels.info(file=open(os.devnull, "w"))
    assert set(facts["ops"]["cpu"]) == set(_dispatch.OPS)
    for public, op in _dispatch.TABLE.items():
        row = facts["ops"]["cpu"][public]
        assert set(row) == set(op.kernels) | ({"torch"} if op.torch else set()) | {"reference"}
        assert row["cpu"] == "yes" and row["reference"] == "yes"
        if "cuda" in op.kernels and not HAS_CUDA:
            assert row["cuda"] == "runs on CUDA tensors"
    with mptkernels.backend(attention="triton"):
        assert "attention=triton" in mptkernels.info(file=open(os.devnull, "w"))["backend (this thread)"]


def test_docs_table_is_made_from_the_table():
    assert _dispatch.docs_table_in_file() == _dispatch.markdown_table(), \
        "docs/architecture.md is out of date: run python scripts/dispatch_table.py --write"


@pytest.mark.parametrize("ns", ["mptkernels_cpu", "mptkernels"])
def test_opcheck_on_the_cpu_twins(ns):
    """The C++ twins are custom ops of their own (with fakes): opcheck them as the public ones."""
    x, w, b = torch.randn(5, 24), torch.randn(16, 24), torch.randn(16)
    op = getattr(torch.ops, ns)
    torch.library.opcheck(op.linear_fwd.default, (x, w, b, "gelu"), test_utils=("test_schema", "test_faketensor"))
    xn = torch.randn(4, 40)
    torch.library.opcheck(op.layer_norm_fwd.default, (xn, None, None, None, 1e-5, False, 0.0, False),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(op.quantize_rowwise.default, (xn,), test_utils=("test_schema", "test_faketensor"))


def test_direct_calls_of_the_custom_ops_are_checked():
    with pytest.raises(ValueError, match="x must be a contiguous"):
        torch.ops.mptkernels.layer_norm_fwd(torch.randn(8, 6).t(), None, None, None, 1e-5, False, 0.0, False)
    with pytest.raises(ValueError, match="int8_linear: K = 200000 could overflow"):
        ops.int8_linear(torch.randn(1, 200000), torch.zeros(2, 200000, dtype=torch.int8), torch.ones(2))


def _bad_direct_calls():
    """Calls of the public custom ops that only the Python checks stop (the C++ and Triton
    kernels trust them): wrong rank, dtype, layout or an out-of-table offset."""
    f, i8 = torch.randn(3, 4, 8), torch.zeros(5, 8, dtype=torch.int8)
    q = torch.randn(1, 4, 2, 8)
    m = torch.ops.mptkernels
    return {
        "linear_fwd 3-D x": lambda: m.linear_fwd(f, torch.randn(5, 8), None, "none"),
        "linear_bwd 3-D x": lambda: m.linear_bwd(torch.randn(3, 4, 5), f, torch.randn(5, 8), torch.empty(0),
                                                 "none", False),
        "quantize_rowwise 3-D x": lambda: m.quantize_rowwise(f),
        "quantize_rowwise strided": lambda: m.quantize_rowwise(torch.randn(8, 6).t()),
        "int8_mm 1-D a": lambda: m.int8_mm(i8[0], i8),
        "int8_linear 3-D x": lambda: m.int8_linear(f, i8, torch.ones(5), None, "none"),
        "weight_only 3-D x": lambda: m.weight_only_int8_linear(f, i8, torch.ones(5), None),
        "layer_norm_fwd 1-D x": lambda: m.layer_norm_fwd(torch.randn(8), None, None, None, 1e-5, False, 0.0, False),
        "layer_norm_bwd dy dtype": lambda: m.layer_norm_bwd(torch.randn(4, 8).double(), None, torch.randn(4, 8),
                                                            None, None, torch.zeros(4), torch.ones(4), False, 0.0,
                                                            False),
        "apply_rotary offset": lambda: m.apply_rotary(q, torch.ones(4, 4), torch.ones(4, 4), None, 2, False, False),
        "attention_fwd 3-D q": lambda: m.attention_fwd(q[0], q, q, None, 1.0, False),
        "attention_fwd head_dim": lambda: m.attention_fwd(torch.randn(1, 4, 2, 6), torch.randn(1, 4, 2, 6),
                                                          torch.randn(1, 4, 2, 6), None, 1.0, False),
        "attention_bwd dout dtype": lambda: m.attention_bwd(q.double(), q, q, q, q, torch.zeros(1, 2, 4), None,
                                                            1.0, False),
        "attention_varlen_fwd cu": lambda: m.attention_varlen_fwd(q[0], q[0], q[0], torch.tensor([0, 9], dtype=torch.int32),
                                                                  torch.tensor([0, 4], dtype=torch.int32), 9, 4,
                                                                  None, 1.0, False),
        "attention_with_kvcache room": lambda: m.attention_with_kvcache(q[:, :1], q.clone(), q.clone(),
                                                                        torch.tensor([4], dtype=torch.int32), q[:, :1],
                                                                        q[:, :1], None, 1.0, True),
    }


@pytest.mark.parametrize("case", list(_bad_direct_calls()))
def test_bad_direct_calls_of_the_public_custom_ops_raise_before_a_kernel(case):
    with mptkernels.backend("cpu"), pytest.raises((ValueError, TypeError)):
        _bad_direct_calls()[case]()


def test_the_custom_op_is_skipped_only_where_the_dispatcher_would_run_nothing_but_the_kernel(monkeypatch):
    """_dispatch.CUSTOM_OPS calls the chooser directly for plain tensors without a gradient to
    record; with one, under a dispatch mode or on meta tensors it goes through the dispatcher."""
    from torch.utils._python_dispatch import TorchDispatchMode

    direct = _dispatch.CUSTOM_OPS.layer_norm_fwd
    through = []
    real_op = direct.op
    monkeypatch.setattr(direct, "op", lambda *a: through.append(1) or real_op(*a))
    x, w = torch.randn(5, 24), torch.randn(24)
    want = reference.layer_norm(x, w, None, 1e-5)

    with torch.no_grad():
        got = ops.layer_norm(x, w)
    assert not through and rel_err(got, want) <= TOL[torch.float32]
    got = ops.layer_norm(x, w)  # grad mode on, nothing requires grad: still direct
    assert not through and rel_err(got, want) <= TOL[torch.float32]

    xg = x.clone().requires_grad_()
    got = ops.layer_norm(xg, w)
    assert through and got.grad_fn is not None
    got.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    through.clear()
    with torch.no_grad(), Seen() as seen:
        ops.layer_norm(x, w)
    assert through and "mptkernels.layer_norm_fwd.default" in seen.ops

    through.clear()
    out = direct.default(torch.empty(5, 24, device="meta"), None, None, None, 1e-5, False, 0.0, False)[0]
    assert through and out.device.type == "meta" and out.shape == (5, 24)


def test_the_forcing_is_marked_constant_as_torch_marks_it():
    """_dispatch marks its trace-time lookups itself (calling torch.compiler.assume_constant_result
    would import torch._dynamo at `import mptkernels`): the mark must be the one torch sets."""
    def probe(op):
        return op

    marked = torch.compiler.assume_constant_result(probe)
    names = [k for k in vars(marked) if "constant" in k]
    assert names == ["_dynamo_marked_constant"]
    assert vars(_dispatch._constant_when_traced(lambda op: op)) == vars(marked)


@pytest.mark.parametrize("impl", ["auto", "torch", "reference", "cpu"])
def test_compiled_calls_follow_the_forcing_at_trace_time(impl):
    """torch.compile(fullgraph=True) traces the dispatch: the forcing in effect when the graph is
    traced picks the path (PyTorch's and the reference's ops are traced into the graph)."""
    torch._dynamo.reset()
    x, w = torch.randn(6, 40), torch.randn(40)
    with mptkernels.backend(layer_norm=impl):
        f = torch.compile(lambda x: ops.layer_norm(x, w) * 2, fullgraph=True, backend="eager")
        got = f(x)
    assert rel_err(got, reference.layer_norm(x, w) * 2) <= TOL[torch.float32]
    torch._dynamo.reset()


def test_fixed_kernel_is_the_kernel_route_runs_or_none():
    """fixed_kernel (generate()'s CPU decode step replays it): the CPU kernel the public op runs
    here; None where the public op would run something else."""
    cpu = torch.device("cpu")
    want = torch.ops.mptkernels_cpu.layer_norm_fwd.default
    assert _dispatch.fixed_kernel("layer_norm", "layer_norm_fwd", cpu, torch.float32) == want
    with mptkernels.backend(layer_norm="cpu"):
        assert _dispatch.fixed_kernel("layer_norm", "layer_norm_fwd", cpu, torch.float32) == want
    for forcing in ("torch", "reference"):
        with mptkernels.backend(layer_norm=forcing):
            assert _dispatch.fixed_kernel("layer_norm", "layer_norm_fwd", cpu, torch.float32) is None
    lin = torch.ops.mptkernels_cpu.linear_fwd.default
    assert _dispatch.fixed_kernel("linear", "linear_fwd", cpu, torch.bfloat16) == lin
    with mptkernels.backend("torch"):
        assert _dispatch.fixed_kernel("linear", "linear_fwd", cpu, torch.bfloat16) is None


def test_fixed_kernel_is_none_where_the_choice_is_measured(measuring):
    cpu = torch.device("cpu")
    assert _dispatch.fixed_kernel("layer_norm", "layer_norm_fwd", cpu, torch.float32) is None  # timed per shape
    with mptkernels.backend(layer_norm="cpu"):  # forced: no timing
        assert (_dispatch.fixed_kernel("layer_norm", "layer_norm_fwd", cpu, torch.float32)
                == torch.ops.mptkernels_cpu.layer_norm_fwd.default)
