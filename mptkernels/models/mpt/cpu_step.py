"""The decode step on the CPU as a fixed list of kernel calls (what a CUDA graph is on a GPU).

A decode step runs ~8 ops a layer on one row each; through the model's modules and the public
ops every call pays ~20 us of Python (module call, argument checks, the choice of
implementation, reshapes): ~0.2 ms a layer, ~2 ms of a 125M model's 9-15 ms step on 2 cores.
``plan`` builds the step once from the model's modules as direct calls of the kernels the
public ops choose here (``_dispatch.fixed_kernel``) on the same arguments, so a step computes
bitwise what the eager forward computes (tests/test_model.py compares them) for ~35 us a layer.

generate() runs its first decode step eagerly (every argument checked, as before a CUDA graph
capture) and the plan from the second on. The plan reproduces only what it knows: the model's
own module types (``mptkernels.nn`` LayerNorm and Linear, ``Int8Linear`` after quantize_), ALiBi
or no position bias, learned positions, clip_qkv, qk_ln, biases, the logit scale. A model
with anything else (rotary, a module replaced or hooked, a backend forced to PyTorch's ops, a
torch function or dispatch mode) decodes eagerly: ``plan`` returns None and says why in
``why_not``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import _dispatch
from ... import nn as mnn
from ...ops.activations import activation as _activation

_KERNELS = {  # public op -> its custom op (schema)
    "layer_norm": "layer_norm_fwd", "linear": "linear_fwd", "attention_with_kvcache": "attention_with_kvcache",
    "weight_only_int8_linear": "weight_only_int8_linear", "int8_linear": "int8_linear",
}


def plan(model, cache, seqlens):
    """(step, None): step(ids (batch, 1)) -> logits (batch, vocab), appending the tokens to the
    cache at ``seqlens`` (not advanced); or (None, why the model decodes eagerly)."""
    from .model import MPTBlock, MPTForCausalLM, _logit_scale  # here: model.py imports this module's importer

    cfg, dev = model.config, seqlens.device
    dtype = model.transformer.wte.weight.dtype
    if dev.type != "cpu":
        return None, f"the model is on {dev.type}"
    if type(model).forward is not MPTForCausalLM.forward:
        return None, f"{type(model).__name__} has a forward of its own"
    if cfg.attn_config["rope"]:
        return None, "rotary embeddings"
    if torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack():
        return None, "a torch function or dispatch mode is active"
    if (torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks
            or any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())):
        return None, "a module has forward hooks"
    kernels = {public: _dispatch.fixed_kernel(public, schema, dev, dtype) for public, schema in _KERNELS.items()}
    try:
        norm = _norm(kernels["layer_norm"], dtype)
        blocks = [_block(b, MPTBlock, cfg, norm, kernels, dtype) for b in model.transformer.blocks]
        norm_f, head = norm(model.transformer.norm_f), _linear(model.lm_head, kernels, dtype)
    except _NotPlanned as e:
        return None, str(e)
    attend = kernels["attention_with_kvcache"]
    if attend is None:
        return None, "attention_with_kvcache runs no fixed kernel here"
    wte = model.transformer.wte.weight
    wpe = model.transformer.wpe.weight if cfg.learned_pos_emb else None
    slopes = model._alibi(dev)
    nh, kv, hd = cfg.n_heads, cfg.kv_n_heads, cfg.head_dim
    scale = hd ** -0.5 if cfg.attn_config["softmax_scale"] is None else float(cfg.attn_config["softmax_scale"])
    clip = cfg.attn_config["clip_qkv"]
    logit_scale = _logit_scale(cfg)
    k_cache, v_cache = cache

    def step(ids):
        b = ids.shape[0]
        x = F.embedding(ids, wte)
        if wpe is not None:
            x = x + F.embedding(seqlens.long().unsqueeze(1), wpe)
        pending, resid = None, x.view(b, -1)
        for i, (norm_1, wqkv, q_ln, k_ln, out_proj, norm_2, up, down) in enumerate(blocks):
            h, resid = norm_1(resid, None) if pending is None else norm_1(pending, resid)
            qkv = wqkv(h)
            if clip:
                qkv = qkv.clamp(-clip, clip)
            q, k, v = qkv.split([nh * hd, kv * hd, kv * hd], dim=-1)
            if q_ln is not None:
                q, k = q_ln(q.contiguous(), None)[0], k_ln(k.contiguous(), None)[0]  # the kernel takes whole rows
            o, _ = attend(q.reshape(b, 1, nh, hd).contiguous(), k_cache[i], v_cache[i], seqlens,
                          k.reshape(b, 1, kv, hd).contiguous(), v.reshape(b, 1, kv, hd).contiguous(), slopes, scale,
                          True)
            h, resid = norm_2(out_proj(o.view(b, nh * hd)), resid)
            pending = down(up(h))
        logits = head(norm_f(pending, resid)[0])
        return logits if logit_scale is None else logits * logit_scale

    return step, None


class _NotPlanned(Exception):
    """A part of the model the plan does not reproduce (the message says which)."""


def _norm(kernel, dtype):
    """mnn.LayerNorm -> norm(x, residual) = (y, the residual stream), as the module's forward."""
    if kernel is None:
        raise _NotPlanned("layer_norm runs no fixed kernel here")

    def build(m):
        if type(m) is not mnn.LayerNorm or m.cast not in ("torch", "mpt") or len(m.normalized_shape) != 1:
            raise _NotPlanned(f"a norm is {type(m).__name__}{'' if type(m) is not mnn.LayerNorm else ' cast=' + m.cast}")
        w, bias, eps = m.weight, m.bias, float(m.eps)
        if m.cast == "mpt":  # ops.layer_norm's rounding of the affine parameters to x's dtype
            w, bias = (None if t is None else t.to(dtype) for t in (w, bias))
        w, bias = (None if t is None else t.contiguous() for t in (w, bias))

        def norm(x, residual):
            if residual is None:  # the first block: the stream is the embedding itself
                return kernel(x, w, bias, None, eps, False, 0.0, False)[0], x
            y, s, _, _ = kernel(x, w, bias, residual, eps, False, 0.0, False)
            return y, s
        return norm
    return build


