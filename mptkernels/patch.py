"""Swap mptkernels modules into a model you already have (the instance given; no class is
patched globally). Returns a report of every swap; later op families add their own swaps."""
from __future__ import annotations

import dataclasses
import types

import torch
import torch.nn.functional as F

from .nn import LayerNorm, RMSNorm


# transformers versions whose MPT attention module signature the attention swap was written
# and tested against (patch checks the installed one and reports a refusal otherwise)
SUPPORTED_TRANSFORMERS = ("4.57",)
_CASTS = ("torch", "llama", "gemma", "mpt")  # the detail of a norm swap is its cast mode


@dataclasses.dataclass
class PatchReport:
    swapped: list = dataclasses.field(default_factory=list)  # (module name, old class, new class, detail)
    not_swapped: list = dataclasses.field(default_factory=list)  # (module name, class, why)
    int8: object = None  # the QuantizeReport when patch(..., int8=...) quantised linears
    sdpa_routed: bool = False  # F.scaled_dot_product_attention routed to ours during forward
    errors: dict = dataclasses.field(default_factory=dict)  # verify: module name -> max |after - before|
    output_error: float | None = None  # verify: max |logits after - before|

    def __len__(self):
        return len(self.swapped) + (len(self.int8) if self.int8 is not None else 0)

    def __str__(self):
        lines = []
        if self.swapped:
            lines = [f"mptkernels.patch: swapped {len(self.swapped)} module(s)"]
            for name, old, new, detail in self.swapped:
                err = f", max error {self.errors[name]:.2e}" if name in self.errors else ""
                what = f"cast={detail!r}" if detail in _CASTS else detail
                lines.append(f"  {name or '<root>'}: {old} -> {new} ({what}{err})")
        for name, cls, why in self.not_swapped:
            lines.append(f"  not swapped: {name} ({cls}): {why}")
        if self.sdpa_routed:
            lines.append("  F.scaled_dot_product_attention calls inside model.forward go to "
                         "mptkernels.ops.scaled_dot_product_attention (PyTorch for what it does not cover)")
        if self.int8 is not None:
            lines.append(str(self.int8))
            swapped = {name for name, *_ in self.swapped}
            for name in sorted(set(self.errors) - swapped):  # verify's error of each int8 layer
                lines.append(f"  verify: {name} (int8) max error {self.errors[name]:.2e}")
        if self.output_error is not None:
            lines.append(f"  verify: model output max |after - before| = {self.output_error:.2e}")
        return "\n".join(lines) if lines else "mptkernels.patch: nothing swapped"


def _layer_norm_from(m, cast):
    new = LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.weight is not None,
                    bias=getattr(m, "bias", None) is not None, device="meta", cast=cast)
    new.weight, new.bias = m.weight, getattr(m, "bias", None)  # share the parameters, no copy
    return new


def _rms_norm_from(m, cast):
    new = RMSNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.weight is not None, device="meta", cast=cast)
    new.weight = m.weight
    return new


def _hf_rms_norm_from(m, cast):
    # HF's Llama/Gemma RMSNorm: a 1-D `weight` and the epsilon as variance_epsilon or eps
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6))
    new = RMSNorm(m.weight.shape, eps=eps, device="meta", cast=cast)
    new.weight = m.weight
    return new


# exact class -> how to rebuild it. Subclasses are left alone: their forward may differ.
# llm-foundry's LPLayerNorm and HF's Llama/Gemma norms are matched by class name, so
# neither library is imported here.
def _swap_rule(m):
    t = type(m)
    if t is torch.nn.LayerNorm:
        return lambda: _layer_norm_from(m, "torch"), "torch"
    if t is torch.nn.RMSNorm:
        return lambda: _rms_norm_from(m, "torch"), "torch"
    if t.__name__ == "LPLayerNorm" and isinstance(m, torch.nn.LayerNorm):
        return lambda: _layer_norm_from(m, "mpt"), "mpt"
    if t.__name__ in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm") and getattr(m, "weight", None) is not None:
        return lambda: _hf_rms_norm_from(m, "llama"), "llama"
    if t.__name__ == "GemmaRMSNorm" and getattr(m, "weight", None) is not None:
        return lambda: _hf_rms_norm_from(m, "gemma"), "gemma"
    return None


def _mpt_attention_forward(self, hidden_states, position_bias=None, past_key_values=None, attention_mask=None,
                           cache_position=None, **kwargs):
    """transformers' MptAttention.forward on the fused kernel (bound to one instance by patch):
    same inputs and cache handling; ALiBi from the slopes instead of the bias tensor (they
    differ by a per-row constant, which softmax ignores). A mask that is not the plain causal
    one (padding) runs the original forward."""
    from .ops import alibi_slopes, attention

    b, s, _ = hidden_states.shape
    if attention_mask is not None and not _is_plain_causal(attention_mask, s):
        return self._mptk_original_forward(hidden_states, position_bias, past_key_values=past_key_values,
                                           attention_mask=attention_mask, cache_position=cache_position, **kwargs)
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (t.reshape(b, s, self.n_heads, self.head_dim) for t in qkv.chunk(3, dim=2))
    if past_key_values is not None:  # HF's cache holds (batch, heads, seqlen, head_dim)
        k, v = past_key_values.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx,
                                      {"cache_position": cache_position})
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    slopes = alibi_slopes(self.n_heads).to(hidden_states.device)
    out = attention(q, k, v, causal=True, alibi_slopes=slopes, softmax_scale=self.softmax_scale)
    return self.out_proj(out.reshape(b, s, self.hidden_size)), None


