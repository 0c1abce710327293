"""Every public op of mptkernels.ops once on the CPU, forward and backward, against
mptkernels.reference: a standalone script (only torch and an installed mptkernels), for the
runs the suite makes in another process: under an emulated CPU (tests/test_cpu_isa.py) and from
an installed wheel (tests/test_wheel.py). Prints the ISA level it ran at; exits non-zero on a
mismatch.    python tests/every_op.py
"""
import sys

import torch

import mptkernels
from mptkernels import ops, reference

torch.manual_seed(0)
failures = []


def check(name, out, ref, tol):
    outs, refs = (out, ref) if isinstance(out, (tuple, list)) else ((out,), (ref,))
    for o, r in zip(outs, refs):
        o, r = o.double(), r.double()
        err = ((o - r).norm() / r.norm().clamp_min(1e-30)).item() if torch.isfinite(o).all() else float("inf")
        if not err <= tol:
            failures.append(f"{name}: relative error {err:.3g} > {tol}")


def grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*xs)
    out = out[0] if isinstance(out, tuple) else out
    out.float().square().sum().backward()
    return [x.grad for x in xs]


for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
    d = str(dtype).removeprefix("torch.")
    x, res = torch.randn(5, 77, dtype=dtype), torch.randn(5, 77, dtype=dtype)
    w, b = torch.randn(77, dtype=dtype), torch.randn(77, dtype=dtype)
    check(f"layer_norm {d}", ops.layer_norm(x, w, b, 1e-5, res), reference.layer_norm(x, w, b, 1e-5, res), tol)
    check(f"rms_norm {d}", ops.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), tol)
    check(f"layer_norm grad {d}", grads(lambda x, w: ops.layer_norm(x, w, None), x, w),
          grads(lambda x, w: reference.layer_norm(x, w, None), x, w), 5 * tol)

    cos, sin = ops.rotary_cos_sin(64, 24)
    q = torch.randn(2, 9, 3, 24, dtype=dtype)
    check(f"apply_rotary {d}", ops.apply_rotary(q, cos, sin, seqlen_offsets=5),
          reference.apply_rotary(q, cos, sin, seqlen_offsets=5), tol)

    q, k, v = (torch.randn(2, 33, h, 40, dtype=dtype) for h in (4, 2, 2))
    slopes = ops.alibi_slopes(4)
    kw = dict(causal=True, alibi_slopes=slopes)
    check(f"attention {d}", ops.attention(q, k, v, **kw), reference.attention(q, k, v, **kw), tol)
    check(f"attention grad {d}", grads(lambda q, k, v: ops.attention(q, k, v, **kw), q, k, v),
          grads(lambda q, k, v: reference.attention(q, k, v, **kw), q, k, v), 5 * tol)
    cu = torch.tensor([0, 13, 33], dtype=torch.int32)
    qp, kp, vp = q[0], k[0], v[0]
    check(f"attention_varlen {d}", ops.attention_varlen(qp, kp, vp, cu, cu, 20, 20, causal=True),
          reference.attention_varlen(qp, kp, vp, cu, cu, causal=True), tol)
    kc, vc = torch.randn(2, 50, 2, 40, dtype=dtype), torch.randn(2, 50, 2, 40, dtype=dtype)
    lens = torch.tensor([7, 30], dtype=torch.int32)
    q1, k1, v1 = (torch.randn(2, 1, h, 40, dtype=dtype) for h in (4, 2, 2))
    ref_out = reference.attention_with_kvcache(q1, kc.clone(), vc.clone(), lens, k1, v1, alibi_slopes=slopes)
    check(f"attention_with_kvcache {d}", ops.attention_with_kvcache(q1, kc, vc, lens, k=k1, v=v1, alibi_slopes=slopes),
          ref_out, tol)

    xm, wm, bm = torch.randn(9, 72, dtype=dtype), torch.randn(40, 72, dtype=dtype), torch.randn(40, dtype=dtype)
    check(f"linear gelu {d}", ops.linear(xm, wm, bm, activation="gelu"), reference.linear(xm, wm, bm, "gelu"), tol)
    check(f"linear grad {d}", grads(lambda x, w: ops.linear(x, w, None, activation="relu"), xm, wm),
          grads(lambda x, w: reference.linear(x, w, None, "relu"), xm, wm), 5 * tol)
    wq, ws = reference.quantize_rowwise(wm.float())
    check(f"quantize_rowwise {d}", ops.quantize_rowwise(xm), reference.quantize_rowwise(xm), 0)
    check(f"int8_linear {d}", ops.int8_linear(xm, wq, ws, bm, activation="relu"),
          reference.int8_linear(xm, wq, ws, bm, "relu"), tol)
    check(f"weight_only_int8_linear {d}", ops.weight_only_int8_linear(xm, wq, ws, bm),
          reference.weight_only_int8_linear(xm, wq, ws, bm), tol)

a, bb = torch.randint(-127, 128, (9, 300), dtype=torch.int8), torch.randint(-127, 128, (17, 300), dtype=torch.int8)
check("int8_mm", ops.int8_mm(a, bb), reference.int8_mm(a, bb), 0)

level = mptkernels.cpu_isa()
if failures:
    sys.exit(f"at CPU ISA level {level}:\n" + "\n".join(failures))
print(f"every op matches the reference at CPU ISA level {level}")
