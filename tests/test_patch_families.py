"""mptkernels.patch on every transformers family it knows (small random configs): logits, loss and
the gradient of every parameter equal to the unpatched model within the dtype's tolerance, greedy
generation identical, and each fused path counted as it runs (a swap that silently falls back
fails). Runs with the installed transformers (4.57) and, through test_families_under_transformers_5,
again in a subprocess with the current 5.x from .hf5/ (scripts/test.sh installs it)."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import mptkernels
from mptkernels import ops

import transformers  # a test dependency: scripts/test.sh installs 4.57.1
V5 = transformers.__version__.startswith("5.")
INNER = os.environ.get("MPTK_FAMILY_TESTS_INNER") == "1"

COMMON = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, vocab_size=300, max_position_embeddings=128, pad_token_id=0)


def _config(family):
    """(causal LM class, config): every option the family's swaps cover is on (GQA, sliding
    windows shorter than the test's sequence, softcaps, q/k norms, partial rotary)."""
    t = transformers
    if family == "llama":
        return t.LlamaForCausalLM, t.LlamaConfig(**COMMON)
    if family == "mistral":
        return t.MistralForCausalLM, t.MistralConfig(**COMMON, sliding_window=7)
    if family == "qwen2":  # layer 1 slides (max_window_layers=1)
        return t.Qwen2ForCausalLM, t.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=7,
                                                  max_window_layers=1)
    if family == "qwen3":
        return t.Qwen3ForCausalLM, t.Qwen3Config(**COMMON, head_dim=16)
    if family == "gemma2":  # layer 0 slides, softcaps on the scores and the logits
        return t.Gemma2ForCausalLM, t.Gemma2Config(**COMMON, head_dim=16, sliding_window=7, query_pre_attn_scalar=16,
                                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    if family == "gemma3":
        return t.Gemma3ForCausalLM, t.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=7,
                                                        query_pre_attn_scalar=16,
                                                        layer_types=["sliding_attention", "full_attention"])
    if family == "phi3":
        return t.Phi3ForCausalLM, t.Phi3Config(**COMMON, sliding_window=7)
    if family == "gpt_neox":
        cfg = {k: v for k, v in COMMON.items() if k != "num_key_value_heads"}
        return t.GPTNeoXForCausalLM, t.GPTNeoXConfig(**cfg, rotary_pct=0.5)
    if family == "mpt":
        return t.MptForCausalLM, t.MptConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=300, expansion_ratio=2,
                                             max_seq_len=128, pad_token_id=0)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt_neox", "mpt")
GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"}
ATTENTION_IMPL = {"gemma2": "eager", "mpt": "eager"}  # no SDPA path in transformers (Gemma 2: the softcap)


def _model(family, dtype=torch.float32):
    cls, cfg = _config(family)
    cfg._attn_implementation = ATTENTION_IMPL.get(family, "sdpa")
    torch.manual_seed(0)
    model = cls(cfg)
    # Gemma 3 scales its embeddings by sqrt(hidden): smaller; GPT-NeoX repeats one token below 0.3
    std = {"gemma3": 0.1, "gpt_neox": 0.3}.get(family, 0.2)
    for p in model.parameters():  # a random init of visible size, so the checks cannot pass by accident
        torch.nn.init.normal_(p, std=std if p.dim() > 1 else 1.0)
    return model.to(dtype).eval()


def _run(model, ids):
    """logits (no labels), loss (the ids as labels) and the gradient of every parameter, in fp32."""
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(ids).logits.float()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits, loss.item(), grads


def _errors(got, want):
    """(max |logits error| / max |logits|, |loss error|, the largest relative gradient error)."""
    (gl, gloss, gg), (wl, wloss, wg) = got, want
    assert gg.keys() == wg.keys()
    grad = max(((gg[n] - wg[n]).norm() / wg[n].norm().clamp_min(1e-30)).item() for n in wg)
    return (gl - wl).abs().max().item() / wl.abs().max().item(), abs(gloss - wloss), grad


class _Counter:
    """Counts calls of the ops the fused forwards use (each forward imports them at call time)."""

    def __init__(self, monkeypatch):
        self.calls = {}
        for name in ("attention", "apply_rotary", "swiglu", "geglu", "linear_cross_entropy"):
            real = getattr(ops, name)

            def counted(*a, _real=real, _name=name, **k):
                self.calls[_name] = self.calls.get(_name, 0) + 1
                return _real(*a, **k)

            monkeypatch.setattr(ops, name, counted)


def _check_report(family, report):
    kinds = {}
    for _, old, _, _ in report.swapped:
        kinds[old] = kinds.get(old, 0) + 1
    attn = [k for k in kinds if k.endswith("Attention")]
    assert len(attn) == 1 and kinds[attn[0]] == 2, str(report)
    assert sum(k.endswith("ForCausalLM") for k in kinds) == 1, str(report)
    assert (sum(k.endswith("MLP") for k in kinds) == 1) == (family in GATED), str(report)
    assert any(k.endswith("Norm") for k in kinds), str(report)
    assert kinds.get("Linear", 0) >= 8, str(report)  # every projection on ops.linear
    if family not in ("gpt_neox", "mpt"):  # their MLP is not gated: reported as left alone
        assert not report.not_swapped, str(report)
    assert report.output_error is not None and report.loss_error is not None, str(report)


