"""Triton linear cross entropy (Liger-Kernel's fused linear cross entropy): per chunk of rows,
the GEMMs on cuBLAS (torch.matmul: logits_c = x_c @ W^T (+ bias), then dx_c = dlogits_c @ W and
dW += dlogits_c^T @ x_c) and one Triton kernel for the row-wise pass in between, which reads a
row's logits once for its max and exp-sum (online) and overwrites them in place with dlogits.

Same semantics as the ``mptkernels::linear_cross_entropy_fwd`` / ``_bwd`` schemas in
csrc/registration.cpp and ``mptkernels.reference.linear_cross_entropy``; the caller validates
arguments and chooses chunk_rows (mptkernels/ops/cross_entropy.py, the family's one chunk rule).
The logits chunk is in x's dtype (the GEMM's output), the row maths in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import device_ctx

# Columns of a row per iteration of the row pass; 8 warps move 16 fp32 values per thread.
ROW_BLOCK = 4096
ROW_WARPS = 8
TWO_LOG2E = 2.8853900817779268  # 2 / ln(2)


@triton.jit
def _cap(z, softcap):
    # s = c tanh(u), u = z / c, and ds/dz = 1 - tanh(u)^2, from e = exp(-2|u|): tanh|u| =
    # (1 - e) / (1 + e), 1 - tanh^2 = 4e / (1 + e)^2 (exact where tanh saturates, where 1 - (s/c)^2
    # of a rounded s loses every bit; the CPU kernel computes the same on expm1)
    u = z / softcap
    e = tl.exp2(tl.abs(u) * -TWO_LOG2E)
    t = (1.0 - e) / (1.0 + e)
    s = softcap * tl.where(u < 0, -t, t)
    ds = 4.0 * e / ((1.0 + e) * (1.0 + e))
    return s, ds


@triton.jit
def _ce_rows_kernel(
    Z,  # [rows, V] logits of the chunk (x's dtype); overwritten with dlogits when GRAD
    TGT,  # [rows] int64 targets
    LOSS,  # [rows] fp32 per-row loss (0 at ignored rows)
    ROW_SCALE,  # [rows] fp32 per-row gradient scale, read when PER_ROW
    stride_z,
    V,
    ignore_index,
    eps,  # label smoothing
    softcap,  # c of c * tanh(z / c), read when SOFTCAP
    z_loss,
    scale,  # the gradient scale of every row when not PER_ROW
    BLOCK: tl.constexpr,
    GRAD: tl.constexpr,
    SOFTCAP: tl.constexpr,
    PER_ROW: tl.constexpr,
):
    row = tl.program_id(0)
    z_ptr = Z + row.to(tl.int64) * stride_z
    t = tl.load(TGT + row)
    cols0 = tl.arange(0, BLOCK)
    if t == ignore_index:
        tl.store(LOSS + row, 0.0)
        if GRAD:
            for off in range(0, V, BLOCK):
                cols = off + cols0
                tl.store(z_ptr + cols, tl.zeros([BLOCK], dtype=tl.float32).to(Z.dtype.element_ty), mask=cols < V)
        return
    # walk 1: online max and exp-sum, and the sum of s for the smoothing term
    m = -float("inf")
    s_sum = 0.0
    sum_s = 0.0
    for off in range(0, V, BLOCK):
        cols = off + cols0
        ok = cols < V
        z = tl.load(z_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        if SOFTCAP:
            z, _ = _cap(z, softcap)
        sum_s += tl.sum(tl.where(ok, z, 0.0), axis=0)
        zm = tl.where(ok, z, -float("inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=0))
        s_sum = s_sum * tl.exp(m - m_new) + tl.sum(tl.exp(zm - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s_sum)
    s_t = tl.load(z_ptr + t).to(tl.float32)
    if SOFTCAP:
        s_t, _ = _cap(s_t, softcap)
    loss = (1.0 - eps) * (lse - s_t) + eps * (lse - sum_s / V) + z_loss * lse * lse  # exact 0s stay 0 (V = 1)
    tl.store(LOSS + row, loss)
    if GRAD:
        # ds_j = p_j - eps / V - (1 - eps) [j = t] + 2 z_loss lse p_j; dz_j = ds_j (1 - tanh(z_j / c)^2)
        if PER_ROW:
            g = tl.load(ROW_SCALE + row)
        else:
            g = scale
        pk = 2.0 * z_loss * lse  # the z-loss term added last (p_t - 1 first, exact near p_t = 1)
        for off in range(0, V, BLOCK):
            cols = off + cols0
            ok = cols < V
            s = tl.load(z_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            if SOFTCAP:
                s, ds = _cap(s, softcap)
            p = tl.exp(s - lse)
            d = (p - eps / V - tl.where(cols == t, 1.0 - eps, 0.0)) + p * pk
            if SOFTCAP:
                d = d * ds
            tl.store(z_ptr + cols, (d * g).to(Z.dtype.element_ty), mask=ok)


def _chunks(x, weight, target, bias, ignore_index, label_smoothing, logit_softcap, z_loss, mask, chunk_rows,
            scale, grad_rows, loss_rows):
    """The chunk loop (forward with one gradient scale; the "none" backward with grad_rows)."""
    N, V = x.shape[0], weight.shape[0]
    grad = any(mask)
    rows_max = max(1, min(chunk_rows, N))
    buf = torch.empty((rows_max, V), dtype=x.dtype, device=x.device)
    dx = torch.empty_like(x) if mask[0] else None
    dw = torch.empty_like(weight) if mask[1] else None
    db = torch.zeros(V, dtype=torch.float32, device=x.device) if mask[2] and bias is not None else None
    wt = weight.t()
    first = True
    for r0 in range(0, N, rows_max):
        rows = min(rows_max, N - r0)
        lc, xc = buf[:rows], x[r0:r0 + rows]
        if bias is not None:
            torch.addmm(bias, xc, wt, out=lc)
        else:
            torch.mm(xc, wt, out=lc)
        with device_ctx(x):
            _ce_rows_kernel[(rows,)](
                lc, target[r0:r0 + rows], loss_rows[r0:r0 + rows],
                grad_rows[r0:r0 + rows] if grad_rows is not None else loss_rows, lc.stride(0), V, ignore_index,
                label_smoothing, logit_softcap if logit_softcap > 0 else 1.0, z_loss, scale,
                BLOCK=min(ROW_BLOCK, triton.next_power_of_2(V)), GRAD=grad, SOFTCAP=logit_softcap > 0,
                PER_ROW=grad_rows is not None, num_warps=ROW_WARPS)
        if not grad:
            continue
        if dx is not None:
            torch.mm(lc, weight, out=dx[r0:r0 + rows])
        if dw is not None:
            if first:
                torch.mm(lc.t(), xc, out=dw)
            else:
                dw.addmm_(lc.t(), xc)
        if db is not None:
            db += lc.sum(0, dtype=torch.float32)
        first = False
    if dw is not None and first:
        dw.zero_()
    empty = x.new_empty((0,))
    return (dx if dx is not None else empty, dw if dw is not None else empty,
            db.to(bias.dtype) if db is not None else empty)


def linear_cross_entropy_fwd(x, weight, target, bias, ignore_index: int, reduction: str, label_smoothing: float,
                             logit_softcap: float, z_loss: float, output_mask, chunk_rows: int):
    x, weight, target = x.contiguous(), weight.contiguous(), target.contiguous()
    bias = None if bias is None else bias.contiguous()
    N = x.shape[0]
    loss_rows = torch.empty(N, dtype=torch.float32, device=x.device)
    n_valid = int((target != ignore_index).sum()) if reduction == "mean" else 0
    scale = (1.0 / n_valid if n_valid else 0.0) if reduction == "mean" else 1.0
    dx, dw, db = _chunks(x, weight, target, bias, ignore_index, label_smoothing, logit_softcap, z_loss,
                         list(output_mask), chunk_rows, scale, None, loss_rows)
    if reduction == "none":
        loss = loss_rows
    else:
        loss = loss_rows.sum(dtype=torch.float64)
        loss = (loss / n_valid if n_valid else loss / 0.0) if reduction == "mean" else loss
        loss = loss.float()
    return loss, dx, dw, db


def linear_cross_entropy_bwd(grad_loss, x, weight, target, bias, dx, dweight, dbias, ignore_index: int,
                             reduction: str, label_smoothing: float, logit_softcap: float, z_loss: float, output_mask,
                             chunk_rows: int):
    want = [output_mask[0], output_mask[1], output_mask[2] and bias is not None]
    saved, like = (dx, dweight, dbias), (x, weight, bias)
    # "mean"/"sum": the forward's gradients times the scalar grad_loss; one the forward did not
    # compute (empty) by running the chunks again, as for "none"
    rerun = [w and (reduction == "none" or saved[i].shape != like[i].shape) for i, w in enumerate(want)]
    out = [saved[i] * grad_loss if want[i] and not rerun[i] else None for i in range(3)]
    if any(rerun):
        x, weight, target = x.contiguous(), weight.contiguous(), target.contiguous()
        bias = None if bias is None else bias.contiguous()
        loss_rows = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        if reduction == "none":
            rows, scale = grad_loss.float().contiguous(), 1.0
        else:
            n_valid = int((target != ignore_index).sum()) if reduction == "mean" else 1
            rows, scale = None, float(grad_loss) / n_valid if n_valid else 0.0
        again = _chunks(x, weight, target, bias, ignore_index, label_smoothing, logit_softcap, z_loss, rerun,
                        chunk_rows, scale, rows, loss_rows)
        out = [again[i] if rerun[i] else out[i] for i in range(3)]
    empty = x.new_empty((0,))
    return tuple(o if o is not None else empty for o in out)
