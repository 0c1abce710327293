"""The forwards patch() binds to one transformers module instance (never to the class): attention
on our rotary and fused attention, the gated MLP on swiglu/geglu, the causal LM's loss on
linear_cross_entropy. Written once for every family; the layout of each family is data
(mptkernels/hf/families.py, found on the module as ``_mptk_family``).

Each forward takes the arguments the original takes, as transformers 4.57 and 5.x pass them
(bound by the original's own signature, so a renamed or reordered argument is found by name),
and runs the original wherever it does not cover the call: a mask that is not the causal (or
sliding-window causal) one, i.e. padding; attention dropout in training; returned attention
weights or a head mask; rotary angles that differ across the batch.
"""
from __future__ import annotations

import functools
import inspect
import weakref

import torch

from ..nn.linear import is_plain_linear
from .families import ACTIVATIONS


@functools.lru_cache(maxsize=None)
def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _bind(module, args, kwargs) -> tuple[dict, dict]:
    """(every argument of the call by name, the original's **kwargs part: HF's extras, which 5.x
    hands on to the cache), bound by the original's signature."""
    bound = module._mptk_signature.bind(*args, **kwargs).arguments
    extras = bound.pop(module._mptk_var_kw, None) or {} if module._mptk_var_kw else {}
    return ({**bound, **extras} if extras else bound), extras


def bind_forward(module, fused):
    """Bind ``fused`` as ``module.forward`` (this instance), keeping the original. The new
    forward shows the original's signature (functools.wraps): generate() reads it."""
    original = module.forward
    sig = inspect.signature(original)
    module._mptk_original_forward = original
    module._mptk_signature = sig
    module._mptk_var_kw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        return fused(module, *args, **kwargs)

    module.forward = forward


# ---------------------------------------------------------------------------------------
# Masks: the one question "is this the causal (sliding-window) mask?", asked once per mask
# ---------------------------------------------------------------------------------------
_mask_answers: dict = {}  # (id(mask), version, s, window) -> (weakref(mask), answer)


def is_causal_mask(mask, s: int, window: int | None) -> bool:
    """mask: None, or (batch, 1, s, sk) bool (True = keep) or additive (0 = keep): does it keep
    exactly the keys j with i + sk - s - window < j <= i + sk - s (window None: unbounded)?
    Every layer of one forward gets the same mask: the answer is kept per tensor version."""
    if mask is None:
        return True
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-2] != s:
        return False
    key = (id(mask), mask._version, s, window)
    hit = _mask_answers.get(key)
    if hit is not None and hit[0]() is mask:
        return hit[1]
    sk = mask.shape[-1]
    keep = mask if mask.dtype == torch.bool else mask == 0
    i = torch.arange(s, device=mask.device).view(-1, 1) + (sk - s)
    j = torch.arange(sk, device=mask.device).view(1, -1)
    want = j <= i
    if window is not None:
        want &= j > i - window
    answer = bool(torch.equal(keep, want.expand_as(keep)))
    if len(_mask_answers) > 64:
        _mask_answers.clear()
    _mask_answers[key] = (weakref.ref(mask), answer)
    return answer


def _rotary_table(cos, sin):
    """HF's (batch or 1, seqlen, rotary_dim) angles as our (seqlen, rotary_dim / 2) tables, or
    None when the rows differ across the batch (per-row positions: the original path)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    if cos.shape[0] > 1 and not (torch.equal(cos, cos[:1].expand_as(cos)) and torch.equal(sin, sin[:1].expand_as(sin))):
        return None
    half = cos.shape[-1] // 2  # HF's tables repeat the half: cat(freqs, freqs)
    return cos[0, :, :half], sin[0, :, :half]


# ---------------------------------------------------------------------------------------
# Attention (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, GPT-NeoX)
# ---------------------------------------------------------------------------------------
def window_of(module) -> int | None:
    """The layer's sliding window: per layer (Qwen2/3, Gemma 2/3) or per model (Mistral, Phi-3)."""
    if hasattr(module, "sliding_window"):
        return module.sliding_window or None
    return getattr(module.config, "sliding_window", None) or None


