"""Fused attention (causal, ALiBi, GQA) against PyTorch's best paths on the same device.

Baselines: SDPA (on the GPU each backend: cuDNN, flash, efficient), SDPA with the ALiBi bias
materialised as a mask tensor (what PyTorch users do for MPT), and compiled FlexAttention
with an ALiBi score_mod (GPU). FLOPs: 4 * B * H * Sq * Sk * D, halved for causal.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mptkernels import ops, reference

from .harness import Case, ours


def shapes(device: str, size: str):
    if size == "tiny":
        return [(1, 128, 4, 32)]
    if device == "cuda":  # about 16k tokens per batch
        full = [(4, 4096, 32, 128), (1, 16384, 32, 128), (16, 1024, 32, 64)]
        return full[:1] if size == "quick" else full
    return [(1, 2048, 16, 64)]


def _alibi_mask(slopes, s, causal, device, dtype):
    i = torch.arange(s, device=device).view(-1, 1)
    j = torch.arange(s, device=device).view(1, -1)
    bias = slopes.to(device).view(-1, 1, 1) * (j - i)
    if causal:
        bias = bias.masked_fill(j > i, float("-inf"))
    return bias.unsqueeze(0).to(dtype)


def _sdpa_backends(device):
    if device != "cuda":
        return {"SDPA": None}
    from torch.nn.attention import SDPBackend

    return {"SDPA cuDNN": SDPBackend.CUDNN_ATTENTION, "SDPA flash": SDPBackend.FLASH_ATTENTION,
            "SDPA efficient": SDPBackend.EFFICIENT_ATTENTION}


def _sdpa(backend, *args, **kw):
    if backend is None:
        return F.scaled_dot_product_attention(*args, **kw)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(*args, **kw)


def _flex_alibi(q, k, v, slopes):
    """Compiled FlexAttention with causal masking and MPT's ALiBi as its score_mod."""
    return _flex(q, k, v, lambda b, h, i, j: j <= i, lambda score, b, h, i, j: score + slopes[h] * (j - i))


def cases(device: str, size: str) -> list[Case]:
    out = []
    # the CPU: fp32, and in full runs bf16 too (vdpbf16ps tiles where the CPU has AVX512-BF16)
    dtypes = [torch.bfloat16] if device == "cuda" else [torch.float32] + ([torch.bfloat16] if size == "full" else [])
    for dtype, (b, s, h, d) in ((dt, shape) for dt in dtypes for shape in shapes(device, size)):
        def inputs(b=b, s=s, h=h, d=d, dtype=dtype, grad=False):
            q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype) for _ in range(3))
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # SDPA's (B, H, S, D)
            if grad:
                for x in (q, k, v, qt, kt, vt):
                    x.requires_grad_()
            slopes = reference.alibi_slopes(h).to(device)
            return q, k, v, qt, kt, vt, slopes, _alibi_mask(slopes, s, True, device, dtype)

        def causal(inputs=inputs):
            q, k, v, qt, kt, vt, _, _ = inputs()
            return {"ours": ours("attention", lambda: ops.attention(q, k, v, causal=True), device),
                    "baselines": {name: (lambda be=be: _sdpa(be, qt, kt, vt, is_causal=True))
                                  for name, be in _sdpa_backends(device).items()}}

        def alibi(inputs=inputs):
            q, k, v, qt, kt, vt, slopes, mask = inputs()
            return {"ours": ours("attention", lambda: ops.attention(q, k, v, causal=True, alibi_slopes=slopes), device),
                    "baselines": {"SDPA + bias tensor": lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask),
                                  # torch compiles FlexAttention for the CPU forward too (not its backward)
                                  "FlexAttention (compiled)": _flex_alibi(qt, kt, vt, slopes)}}

        def alibi_fwd_bwd(inputs=inputs):
            q, k, v, qt, kt, vt, slopes, mask = inputs(grad=True)
            dout = torch.randn_like(q)
            return {"ours": ours("attention", lambda: torch.autograd.grad(
                        ops.attention(q, k, v, causal=True, alibi_slopes=slopes), (q, k, v), dout), device),
                    "baselines": _fwd_bwd_baselines(device, qt, kt, vt, dout.transpose(1, 2).contiguous(), mask, slopes)}

        def causal_fwd_bwd(inputs=inputs):
            q, k, v, qt, kt, vt, _, _ = inputs(grad=True)
            dout = torch.randn_like(q)
            doutt = dout.transpose(1, 2).contiguous()
            return {"ours": ours("attention", lambda: torch.autograd.grad(ops.attention(q, k, v, causal=True),
                                                                          (q, k, v), dout), device),
                    "baselines": {name: (lambda be=be: torch.autograd.grad(_sdpa(be, qt, kt, vt, is_causal=True),
                                                                           (qt, kt, vt), doutt))
                                  for name, be in _sdpa_backends(device).items()}}

        flops = 4 * b * h * s * s * d / 2  # causal
        tag = f"B{b} S{s} H{h} d{d} {str(dtype).replace('torch.', '')}"
        out += [Case("attention", f"causal fwd {tag}", causal, flops=flops, dtype=dtype),
                Case("attention", f"causal+ALiBi fwd {tag}", alibi, flops=flops, dtype=dtype),
                # forward + backward: 3.5x the forward's FLOPs (the backward's five matmuls recompute the scores)
                Case("attention", f"causal+ALiBi fwd+bwd {tag}", alibi_fwd_bwd, flops=3.5 * flops, dtype=dtype)]
        if device == "cuda" or size != "quick":
            out.append(Case("attention", f"causal fwd+bwd {tag}", causal_fwd_bwd, flops=3.5 * flops, dtype=dtype))
    return out + _decode_cases(device, size) + _window_cases(device, size) + _softcap_cases(device, size) + \
        _paged_cases(device, size)