def _is_plain_causal(mask, s):
    """mask (batch, 1, s, sk) bool, True = masked: is it exactly bottom-right causal?"""
    sk = mask.shape[-1]
    i = torch.arange(s, device=mask.device).view(-1, 1)
    j = torch.arange(sk, device=mask.device).view(1, -1)
    return bool(torch.equal(mask.bool(), (j > i + (sk - s)).expand_as(mask)))


def _llama_attention_forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None,
                             cache_position=None, **kwargs):
    """transformers' Llama / Mistral / Qwen2 attention forward on the fused kernel (bound to one
    instance by patch): their projections, their rotary (``apply_rotary_pos_emb`` of the
    module's own file) and cache, then causal GQA attention in one kernel. A mask other than
    plain causal (padding) or attention dropout in training runs the original forward."""
    import sys as _sys

    from .ops import attention

    b, s, _ = hidden_states.shape
    if attention_mask is not None:
        masked = ~attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0  # additive: 0 = keep
        plain = masked.dim() == 4 and _is_plain_causal(masked, s)
    else:
        plain = True
    if not plain or (self.training and self.attention_dropout > 0):
        return self._mptk_original_forward(hidden_states, position_embeddings, attention_mask,
                                           past_key_values=past_key_values, cache_position=cache_position, **kwargs)
    shape = (b, s, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = _sys.modules[type(self).__module__].apply_rotary_pos_emb(q, k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position})
    out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, softmax_scale=self.scaling)
    return self.o_proj(out.reshape(b, s, -1)), None


def _neox_attention_forward(self, hidden_states, attention_mask=None, head_mask=None, layer_past=None,
                            output_attentions=False, cache_position=None, position_embeddings=None, **kwargs):
    """transformers' GPT-NeoX attention forward on the fused kernel (bound to one instance by
    patch): its fused QKV projection, its partial rotary and cache, then causal attention in
    one kernel. Padding masks, head masks, returned attention weights and attention dropout in
    training run the original forward."""
    import sys as _sys

    from .ops import attention

    b, s, _ = hidden_states.shape
    plain = attention_mask is None or _is_plain_causal(
        ~attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0, s)
    if (not plain or head_mask is not None or output_attentions or position_embeddings is None
            or (self.training and self.attention_dropout > 0)):
        return self._mptk_original_forward(hidden_states, attention_mask, head_mask=head_mask, layer_past=layer_past,
                                           output_attentions=output_attentions, cache_position=cache_position,
                                           position_embeddings=position_embeddings, **kwargs)
    qkv = self.query_key_value(hidden_states).view(b, s, -1, 3 * self.head_size).transpose(1, 2)
    q, k, v = qkv.chunk(3, dim=-1)
    cos, sin = position_embeddings
    q, k = _sys.modules[type(self).__module__].apply_rotary_pos_emb(q, k, cos, sin)
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position,
                                                        "partial_rotation_size": self.rotary_ndims})
    out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, softmax_scale=self.scaling)
    return self.dense(out.reshape(b, s, -1)), None