def _linear(m, kernels, dtype):
    """A linear module -> f(x (rows, K)) = its forward on x."""
    if type(m) is mnn.Linear:
        fn, w, bias, act = kernels["linear"], m.weight, m.bias, m.activation or "none"
        if fn is None:
            raise _NotPlanned("linear runs no fixed kernel here")
        if w.dtype != dtype:  # the eager call would refuse it (its first step said so already)
            raise _NotPlanned(f"a linear's weight is {w.dtype}, the activations {dtype}")
        return lambda x: fn(x, w, bias, act)[0]
    if type(m) is mnn.Int8Linear:
        w, s, act = m.w_int8, m.w_scale, m.activation
        bias = None if m.bias is None else m.bias.to(dtype)  # as Int8Linear.forward
        if m.mode == "w8a8":
            fn = kernels["int8_linear"]
            if fn is not None:
                return lambda x: fn(x, w, s, bias, act or "none")
        else:
            fn = kernels["weight_only_int8_linear"]
            if fn is not None:
                return (lambda x: _activation(fn(x, w, s, bias), act)) if act else (lambda x: fn(x, w, s, bias))
        raise _NotPlanned(f"{'int8_linear' if m.mode == 'w8a8' else 'weight_only_int8_linear'} runs no fixed "
                          "kernel here")
    raise _NotPlanned(f"a linear is {type(m).__name__}")


def _block(b, block_type, cfg, norm, kernels, dtype):
    qk = cfg.attn_config["qk_ln"]
    if type(b) is not block_type:
        raise _NotPlanned(f"a block is {type(b).__name__}")
    lin = lambda m: _linear(m, kernels, dtype)  # noqa: E731
    return (norm(b.norm_1), lin(b.attn.Wqkv), norm(b.attn.q_ln) if qk else None, norm(b.attn.k_ln) if qk else None,
            lin(b.attn.out_proj), norm(b.norm_2), lin(b.ffn.up_proj), lin(b.ffn.down_proj))