def _fwd_bwd_baselines(device, qt, kt, vt, doutt, mask, slopes):
    base = {"SDPA + bias tensor": lambda: torch.autograd.grad(
        F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask), (qt, kt, vt), doutt)}
    if device == "cuda":
        flex = _flex_alibi(qt, kt, vt, slopes)
        base["FlexAttention (compiled)"] = lambda: torch.autograd.grad(flex(), (qt, kt, vt), doutt)
    return base


def _graphed(fn):
    """fn captured once in a CUDA graph: a decode step is a few microseconds of GPU work, so
    timing eager launches would time the CPU. Both sides of the comparison get it."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _decode_cases(device, size):
    """One new token per sequence attending over a filled KV cache; rate = cache bytes read."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cases = [(1, 4096, 32, 32, 128), (8, 4096, 32, 8, 128)] if device == "cuda" else [(1, 2048, 16, 16, 64)]
    if size == "tiny":
        cases = [(1, 256, 4, 2, 32)]
    out = []
    for b, s, hq, hk, d in cases[:1] if size == "quick" else cases:
        def make(b=b, s=s, hq=hq, hk=hk, d=d):
            kc, vc = (torch.randn(b, s, hk, d, device=device, dtype=dtype) for _ in range(2))
            q = torch.randn(b, 1, hq, d, device=device, dtype=dtype)
            lens = torch.full((b,), s, dtype=torch.int32, device=device)
            slopes = reference.alibi_slopes(hq).to(device)
            qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)  # SDPA's layout, as views
            gqa = {"enable_gqa": True} if hq != hk else {}
            mine = ours("attention_with_kvcache",
                        lambda: ops.attention_with_kvcache(q, kc, vc, lens, alibi_slopes=slopes), device)
            bias = (slopes.view(1, hq, 1, 1) * (torch.arange(s, device=device) - (s - 1))).to(dtype)
            base = {"SDPA + bias tensor": lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias, **gqa)}
            refs = {}
            if device == "cuda":
                mine = {k: _graphed(f) for k, f in mine.items()}
                base = {k: _graphed(f) for k, f in base.items()}
                # without ALiBi: another computation, shown for the bandwidth it reaches
                refs["SDPA (no bias)"] = _graphed(lambda: F.scaled_dot_product_attention(qt, kt, vt, **gqa))
            return {"ours": mine, "baselines": base, "references": refs}
        tag = f"B{b} cache{s} Hq{hq} Hkv{hk} d{d} {str(dtype).replace('torch.', '')}"
        out.append(Case("attention", f"ALiBi decode 1 token {tag}", make,
                        nbytes=2 * b * s * hk * d * torch.finfo(dtype).bits // 8))
    return out


# ---- flash-attn's features: each against the same call without it (a reference row, so the
# ratio is the feature's own cost) and PyTorch's way of getting the same result
def _window_cases(device, size):
    """A sliding window over a long sequence: time should follow the keys inside the window.
    Bidirectional window (w/2, w/2) (4096 keys of 16k: ideally 4x faster than without it) and,
    in full runs, Mistral's causal window (w, 0) (ideally 2.3x faster than causal attention)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b, s, h, d, w = ((1, 16384, 32, 128, 4096) if device == "cuda" else (1, 16384, 2, 64, 4096)) \
        if size == "full" else (1, 4096, 2, 64, 1024) if size == "quick" else (1, 512, 2, 32, 128)
    flavours = [("bidirectional", False, (w // 2, w // 2))] + ([("causal", True, (w, 0))] if size == "full" else [])
    out = []
    for name, causal, window in flavours:
        def make(causal=causal, window=window):
            q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype) for _ in range(3))
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            i = torch.arange(s, device=device).view(-1, 1)
            j = torch.arange(s, device=device).view(1, -1)
            keep = (j - i <= window[1]) & (i - j <= window[0])  # SDPA's bool mask: True = attend
            base = {"SDPA + window mask": lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep)}
            if device == "cuda":
                base["FlexAttention (compiled)"] = _flex(qt, kt, vt, lambda b_, h_, i_, j_: (j_ - i_ <= window[1]) &
                                                         (i_ - j_ <= window[0]), None)
            return {"ours": ours("attention", lambda: ops.attention(q, k, v, causal=causal, window_size=window),
                                 device),
                    "baselines": base,
                    "references": {"mptkernels, no window": lambda: ops.attention(q, k, v, causal=causal)}}
        keys = sum(min(s - 1, t + window[1]) - max(0, t - window[0]) + 1 for t in range(s))  # visible pairs
        full = s * (s + 1) // 2 if causal else s * s
        out.append(Case("attention", f"sliding window {name} {window} fwd B{b} S{s} H{h} d{d} "
                        f"{str(dtype).replace('torch.', '')}", make, flops=4 * b * h * d * keys, dtype=dtype,
                        work_of={"mptkernels, no window": 4 * b * h * d * full}))
    return out


def _flex(qt, kt, vt, mask_mod, score_mod):
    """Compiled FlexAttention of SDPA-layout tensors with a block mask from mask_mod (None: none)
    and score_mod; called once by the harness's warm-up, which compiles it."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = None if mask_mod is None else create_block_mask(mask_mod, None, None, qt.shape[2], kt.shape[2],
                                                           device=qt.device)
    flex = torch.compile(flex_attention, fullgraph=True)
    return lambda: flex(qt, kt, vt, score_mod=score_mod, block_mask=mask)


SOFTCAP = 50.0  # Gemma 2's attention cap


def _softcap_cases(device, size):
    """Gemma 2's softcap on causal attention: its cost over the same call without it, and
    FlexAttention with the same score_mod (GPU)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b, s, h, d = (4, 4096, 32, 128) if device == "cuda" else (1, 2048, 16, 64)
    if size == "tiny":
        b, s, h, d = 1, 256, 4, 32

    def make():
        q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        base = {}
        if device == "cuda":
            base["FlexAttention (compiled)"] = _flex(qt, kt, vt, lambda b_, h_, i_, j_: j_ <= i_,
                                                     lambda score, b_, h_, i_, j_: SOFTCAP * torch.tanh(score / SOFTCAP))
        else:  # the eager composition: scores, cap, mask, softmax (what a PyTorch user writes without Flex)
            i = torch.arange(s).view(-1, 1)
            j = torch.arange(s).view(1, -1)

            def eager():
                scores = (qt @ kt.transpose(-1, -2)) * d ** -0.5
                scores = (SOFTCAP * torch.tanh(scores / SOFTCAP)).masked_fill(j > i, float("-inf"))
                return scores.softmax(-1) @ vt
            base["eager softcap (matmul, tanh, softmax)"] = eager
        return {"ours": ours("attention", lambda: ops.attention(q, k, v, causal=True, softcap=SOFTCAP), device),
                "baselines": base,
                "references": {"mptkernels, no softcap": lambda: ops.attention(q, k, v, causal=True)}}
    return [Case("attention", f"softcap {SOFTCAP:g} causal fwd B{b} S{s} H{h} d{d} {str(dtype).replace('torch.', '')}",
                 make, flops=4 * b * h * s * s * d / 2, dtype=dtype)]


PAGE = 16  # vLLM's default block size (a page smaller than a key tile is the hard case)


def _paged_cases(device, size):
    """Decoding one token over a paged cache (random pages of PAGE rows): its cost over the same
    decode on a contiguous cache, and PyTorch's way (gather the pages, then SDPA)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b, s, hq, hk, d = (8, 4096, 32, 8, 128) if device == "cuda" else (4, 2048, 16, 4, 64)
    if size == "tiny":
        b, s, hq, hk, d = 2, 256, 4, 2, 32

    def make():
        per_seq = s // PAGE
        table = torch.randperm(b * per_seq, device=device).to(torch.int32).view(b, per_seq)
        kp, vp = (torch.randn(b * per_seq, PAGE, hk, d, device=device, dtype=dtype) for _ in range(2))
        kc, vc = (x[table.long()].reshape(b, s, hk, d) for x in (kp, vp))  # the same keys, contiguous
        q = torch.randn(b, 1, hq, d, device=device, dtype=dtype)
        lens = torch.full((b,), s, dtype=torch.int32, device=device)
        gqa = {"enable_gqa": True} if hq != hk else {}

        def gathered():
            kt, vt = (x[table.long()].reshape(b, s, hk, d).transpose(1, 2) for x in (kp, vp))
            return F.scaled_dot_product_attention(q.transpose(1, 2), kt, vt, **gqa)
        mine = ours("attention_with_kvcache", lambda: ops.attention_with_kvcache(q, kp, vp, lens, block_table=table),
                    device)
        base = {"gather pages + SDPA": gathered}
        refs = {"mptkernels, contiguous cache": lambda: ops.attention_with_kvcache(q, kc, vc, lens)}
        if device == "cuda":
            mine, base, refs = ({k: _graphed(f) for k, f in x.items()} for x in (mine, base, refs))
        return {"ours": mine, "baselines": base, "references": refs}
    tag = f"B{b} cache{s} page{PAGE} Hq{hq} Hkv{hk} d{d} {str(dtype).replace('torch.', '')}"
    return [Case("attention", f"paged decode 1 token {tag}", make,
                 nbytes=2 * b * s * hk * d * torch.finfo(dtype).bits // 8)]