def _project(module, x, family):
    """q (b, s, hq, d), k, v (b, s, hk, d) of the family's projections."""
    b, s, _ = x.shape
    if family.qkv == "separate":
        d = module.head_dim
        return (module.q_proj(x).view(b, s, -1, d), module.k_proj(x).view(b, s, -1, d),
                module.v_proj(x).view(b, s, -1, d))
    if family.qkv == "fused":  # Phi-3: [q (hq*d) | k (hk*d) | v (hk*d)]
        d, hk = module.head_dim, module.num_key_value_heads
        qkv = module.qkv_proj(x)
        q, k, v = qkv.split((qkv.shape[-1] - 2 * hk * d, hk * d, hk * d), dim=-1)
        return q.view(b, s, -1, d), k.view(b, s, hk, d), v.view(b, s, hk, d)
    d = module.head_size  # GPT-NeoX: per head [q | k | v]
    return module.query_key_value(x).view(b, s, -1, 3 * d).chunk(3, dim=-1)


def attention_forward(self, *args, **kwargs):
    """The family's attention: its projections (and q/k norms), rotary on q and k in one call
    (ops.apply_rotary, the model's own angles), its cache, then ops.attention: causal, GQA, the
    layer's sliding window and softcap. Returns (output, None) like the original without weights."""
    from ..ops import apply_rotary, attention

    family = self._mptk_family
    a, extras = _bind(self, args, kwargs)
    x, mask, pe = a["hidden_states"], a.get("attention_mask"), a.get("position_embeddings")
    window = window_of(self)
    table = _rotary_table(*pe) if pe is not None else None
    dropout = self.training and getattr(self, "attention_dropout", 0) > 0
    if (table is None or dropout or not getattr(self, "is_causal", True) or a.get("output_attentions")
            or a.get("head_mask") is not None or not is_causal_mask(mask, x.shape[1], window)):
        return self._mptk_original_forward(*args, **kwargs)
    q, k, v = _project(self, x, family)
    if hasattr(self, "q_norm"):  # Qwen3, Gemma 3: RMSNorm over each head before the rotary
        q, k = self.q_norm(q), self.k_norm(k)
    hq = q.shape[2]
    qk = apply_rotary(torch.cat((q, k), dim=2), *table)  # one call for q and k
    q, k = qk[:, :, :hq], qk[:, :, hq:]
    k, v = _cached(self, k, v, a, extras)
    out = attention(q, k, v, causal=True, softmax_scale=self.scaling,
                    window_size=(window - 1, 0) if window else (-1, -1),  # HF keeps i - window < j <= i
                    softcap=getattr(self, "attn_logit_softcapping", None) or 0.0)
    out = getattr(self, family.out)(out.reshape(*x.shape[:2], -1))
    return out, None


def _cached(module, k, v, a, extras):
    """k, v (b, s, hk, d) of this call appended to the model's cache (HF's caches hold (batch,
    heads, seqlen, head_dim)): the keys and values to attend to, (b, sk, hk, d) views."""
    cache = next((a[n] for n in ("past_key_values", "cache", "layer_past") if a.get(n) is not None), None)
    if cache is None:
        return k, v
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    if transformers_major() >= 5:  # 5.x: the layer reads what it needs from the forward's kwargs
        k, v = cache.update(k, v, module.layer_idx, kwargs=extras)
    else:
        cache_kwargs = {"cache_position": a.get("cache_position")}
        if a.get("position_embeddings") is not None:
            cache_kwargs["cos"], cache_kwargs["sin"] = a["position_embeddings"]
        if module._mptk_family.qkv == "neox":
            cache_kwargs["partial_rotation_size"] = module.rotary_ndims
        k, v = cache.update(k, v, module.layer_idx, cache_kwargs)
    return k.transpose(1, 2), v.transpose(1, 2)


