"""Swap mptkernels into a model you already have (the instance given; no class is patched
globally): norms, and for transformers' families (mptkernels/hf/families.py) attention with
rotary, the gated MLP and the causal LM's loss. Returns a report of every swap and refusal."""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from .hf import families, forwards
from .hf.families import SUPPORTED_TRANSFORMERS
from .nn import LayerNorm, Linear, RMSNorm
from .nn.linear import is_plain_linear

_CASTS = ("torch", "llama", "gemma", "mpt")  # the detail of a norm swap is its cast mode


@dataclasses.dataclass
class PatchReport:
    swapped: list = dataclasses.field(default_factory=list)  # (module name, old class, new class, detail)
    not_swapped: list = dataclasses.field(default_factory=list)  # (module name, class, why)
    int8: object = None  # the QuantizeReport when patch(..., int8=...) quantised linears
    sdpa_routed: bool = False  # F.scaled_dot_product_attention routed to ours during forward
    errors: dict = dataclasses.field(default_factory=dict)  # verify: module name -> max |after - before|
    output_error: float | None = None  # verify: max |logits after - before|
    loss_error: float | None = None  # verify, with the loss swapped: |loss after - before| on the sample

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
        if self.loss_error is not None:
            lines.append(f"  verify: loss (the sample as labels) |after - before| = {self.loss_error:.2e}")
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
# llm-foundry's LPLayerNorm and transformers' RMSNorms (families.RMS_NORMS) are matched by
# class name, so neither library is imported here.
def _linear_from(m):
    new = Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    new.weight, new.bias = m.weight, m.bias  # shared: tied embeddings stay tied
    return new


def _swap_rule(m):
    t = type(m)
    if t is torch.nn.LayerNorm:
        return lambda: _layer_norm_from(m, "torch"), "torch"
    if t is torch.nn.RMSNorm:
        return lambda: _rms_norm_from(m, "torch"), "torch"
    if t.__name__ == "LPLayerNorm" and isinstance(m, torch.nn.LayerNorm):
        return lambda: _layer_norm_from(m, "mpt"), "mpt"
    cast = families.RMS_NORMS.get(t.__name__)
    if cast is not None and getattr(m, "weight", None) is not None:
        return lambda: _hf_rms_norm_from(m, cast), cast
    return None


def _transformers_refusal():
    """None when the installed transformers is one the forwards support, else why not."""
    import transformers

    if transformers.__version__.startswith(SUPPORTED_TRANSFORMERS):
        return None
    return (f"transformers {transformers.__version__} is not one of the versions the swap supports "
            f"{SUPPORTED_TRANSFORMERS}")


def _family_rule(m, table, rule):
    """(kind, detail) of rule(m, family) for a module of a known family (table: families.ATTENTION,
    MLP or CAUSAL_LM), (None, why not) when the installed transformers is not one the forwards
    support, (None, None) for a module of no family."""
    family = table.get(type(m).__name__)
    if family is None:
        return None, None
    why = _transformers_refusal()
    return (None, why) if why else rule(m, family)


def _attention_rule(m, family):
    if family.qkv == "mpt":
        return "mpt_attention", "fused causal + ALiBi attention"
    d = m.head_size if family.qkv == "neox" else m.head_dim
    if d % 8 or d > 256:
        return None, f"head size {d} is not a multiple of 8 up to 256 (the fused kernel's)"
    what = ["causal GQA attention", "rotary on q and k in one call"]
    window = forwards.window_of(m)
    if window:
        what.append(f"sliding window {window}")
    if getattr(m, "attn_logit_softcapping", None):
        what.append(f"softcap {m.attn_logit_softcapping:g}")
    if hasattr(m, "q_norm"):
        what.append("q/k norms")
    return "attention", "fused " + ", ".join(what)


def _mlp_rule(m, family):
    if family.mlp is None:
        return None, "not a gated MLP (no fused form)"
    op, detail = forwards.mlp_activation(m)
    if op is None:
        return None, detail
    return "mlp", f"{op}" + (f"(approximate={detail!r})" if op == "geglu" else "")


def _loss_rule(m, family):
    if not is_plain_linear(m.get_output_embeddings()) or forwards.decoder_of(m) is None:
        return None, "its output projection is not an nn.Linear after a decoder"
    return "loss", ("with labels: linear_cross_entropy on the last hidden states (the logits are not "
                    "computed and the output's logits is None)")


_FORWARDS = {"attention": forwards.attention_forward, "mpt_attention": forwards.mpt_attention_forward,
             "mlp": forwards.mlp_forward, "loss": forwards.causal_lm_forward}


def _route_sdpa(model):
    """Wrap this instance's forward so that F.scaled_dot_product_attention inside it is ours."""
    from .ops.attention import scaled_dot_product_attention

    if getattr(model, "_mptk_sdpa_routed", False):
        return
    original = model.forward

    @functools.wraps(original)  # generate() reads the forward's signature
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


