"""Every public op of mptkernels.ops once, on small random CPU tensors, the C++ kernels forced
(so _C runs, never a fallback), values and gradients against mptkernels.reference: fp32 at 1e-5
relative, integer results exactly. A standalone script (torch and an installed mptkernels only;
not collected by pytest) for the suite's runs in another process: from an installed wheel in a
fresh venv (tests/test_wheel.py) and on emulated CPUs (tests/test_cpu_isa.py). Prints one JSON
line: what was imported, the CPU ISA level the kernels ran at, and which ops were checked; any
mismatch is an AssertionError naming the op.    python tests/every_op.py"""
import json
import math

import torch
import torch.nn.functional as F

import mptkernels
from mptkernels import ops, reference

TOL = 1e-5  # fp32, relative: ||out - ref|| / ||ref||


def close(op, got, want, what="out"):
    assert got.shape == want.shape and got.dtype == want.dtype, (op, what, got.shape, want.shape, got.dtype, want.dtype)
    if not got.is_floating_point():
        assert torch.equal(got, want), (op, what, "differs")
        return
    err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
    assert err <= TOL, (op, what, err)


def same_grads(op, fn, ref_fn, *inputs):
    """fn and ref_fn (of the same float inputs) agree in value and in the gradients of every input."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    ref_leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out, want = fn(*leaves), ref_fn(*ref_leaves)
    close(op, out, want)
    g = torch.randn_like(want)
    (out * g).sum().backward()
    (want * g).sum().backward()
    for i, (a, b) in enumerate(zip(leaves, ref_leaves)):
        close(op, a.grad, b.grad, f"grad of input {i}")


def check_layer_norm():
    x, r, w, b = torch.randn(3, 5, 64), torch.randn(3, 5, 64), torch.randn(64), torch.randn(64)
    same_grads("layer_norm", lambda x, w, b: ops.layer_norm(x, w, b), lambda x, w, b: reference.layer_norm(x, w, b),
               x, w, b)
    out, res = ops.layer_norm(x, w, b, residual=r)
    want, want_res = reference.layer_norm(x, w, b, residual=r)
    close("layer_norm", out, want)
    close("layer_norm", res, want_res, "residual_out")


def check_rms_norm():
    x, r, w = torch.randn(3, 5, 64), torch.randn(3, 5, 64), torch.randn(64)
    same_grads("rms_norm", lambda x, w: ops.rms_norm(x, w), lambda x, w: reference.rms_norm(x, w), x, w)
    out, res = ops.rms_norm(x, w, residual=r)
    want, want_res = reference.rms_norm(x, w, residual=r)
    close("rms_norm", out, want)
    close("rms_norm", res, want_res, "residual_out")


def check_apply_rotary():
    cos, sin = ops.rotary_cos_sin(16, 32)
    for interleaved in (False, True):
        same_grads("apply_rotary",
                   lambda x: ops.apply_rotary(x, cos, sin, interleaved=interleaved, seqlen_offsets=3),
                   lambda x: reference.apply_rotary(x, cos, sin, interleaved=interleaved, seqlen_offsets=3),
                   torch.randn(2, 6, 4, 32))


def check_attention():
    slopes = ops.alibi_slopes(4)
    q, k, v = torch.randn(2, 7, 4, 32), torch.randn(2, 9, 2, 32), torch.randn(2, 9, 2, 32)  # GQA, Sq < Sk
    same_grads("attention", lambda q, k, v: ops.attention(q, k, v, causal=True, alibi_slopes=slopes),
               lambda q, k, v: reference.attention(q, k, v, causal=True, alibi_slopes=slopes), q, k, v)


def check_attention_varlen():
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)  # two sequences: 4 and 6 tokens
    q, k, v = torch.randn(10, 4, 32), torch.randn(10, 4, 32), torch.randn(10, 4, 32)
    same_grads("attention_varlen", lambda q, k, v: ops.attention_varlen(q, k, v, cu, cu, 6, 6, causal=True),
               lambda q, k, v: reference.attention_varlen(q, k, v, cu, cu, causal=True), q, k, v)


def check_attention_with_kvcache():
    slopes = ops.alibi_slopes(4)
    q, k, v = torch.randn(2, 1, 4, 32), torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 32)
    k_cache, v_cache = torch.randn(2, 16, 2, 32), torch.randn(2, 16, 2, 32)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    out = ops.attention_with_kvcache(q, k_cache, v_cache, lens, k=k, v=v, alibi_slopes=slopes)
    want = reference.attention_with_kvcache(q, ref_k, ref_v, lens, k, v, alibi_slopes=slopes)
    close("attention_with_kvcache", out, want)
    close("attention_with_kvcache", k_cache, ref_k, "k_cache")  # the new token written in place
    close("attention_with_kvcache", v_cache, ref_v, "v_cache")


def check_scaled_dot_product_attention():
    q, k, v = torch.randn(2, 4, 7, 32), torch.randn(2, 4, 7, 32), torch.randn(2, 4, 7, 32)  # (B, H, S, D)
    same_grads("scaled_dot_product_attention",
               lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=True),
               lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v)


def check_linear():
    x, w, b = torch.randn(3, 5, 48), torch.randn(40, 48), torch.randn(40)
    same_grads("linear", lambda x, w, b: ops.linear(x, w, b, activation="gelu"),
               lambda x, w, b: reference.linear(x, w, b, "gelu"), x, w, b)


def check_quantize_rowwise():
    x = torch.randn(6, 48)
    for got, want, what in zip(ops.quantize_rowwise(x), reference.quantize_rowwise(x), ("x_int8", "scale")):
        close("quantize_rowwise", got, want, what)


def check_int8_mm():
    a, b = torch.randint(-127, 128, (5, 64), dtype=torch.int8), torch.randint(-127, 128, (7, 64), dtype=torch.int8)
    close("int8_mm", ops.int8_mm(a, b), reference.int8_mm(a, b))


def check_int8_linear():
    x, b = torch.randn(3, 5, 64), torch.randn(24)
    w_int8, w_scale = reference.quantize_rowwise(torch.randn(24, 64))
    close("int8_linear", ops.int8_linear(x, w_int8, w_scale, b), reference.int8_linear(x, w_int8, w_scale, b))


def check_weight_only_int8_linear():
    x, b = torch.randn(3, 5, 64), torch.randn(24)
    w_int8, w_scale = reference.quantize_rowwise(torch.randn(24, 64))
    close("weight_only_int8_linear", ops.weight_only_int8_linear(x, w_int8, w_scale, b),
          reference.weight_only_int8_linear(x, w_int8, w_scale, b))


def check_swiglu():
    gate, up = torch.randn(3, 5, 37) * 3, torch.randn(3, 5, 37)
    same_grads("swiglu", ops.swiglu, reference.swiglu, gate, up)


def check_geglu():
    gate, up = torch.randn(3, 5, 37) * 3, torch.randn(3, 5, 37)
    for approximate in ("none", "tanh"):
        same_grads("geglu", lambda g, u: ops.geglu(g, u, approximate), lambda g, u: reference.geglu(g, u, approximate),
                   gate, up)


def check_rotary_cos_sin():  # a table: the definition itself, angle[t, i] = t * 10000^(-2i/rotary_dim)
    cos, sin = ops.rotary_cos_sin(16, 32)
    angle = torch.outer(torch.arange(16, dtype=torch.float64), 10000.0 ** (-torch.arange(0, 32, 2) / 32))
    close("rotary_cos_sin", cos, angle.cos().float(), "cos")
    close("rotary_cos_sin", sin, angle.sin().float(), "sin")


def check_alibi_slopes():  # a table: MPT's slopes 2^(-8 (h + 1) / n_heads) for a power of two
    close("alibi_slopes", ops.alibi_slopes(8), torch.tensor([2.0 ** -(h + 1) for h in range(8)]))
    assert all(math.isfinite(s) and 0 < s < 1 for s in ops.alibi_slopes(6).tolist())


def check_linear_cross_entropy():  # chunks of 16 rows (the AVX-512 panel GEMM) and 2, every feature, bias
    from mptkernels.ops import cross_entropy

    x, w, b, t = torch.randn(2, 9, 48), torch.randn(40, 48) / 4, torch.randn(40), torch.randint(0, 40, (2, 9))
    t[0, ::4] = -100
    old, cross_entropy.CHUNK_BYTES = cross_entropy.CHUNK_BYTES, 16 * 40 * 4
    try:
        for reduction in ("mean", "none"):
            kw = dict(reduction=reduction, label_smoothing=0.1, logit_softcap=3.0, z_loss=1e-3)
            same_grads("linear_cross_entropy", lambda x, w, b: ops.linear_cross_entropy(x, w, t, bias=b, **kw),
                       lambda x, w, b: reference.linear_cross_entropy(x, w, t, b, **kw), x, w, b)
    finally:
        cross_entropy.CHUNK_BYTES = old


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}

if __name__ == "__main__":
    missing = sorted(set(ops.__all__) - set(CHECKS))
    assert not missing, f"public ops without a check here: {missing}"
    torch.manual_seed(0)
    with mptkernels.backend("cpu"):  # the C++ kernels of the installed _C, or an error naming the op
        for fn in CHECKS.values():
            fn()
    print(json.dumps({"file": mptkernels.__file__, "torch": torch.__version__, "cpu_isa": mptkernels.cpu_isa(),
                      "checked": sorted(CHECKS)}))
