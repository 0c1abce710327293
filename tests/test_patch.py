"""nn drop-ins and mptkernels.patch(model): same state_dict, same outputs as the modules replaced."""
import sys

import pytest
import torch

import mptkernels
from mptkernels import nn as mnn
from conftest import rel_err


def test_patch_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match="patch: model must be a torch.nn.Module, got str"):
        mptkernels.patch("model")


def test_layer_norm_module_is_a_drop_in():
    for kwargs in ({}, {"bias": False}, {"elementwise_affine": False}):
        ref = torch.nn.LayerNorm(48, eps=1e-6, **kwargs)
        if ref.weight is not None:
            torch.nn.init.normal_(ref.weight)
        ours = mnn.LayerNorm(48, eps=1e-6, **kwargs)
        ours.load_state_dict(ref.state_dict())
        assert ours.state_dict().keys() == ref.state_dict().keys()
        x = torch.randn(2, 7, 48)
        assert rel_err(ours(x), ref(x)) <= 1e-6


def test_multi_dim_normalized_shape():
    ref = torch.nn.LayerNorm((4, 6))
    torch.nn.init.normal_(ref.weight), torch.nn.init.normal_(ref.bias)
    ours = mnn.LayerNorm((4, 6))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 6)
    assert rel_err(ours(x), ref(x)) <= 1e-6
    with pytest.raises(ValueError, match=r"expected input ending in \(4, 6\)"):
        ours(torch.randn(3, 6, 4))


def test_rms_norm_module_and_residual():
    ref = torch.nn.RMSNorm(40)  # eps=None: the dtype's epsilon
    torch.nn.init.normal_(ref.weight)
    ours = mnn.RMSNorm(40)
    ours.load_state_dict(ref.state_dict())
    x, r = torch.randn(5, 40), torch.randn(5, 40)
    assert rel_err(ours(x), ref(x)) <= 1e-6
    y, s = ours(x, residual=r)
    assert torch.equal(s, x + r) and rel_err(y, ref(x + r)) <= 1e-6
    # eps=None in 16 bits: torch computes in fp32 and takes fp32's epsilon, not the dtype's
    # (bf16's 7.8e-3 changed rows of small rms by up to 2.2); rows of small rms show it
    for dtype in (torch.bfloat16, torch.float16):
        x = (torch.randn(5, 40) * 0.01).to(dtype)
        assert rel_err(ours.to(dtype)(x), ref.to(dtype)(x)) <= 1e-2, dtype


class LlamaRMSNorm(torch.nn.Module):  # HF transformers' LlamaRMSNorm, as written there
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GemmaRMSNorm(torch.nn.Module):  # HF transformers' GemmaRMSNorm
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class LPLayerNorm(torch.nn.LayerNorm):  # llm-foundry's low-precision LayerNorm (autocast dtype = input dtype)
    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return torch.nn.functional.layer_norm(x, self.normalized_shape, w, b, self.eps)