def mpt_attention_forward(self, *args, **kwargs):
    """transformers' MptAttention on the fused causal + ALiBi kernel: same inputs and cache;
    ALiBi from the slopes instead of the bias tensor (they differ by a per-row constant, which
    softmax ignores). A mask that is not the plain causal one (padding) runs the original."""
    from ..ops import alibi_slopes, attention

    a, extras = _bind(self, args, kwargs)
    x, mask = a["hidden_states"], a.get("attention_mask")
    b, s, _ = x.shape
    # MPT's mask is True where masked
    if mask is not None and not is_causal_mask(~mask if mask.dtype == torch.bool else mask, s, None):
        return self._mptk_original_forward(*args, **kwargs)
    qkv = self.Wqkv(x)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (t.reshape(b, s, self.n_heads, self.head_dim) for t in qkv.chunk(3, dim=2))
    k, v = _cached(self, k, v, a, extras)
    slopes = getattr(self, "_mptk_slopes", None)
    if slopes is None or slopes.device != x.device:  # made once per device, not per layer call
        slopes = self._mptk_slopes = alibi_slopes(self.n_heads).to(x.device)
    out = attention(q, k, v, causal=True, alibi_slopes=slopes, softmax_scale=self.softmax_scale)
    return self.out_proj(out.reshape(b, s, self.hidden_size)), None


# ---------------------------------------------------------------------------------------
# The gated MLP
# ---------------------------------------------------------------------------------------
def mlp_activation(module):
    """(glu op name, geglu's approximate) of a gated MLP, or (None, why not)."""
    cfg = module.config
    name = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    if name not in ACTIVATIONS:
        return None, f"activation {name!r} has no fused gated form (fused: {', '.join(ACTIVATIONS)})"
    return ACTIVATIONS[name]


def mlp_forward(self, x):
    """down(act(gate(x)) * up(x)) with act(gate) * up in one pass (ops.swiglu / ops.geglu)."""
    from .. import ops

    if self._mptk_family.mlp == "fused":  # Phi-3: gate_up_proj gives [gate | up]
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    else:
        gate, up = self.gate_proj(x), self.up_proj(x)
    op, approximate = self._mptk_activation
    h = ops.swiglu(gate, up) if op == "swiglu" else ops.geglu(gate, up, approximate=approximate)
    return self.down_proj(h)


# ---------------------------------------------------------------------------------------
# The causal LM's loss
# ---------------------------------------------------------------------------------------
def decoder_of(model):
    """The causal LM's decoder: at its base_model_prefix, else ``model`` (Gemma 3's text model
    declares "language_model" in 4.57 but keeps its decoder at ``model``)."""
    for name in (model.base_model_prefix, "model"):
        m = getattr(model, name, None)
        if isinstance(m, torch.nn.Module):
            return m
    return None


def causal_lm_forward(self, *args, **kwargs):
    """With labels: the decoder, then ops.linear_cross_entropy on its last hidden states and the
    output projection's weight; the logits never exist and are not returned (``logits`` is None),
    as Liger-Kernel does. The loss is transformers' ForCausalLMLoss: labels shifted by one,
    ignore_index -100, the mean over the counted tokens or, given ``num_items_in_batch``, the sum
    divided by it; Gemma's final_logit_softcapping is applied to the logits. Without labels (or
    with ``shift_labels`` or ``return_dict=False``, or an output projection that is no longer an
    nn.Linear, e.g. quantised) the original runs."""
    from ..ops import linear_cross_entropy

    a, _ = _bind(self, args, kwargs)
    labels = a.get("labels")
    head = self.get_output_embeddings()
    # an output projection swapped since (patch's int8=..., quantize_) is not a plain weight to read
    if (labels is None or a.get("shift_labels") is not None or a.get("return_dict") is False
            or not is_plain_linear(head)):
        return self._mptk_original_forward(*args, **kwargs)
    base = decoder_of(self)
    n_items = a.get("num_items_in_batch")
    base_args = {n: v for n, v in a.items() if n not in ("labels", "logits_to_keep", "num_items_in_batch", "self")}
    base_params = inspect.signature(base.forward).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in base_params.values()):
        base_args = {n: v for n, v in base_args.items() if n in base_params}
    outputs = base(**base_args)
    hidden = outputs[0]
    target = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].to(hidden.device)
    softcap = getattr(self.config, "final_logit_softcapping", None)
    reduction = "mean" if n_items is None else "sum"
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, target.reshape(-1),
                                bias=head.bias, ignore_index=-100, reduction=reduction, logit_softcap=softcap)
    if n_items is not None:
        loss = loss / (n_items.to(loss.device) if isinstance(n_items, torch.Tensor) else n_items)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(outputs, "past_key_values", None),
                                  hidden_states=getattr(outputs, "hidden_states", None),
                                  attentions=getattr(outputs, "attentions", None))