def _attention_rule(m):
    """(how to swap it, detail) for an attention module, or (None, why not) for one we know."""
    name = type(m).__name__
    if name == "MptAttention" and all(hasattr(m, a) for a in ("Wqkv", "out_proj", "n_heads", "head_dim")):
        import transformers

        if not transformers.__version__.startswith(SUPPORTED_TRANSFORMERS):
            return None, (f"transformers {transformers.__version__} is not one of the versions the swap supports "
                          f"{SUPPORTED_TRANSFORMERS}")
        return "mpt", "fused causal + ALiBi attention"
    if name in ("LlamaAttention", "MistralAttention", "Qwen2Attention") and all(
            hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")):
        import transformers

        if not transformers.__version__.startswith(SUPPORTED_TRANSFORMERS):
            return None, (f"transformers {transformers.__version__} is not one of the versions the swap supports "
                          f"{SUPPORTED_TRANSFORMERS}")
        if getattr(m.config, "sliding_window", None) and getattr(m.config, "use_sliding_window", True):
            return None, "sliding-window attention is not fused; its SDPA calls are routed with attn_implementation='sdpa'"
        return "llama", "fused causal GQA attention (the model's rotary)"
    if name == "GPTNeoXAttention" and all(hasattr(m, a) for a in ("query_key_value", "dense", "head_size",
                                                                    "rotary_ndims", "scaling", "layer_idx")):
        import transformers

        if not transformers.__version__.startswith(SUPPORTED_TRANSFORMERS):
            return None, (f"transformers {transformers.__version__} is not one of the versions the swap supports "
                          f"{SUPPORTED_TRANSFORMERS}")
        if m.head_size % 8 or m.head_size > 256:
            return None, f"head size {m.head_size} is not a multiple of 8 up to 256 (the fused kernel's)"
        return "neox", "fused causal attention (the model's partial rotary)"
    return None, None


def _route_sdpa(model):
    """Wrap this instance's forward so that F.scaled_dot_product_attention inside it is ours."""
    from .ops.attention import scaled_dot_product_attention

    if getattr(model, "_mptk_sdpa_routed", False):
        return
    original = model.forward

    def forward(*args, **kwargs):
        saved = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = scaled_dot_product_attention
        try:
            return original(*args, **kwargs)
        finally:
            F.scaled_dot_product_attention = saved

    model.forward = forward
    model._mptk_sdpa_routed = True


def _outputs(model, sample, names):
    """Run model(sample) under no_grad; return (its first output, {name: module output})."""
    got, hooks = {}, []
    modules = dict(model.named_modules())
    for n in names:
        def hook(mod, args, out, n=n):
            got[n] = (out[0] if isinstance(out, tuple) else out).detach().float().clone()
        hooks.append(modules[n].register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(sample)
    finally:
        for h in hooks:
            h.remove()
    out = getattr(out, "logits", out)
    out = out[0] if isinstance(out, tuple) else out
    return out.detach().float(), got


def patch(model: torch.nn.Module, *, layer_norm: bool = True, attention: bool = True, sdpa=None, int8=False,
          calibration=None, verify=False) -> PatchReport:
    """Swap mptkernels into ``model`` itself (this instance; no class is changed globally).

    layer_norm: swap torch.nn.LayerNorm / RMSNorm (and llm-foundry's LPLayerNorm, HF's
    Llama/Mistral/Qwen2/Gemma RMSNorm, with the cast mode that reproduces each) for
    mptkernels.nn.LayerNorm / RMSNorm sharing the same parameters (state_dict unchanged).
    attention: route transformers' MPT attention modules through the fused causal + ALiBi
    kernel (their forward, bound per instance; padding masks keep the original path).
    sdpa: route ``F.scaled_dot_product_attention`` calls made inside ``model.forward`` to
    ``ops.scaled_dot_product_attention`` (which hands what it does not cover back to PyTorch);
    default (None): when ``attention`` and the model is an HF model running
    ``attn_implementation="sdpa"``.
    int8: False, or a mode of ``mptkernels.quantize_`` ("w8a8", "weight_only", "auto"; True
    means "w8a8") applied to the model's nn.Linear layers; "auto" needs ``calibration``.
    verify: False, True (a random token batch of the model's ``config.vocab_size``), or a sample
    input: the model runs on it before and after, and the report gives the largest error of
    every swapped module's output and of the model's output — a swap that silently did
    nothing or changed the maths shows at once.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    plan = []  # (name, module, kind, detail)
    for name, module in model.named_modules():
        if layer_norm and _swap_rule(module) is not None:
            plan.append((name, module, "norm", None))
        if attention:
            kind, detail = _attention_rule(module)
            if kind is not None:
                plan.append((name, module, kind, detail))
            elif detail is not None:
                report.not_swapped.append((name, type(module).__name__, detail))
    if any(name == "" for name, _, kind, _ in plan if kind == "norm"):
        raise ValueError("patch: the model itself is a norm module; wrap it or use mptkernels.nn directly")
    sample = None
    if verify is not False:
        sample = verify if isinstance(verify, torch.Tensor) else _sample_input(model)
        linears = [n for n, m in model.named_modules() if int8 and type(m) is torch.nn.Linear and n]
        names = [n for n, *_ in plan if n] + linears
        before_out, before = _outputs(model, sample, names)
    for name, module, kind, detail in plan:
        if kind == "norm":
            make, cast = _swap_rule(module)
            new = make()
            new.train(module.training)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
            report.swapped.append((name, type(module).__name__, type(new).__name__, cast))
        else:
            module._mptk_original_forward = module.forward
            fused = {"mpt": _mpt_attention_forward, "llama": _llama_attention_forward,
                     "neox": _neox_attention_forward}[kind]
            module.forward = types.MethodType(fused, module)
            report.swapped.append((name, type(module).__name__, "fused forward", detail))
    if sdpa is None:
        sdpa = attention and getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa"
    if sdpa:
        _route_sdpa(model)
        report.sdpa_routed = True
    if int8:
        from .quantize import quantize_

        report.int8 = quantize_(model, "w8a8" if int8 is True else int8, calibration=calibration)
    if sample is not None:
        after_out, after = _outputs(model, sample, names)
        report.errors = {n: (after[n] - before[n]).abs().max().item() for n in names if n in after and n in before}
        report.output_error = (after_out - before_out).abs().max().item()
    return report


def _sample_input(model):
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is None:
        raise ValueError("patch(verify=True) needs a model with config.vocab_size; pass a sample input as verify=...")
    p = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (2, 32), generator=g).to(p.device)