class Block(torch.nn.Module):
    def __init__(self, d, dtype):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d, dtype=dtype)
        self.proj = torch.nn.Linear(d, d, dtype=dtype)
        self.rms = torch.nn.RMSNorm(d, dtype=dtype)
        self.llama = LlamaRMSNorm(d).to(dtype)
        self.gemma = GemmaRMSNorm(d).to(dtype)
        self.lp = LPLayerNorm(d)  # fp32 params, bf16 activations: the MPT pattern

    def forward(self, x):
        x = self.proj(self.ln(x))
        return self.lp(self.gemma(self.llama(self.rms(x))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_swaps_every_norm_and_keeps_outputs(dtype):
    model = torch.nn.Sequential(Block(64, dtype), Block(64, dtype))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(3, 5, 64, dtype=dtype)
    with torch.no_grad():
        want = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = mptkernels.patch(model, linear=False)
    assert len(report) == 10 and "LlamaRMSNorm -> RMSNorm (cast='llama')" in str(report)
    casts = {name.split(".")[-1]: cast for name, _, _, cast in report.swapped}
    assert casts == {"ln": "torch", "rms": "torch", "llama": "llama", "gemma": "gemma", "lp": "mpt"}
    assert isinstance(model[0].ln, mnn.LayerNorm) and isinstance(model[1].llama, mnn.RMSNorm)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        got = model(x)
    # the same rounding points as the modules replaced: equal up to fp32 summation order
    assert rel_err(got, want) <= (1e-5 if dtype == torch.float32 else 1e-2)
    loss = model(x).float().pow(2).mean()
    loss.backward()
    assert model[0].lp.weight.grad is not None and torch.isfinite(model[0].lp.weight.grad).all()


def test_patch_swaps_linears_sharing_their_parameters():
    """nn.Linear -> mptkernels.nn.Linear (ops.linear): same parameters (a tied weight stays tied),
    same outputs and gradients; a subclass of nn.Linear is left alone; int8 takes the linears."""
    class MyLinear(torch.nn.Linear):
        pass

    emb = torch.nn.Embedding(50, 16)
    model = torch.nn.Sequential(emb, torch.nn.Linear(16, 24), MyLinear(24, 16, bias=False), torch.nn.Linear(16, 50))
    model[3].weight = emb.weight  # tied, as a language model's head
    ids = torch.randint(0, 50, (3, 7))
    want = model(ids)
    want.square().mean().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    report = mptkernels.patch(model, verify=ids)
    assert [(n, new) for n, _, new, _ in report.swapped] == [("1", "Linear"), ("3", "Linear")], str(report)
    assert type(model[1]) is mnn.Linear and type(model[2]) is MyLinear and model[3].weight is emb.weight
    assert report.errors["1"] < 1e-5 and "ops.linear" in str(report)
    got = model(ids)
    got.square().mean().backward()
    assert rel_err(got, want) <= 1e-5
    assert all(rel_err(p.grad, g) <= 1e-5 for p, g in zip(model.parameters(), want_grads))


def test_patch_shares_parameters_and_leaves_subclasses():
    class MyNorm(torch.nn.LayerNorm):
        pass

    ln = torch.nn.LayerNorm(8)
    model = torch.nn.Sequential(ln, MyNorm(8))
    report = mptkernels.patch(model)
    assert [name for name, *_ in report.swapped] == ["0"]
    assert model[0].weight is ln.weight and type(model[1]) is MyNorm
    assert str(mptkernels.patch(torch.nn.Linear(2, 2))) == "mptkernels.patch: nothing swapped"
    assert len(mptkernels.patch(torch.nn.Sequential(torch.nn.LayerNorm(4)), layer_norm=False)) == 0


# ---------------------------------------------------------------- attention swaps (transformers)
def _hf_mpt():
    import transformers  # a test dependency: scripts/test.sh installs 4.57.1
    torch.manual_seed(0)
    cfg = transformers.MptConfig(d_model=96, n_heads=6, n_layers=2, max_seq_len=256, vocab_size=512,
                                 attn_config={"alibi": True}, initializer_range=0.2)
    return transformers.MptForCausalLM(cfg).eval()


def test_patch_hf_mpt_attention_keeps_logits_and_generation():
    hf = _hf_mpt()
    ids = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        want = hf(ids).logits
    gen_want = hf.generate(ids[:, :6], max_new_tokens=10, do_sample=False, pad_token_id=0)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :9] = 0  # left padding: the original attention path
    with torch.no_grad():
        padded_want = hf(ids, attention_mask=mask).logits
    report = mptkernels.patch(hf, verify=True)
    attn = [s for s in report.swapped if s[1] == "MptAttention"]
    assert len(attn) == 2 and all(report.errors[name] < 1e-4 for name, *_ in attn)
    assert report.output_error < 1e-4 and "max error" in str(report)
    assert type(hf.transformer.blocks[0].attn).__name__ == "MptAttention"  # the instance, not the class
    with torch.no_grad():
        assert (hf(ids).logits - want).abs().max() < 1e-4
        assert (hf(ids, attention_mask=mask).logits - padded_want).abs().max() < 1e-4
    assert torch.equal(hf.generate(ids[:, :6], max_new_tokens=10, do_sample=False, pad_token_id=0), gen_want)
    other = _hf_mpt()  # another instance of the class is untouched
    assert "_mptk_original_forward" not in other.transformer.blocks[0].attn.__dict__


def test_patch_verify_catches_a_changed_model_and_reports_refusals(monkeypatch):
    hf = _hf_mpt()
    # the module patch() will import now (building a model can replace sys.modules' entry for
    # transformers' lazy module, so one imported before it may not be the one patch() sees)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "9.0.0")
    report = mptkernels.patch(hf, layer_norm=False, linear=False)
    assert not report.swapped and "is not one of the versions" in report.not_swapped[0][2]
    monkeypatch.undo()
    hf = _hf_mpt()
    sample = torch.randint(0, 512, (1, 12))
    report = mptkernels.patch(hf, verify=sample, int8="w8a8")
    # W8A8 changes the maths a little: verify measures it per linear and for the output
    assert all(n in report.errors for n in ("transformer.blocks.0.attn.Wqkv", "transformer.blocks.1.ffn.up_proj"))
    assert "verify: transformer.blocks.0.attn.Wqkv (int8) max error" in str(report)
    assert 1e-6 < report.output_error < 0.6  # measured 0.34; a W8A8 output 3% too small gives 0.87


def test_patch_routes_sdpa_of_hf_llama():
    import transformers  # a test dependency: scripts/test.sh installs 4.57.1
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, vocab_size=300, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        want = model(ids).logits
    import sys

    attn_mod = sys.modules["mptkernels.ops.attention"]  # (ops.attention is the function)
    calls = []
    real = mptkernels.torch_impl.SDPA
    # the SDPA routing alone (attention=False: the attention modules keep their forward)
    report = mptkernels.patch(model, attention=False, sdpa=True, verify=True)
    assert report.sdpa_routed and not any(old == "LlamaAttention" for _, old, _, _ in report.swapped)

    original_attention = attn_mod.attention

    def counting(*a, **k):
        calls.append(1)
        return original_attention(*a, **k)

    attn_mod.attention = counting
    try:
        with torch.no_grad():
            got = model(ids).logits
    finally:
        attn_mod.attention = original_attention
    assert calls, "the fused kernel must serve the model's SDPA calls"
    assert (got - want).abs().max() < 1e-4 and torch.nn.functional.scaled_dot_product_attention is real