def _check_calls(family, calls):
    """Each fused path ran: 2 layers x (a forward without labels + one with labels)."""
    assert calls.get("attention") == 4 and calls.get("linear_cross_entropy") == 1, calls
    if family != "mpt":
        assert calls.get("apply_rotary") == 4, calls
    if family in GATED:
        assert calls.get("swiglu", 0) + calls.get("geglu", 0) == 4, calls


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_family_matches_transformers_fp32(family, monkeypatch):
    """fp32: the patched model equals transformers' to fp32 rounding (logits, loss, every gradient)."""
    model = _model(family)
    ids = torch.randint(1, 300, (2, 19))
    want = _run(model, ids)
    report = mptkernels.patch(model, verify=True)
    _check_report(family, report)
    assert report.output_error < 1e-4 and report.loss_error < 1e-5, str(report)
    counter = _Counter(monkeypatch)
    got = _run(model, ids)
    _check_calls(family, counter.calls)
    logits, loss, grad = _errors(got, want)
    assert logits < 1e-5 and loss < 1e-5 * max(1.0, want[1]) and grad < 1e-4, (logits, loss, grad)
    assert model(ids, labels=ids).logits is None  # the loss path never computes the logits


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_family_matches_transformers_bf16(family, monkeypatch):
    """bf16: against the fp32 model of the same (bf16-rounded) weights, the patched model's error
    is at most twice transformers' own bf16 error (flash-attn's bar), for the logits, the loss
    and every gradient; plus a floor for errors that are both at rounding level."""
    model = _model(family, torch.bfloat16)
    ref = copy.deepcopy(model).float()
    ids = torch.randint(1, 300, (2, 19))
    want = _run(ref, ids)
    theirs = _errors(_run(model, ids), want)
    _check_report(family, mptkernels.patch(model, verify=True))
    counter = _Counter(monkeypatch)
    ours = _errors(_run(model, ids), want)
    _check_calls(family, counter.calls)
    for what, o, t, floor in zip(("logits", "loss", "gradient"), ours, theirs, (4e-3, 4e-3, 2e-2)):
        assert o <= 2 * t + floor, (what, o, t)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_family_generates_the_same_tokens(family, monkeypatch):
    model = _model(family)
    ids = torch.randint(1, 300, (2, 6))
    want = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    mptkernels.patch(model)
    counter = _Counter(monkeypatch)
    got = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert counter.calls.get("attention", 0) >= 2 * 12, counter.calls  # prefill + every decode step, 2 layers
    assert len(set(want[:, 6:].flatten().tolist())) > 1  # the check is not trivially one token


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox"])
def test_padding_and_dropout_keep_the_original_path(family, monkeypatch):
    """A left-padded batch and attention dropout in training are not fused: the original forward
    runs (same logits), and the fused attention is not called for them."""
    model = _model(family)
    ids = torch.randint(1, 300, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    mptkernels.patch(model)
    counter = _Counter(monkeypatch)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    assert torch.allclose(got, want, atol=2e-4) and "attention" not in counter.calls
    model.config.attention_dropout = 0.5  # read at run time as the modules' attention_dropout
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    model.train()
    model(ids)
    assert "attention" not in counter.calls
    model.eval()
    with torch.no_grad():
        model(ids)
    assert counter.calls["attention"] == 2  # and in eval (dropout off) it is fused again


def test_loss_swap_follows_num_items_in_batch_and_ignore_index():
    """Trainer's gradient accumulation passes num_items_in_batch: the loss is the sum over the
    counted tokens divided by it; -100 labels are not counted."""
    model = _model("llama")
    ids = torch.randint(1, 300, (2, 15))
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        want = model(ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss
        want_mean = model(ids, labels=labels).loss
    mptkernels.patch(model)
    with torch.no_grad():
        got = model(ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss
        got_mean = model(ids, labels=labels).loss
    assert abs(got.item() - want.item()) < 2e-5 and abs(got_mean.item() - want_mean.item()) < 2e-5


def test_patch_reports_what_it_leaves_alone():
    model = _model("gpt_neox")
    report = mptkernels.patch(model)
    assert any(cls == "GPTNeoXMLP" and "not a gated MLP" in why for _, cls, why in report.not_swapped)
    again = mptkernels.patch(model)  # patching twice changes nothing
    assert not [s for s in again.swapped if s[2] == "fused forward"]
    assert any(why == "already patched" for *_, why in again.not_swapped)
    assert "not swapped" in str(again)


def test_families_under_transformers_5():
    """This file again, under the current transformers 5.x (installed into .hf5/ by scripts/test.sh)."""
    hf5 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".hf5")
    assert os.path.isdir(os.path.join(hf5, "transformers")), \
        "transformers 5.x is not in .hf5/: scripts/test.sh installs it (pip install --target .hf5 ...)"
    env = dict(os.environ, PYTHONPATH=hf5 + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MPTK_FAMILY_TESTS_INNER="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                           "-k", "not under_transformers_5"], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def test_inner_run_is_transformers_5():
    if INNER:
        assert V5, transformers.__version__
    else:
        assert transformers.__version__.startswith("4.57"), transformers.__version__