def patch(model: torch.nn.Module, *, layer_norm: bool = True, attention: bool = True, mlp: bool = True,
          loss: bool = True, linear: bool = True, sdpa=None, int8=False, calibration=None,
          verify=False) -> PatchReport:
    """Swap mptkernels into ``model`` itself (this instance; no class is changed globally).

    The transformers families (mptkernels/hf/families.py: Llama, Mistral, Qwen2, Qwen3, Gemma 2,
    Gemma 3 text, Phi-3, GPT-NeoX, MPT; transformers 4.57 and 5.x) get their modules' forwards
    bound per instance (mptkernels/hf/forwards.py); each falls back to the original forward for
    a call it does not cover (padding masks, attention dropout in training, ...).

    layer_norm: swap torch.nn.LayerNorm / RMSNorm (and llm-foundry's LPLayerNorm, the families'
    RMSNorms, with the cast mode that reproduces each) for mptkernels.nn.LayerNorm / RMSNorm
    sharing the same parameters (state_dict unchanged).
    attention: the families' attention: rotary on q and k in one call (ops.apply_rotary on the
    model's own angles), then ops.attention (causal, GQA, the layer's sliding window and softcap;
    MPT: ALiBi).
    mlp: the gated MLPs' act(gate) * up in one pass (ops.swiglu / ops.geglu).
    linear: torch.nn.Linear layers become mptkernels.nn.Linear (ops.linear: the C++ GEMM on the
    CPU, the fastest measured on a GPU) sharing the parameters; not with ``int8``, which
    quantises them instead.
    loss: the causal LMs' forward, when given labels, computes the loss with
    ops.linear_cross_entropy from the last hidden states: the logits are never materialised
    and the output's ``logits`` is None (as Liger-Kernel does). Without labels it is unchanged.
    sdpa: route ``F.scaled_dot_product_attention`` calls made inside ``model.forward`` to
    ``ops.scaled_dot_product_attention`` (which hands what it does not cover back to PyTorch);
    default (None): when ``attention`` and the model is an HF model running
    ``attn_implementation="sdpa"``.
    int8: False, or a mode of ``mptkernels.quantize_`` ("w8a8", "weight_only", "auto"; True
    means "w8a8") applied to the model's nn.Linear layers; "auto" needs ``calibration``.
    verify: False, True (a random token batch of the model's ``config.vocab_size``), or a sample
    input: the model runs on it before and after, and the report gives the largest error of
    every swapped module's output and of the model's output (and, with the loss swapped, of
    the loss on the sample as its own labels) — a swap that silently did nothing or changed
    the maths shows at once.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    plan = []  # (name, module, kind, detail)
    rules = [(t, r) for on, t, r in ((attention, families.ATTENTION, _attention_rule), (mlp, families.MLP, _mlp_rule),
                                     (loss, families.CAUSAL_LM, _loss_rule)) if on]
    linear = linear and not int8
    for name, module in model.named_modules():
        if layer_norm and _swap_rule(module) is not None:
            plan.append((name, module, "norm", None))
        if linear and type(module) is torch.nn.Linear and name:
            plan.append((name, module, "linear", None))
        for table, rule in rules:
            kind, detail = _family_rule(module, table, rule)
            if kind is not None and "_mptk_original_forward" in module.__dict__:
                report.not_swapped.append((name, type(module).__name__, "already patched"))
            elif kind is not None:
                plan.append((name, module, kind, detail))
            elif detail is not None:
                report.not_swapped.append((name, type(module).__name__, detail))
    if any(name == "" for name, _, kind, _ in plan if kind == "norm"):
        raise ValueError("patch: the model itself is a norm module; wrap it or use mptkernels.nn directly")
    sample = None
    if verify is not False:
        sample = verify if isinstance(verify, torch.Tensor) else _sample_input(model)
        linears = [n for n, m in model.named_modules() if int8 and type(m) is torch.nn.Linear and n]
        names = [n for n, _, kind, _ in plan if n and kind != "loss"] + linears
        before_out, before = _outputs(model, sample, names)
        loss_kind = any(kind == "loss" for _, _, kind, _ in plan)
        before_loss = _loss(model, sample) if loss_kind else None
    for name, module, kind, detail in plan:
        if kind in ("norm", "linear"):
            if kind == "norm":
                make, detail = _swap_rule(module)
                new = make()
            else:
                new, detail = _linear_from(module), "ops.linear"
            new.train(module.training)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
            report.swapped.append((name, type(module).__name__, type(new).__name__, detail))
        else:
            table = families.CAUSAL_LM if kind == "loss" else families.MLP if kind == "mlp" else families.ATTENTION
            module._mptk_family = table[type(module).__name__]
            if kind == "mlp":
                module._mptk_activation = forwards.mlp_activation(module)
            forwards.bind_forward(module, _FORWARDS[kind])
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
        report.errors = {n: _max_error(after[n], before[n]) for n in names if n in after and n in before}
        report.output_error = (after_out - before_out).abs().max().item()
        if before_loss is not None:
            report.loss_error = abs(_loss(model, sample) - before_loss)
    return report


def _max_error(after, before) -> float:
    # a q/k norm the fused attention calls on (batch, seqlen, heads, d) where transformers' forward
    # called it on (batch, heads, seqlen, d) (Gemma 3): the same rows in the other layout
    if after.shape != before.shape and after.dim() == 4 and after.transpose(1, 2).shape == before.shape:
        after = after.transpose(1, 2)
    return (after - before).abs().max().item()


def _loss(model, sample) -> float:
    with torch.no_grad():
        return model(sample, labels=sample).loss.item()


def _sample_input(model):
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is None:
        raise ValueError("patch(verify=True) needs a model with config.vocab_size; pass a sample input as verify=...")
    p = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (2, 32), generator=g).to(p.device)
