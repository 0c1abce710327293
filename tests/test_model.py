"""The reference MPT model: parity with transformers' MptForCausalLM, HF checkpoints in and
out, KV-cache generation against full recomputation, batching, sampling, training."""
import json
import os

import pytest
import torch
import transformers  # a test dependency: scripts/test.sh installs 4.57.1

from mptkernels.models import MPTConfig, MPTForCausalLM


def _hf_model(n_heads=6, d_model=96, n_layers=2, vocab=512, seed=0, no_bias_false=False, **attn):
    torch.manual_seed(seed)
    cfg = transformers.MptConfig(d_model=d_model, n_heads=n_heads, n_layers=n_layers, max_seq_len=256,
                                 vocab_size=vocab, attn_config={"alibi": True, **attn}, initializer_range=0.2,
                                 **({"no_bias": False} if no_bias_false else {}))
    return transformers.MptForCausalLM(cfg).eval()


def _ours(**attn):
    torch.manual_seed(1)
    cfg = MPTConfig(d_model=64, n_heads=8, n_layers=2, max_seq_len=128, vocab_size=257, attn_config=attn)
    m = MPTForCausalLM(cfg).eval()
    m.reset_parameters(std=0.3)  # sharper logits than the training init: more varied greedy tokens
    return m


@pytest.mark.parametrize("n_heads, attn", [(4, {}), (6, {}), (4, {"clip_qkv": 0.3}), (4, {"softmax_scale": 0.5})],
                         ids=str)  # 6: ALiBi slopes of a non-power-of-two head count
def test_logits_and_greedy_generation_match_transformers(n_heads, attn):
    hf = _hf_model(n_heads=n_heads, **attn)
    ours = MPTForCausalLM.from_hf(hf).eval()
    ids = torch.randint(0, 512, (3, 41))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-4
    want = hf.generate(ids[:, :7], max_new_tokens=12, do_sample=False, pad_token_id=0)
    got = ours.generate(ids[:, :7], 12)
    assert torch.equal(got, want)
    assert len(set(got[:, 7:].flatten().tolist())) > 3  # the check is not trivially one token


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_logits_to_keep_gives_the_last_positions_logits(quantized):
    """forward(logits_to_keep=n): the last n rows of the full logits (to rounding: the LM head
    runs on fewer rows), with and without a cache, float and quantised heads; bad values are
    one-line errors."""
    from mptkernels import quantize_

    m = _ours()
    if quantized:
        quantize_(m, "weight_only")
    ids = torch.randint(0, 257, (2, 19))
    with torch.no_grad():
        full = m(ids)
        for n in (1, 5, 19):
            got = m(ids, logits_to_keep=n)
            assert got.shape == (2, n, 257) and torch.allclose(got, full[:, -n:], rtol=1e-5, atol=1e-5), n
        cache = m.new_cache(2, 32)
        lens = torch.zeros(2, dtype=torch.int32)
        assert torch.allclose(m(ids, cache=cache, cache_seqlens=lens, logits_to_keep=1), full[:, -1:], atol=1e-5)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match=r"logits_to_keep must be an integer >= 0 \(0: every position\), got"):
            m(ids, logits_to_keep=bad)
    with pytest.raises(ValueError, match="logits_to_keep is for inference"):
        m(ids, ids, logits_to_keep=1)


HF5 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".hf5")
_HF5_SCRIPT = """
import sys, torch, transformers
assert transformers.__version__.startswith("5."), transformers.__version__
src, ids_file, out_file = sys.argv[1:]
ids, want = torch.load(ids_file)
m = transformers.MptForCausalLM.from_pretrained(src).eval()
with torch.no_grad():
    got = m(ids).logits
m.save_pretrained(out_file)  # and back: ours reads what 5.x writes
torch.save(got, out_file + "/logits.pt")
print(transformers.__version__, float((got - want).abs().max()))
"""


def test_exported_model_loads_in_transformers_5(tmp_path):
    """The current transformers (5.x, installed into .hf5/ by scripts/test.sh) loads what
    save_pretrained writes (its configs validate field types: attn_pdrop is an int there) with
    the same logits, and what 5.x saves loads back into ours."""
    import subprocess
    import sys

    assert os.path.isdir(os.path.join(HF5, "transformers")), \
        "transformers 5.x is not in .hf5/: scripts/test.sh installs it (pip install --target .hf5 ...)"
    ours = _ours().eval()
    ours.save_pretrained(str(tmp_path / "ours"))
    ids = torch.randint(0, 257, (2, 13))
    with torch.no_grad():
        want = ours(ids)
    torch.save((ids, want), tmp_path / "ids.pt")
    env = dict(os.environ, PYTHONPATH=HF5)
    proc = subprocess.run([sys.executable, "-c", _HF5_SCRIPT, str(tmp_path / "ours"), str(tmp_path / "ids.pt"),
                           str(tmp_path / "hf5")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    version, err = proc.stdout.split()[-2:]
    assert version.startswith("5.") and float(err) <= 1e-4, proc.stdout
    back = MPTForCausalLM.from_hf(str(tmp_path / "hf5")).eval()
    with torch.no_grad():
        assert (back(ids) - torch.load(tmp_path / "hf5" / "logits.pt")).abs().max() <= 1e-4
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["attn_config"]["attn_pdrop"] == 0


def test_hf_checkpoints_in_and_out(tmp_path):
    hf = _hf_model()
    ids = torch.randint(0, 512, (2, 19))
    with torch.no_grad():
        want = hf(ids).logits
    hf.save_pretrained(tmp_path / "st")  # safetensors
    hf.save_pretrained(tmp_path / "bin", safe_serialization=False)
    for d in ("st", "bin"):
        ours = MPTForCausalLM.from_hf(str(tmp_path / d)).eval()
        with torch.no_grad():
            assert (ours(ids) - want).abs().max() <= 1e-4, d
    ours.save_pretrained(str(tmp_path / "ours"))
    back = transformers.MptForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert (back(ids).logits - want).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="transformers' MPT covers"):
        _ours(kv_n_heads=2).save_pretrained(str(tmp_path / "gqa"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MPTForCausalLM.from_hf(str(tmp_path))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "ours" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        MPTForCausalLM.from_hf(str(tmp_path / "empty"))
    with pytest.raises(TypeError, match="from_hf: src must be a save_pretrained directory or a transformers "
                                        "MptForCausalLM, got int"):
        MPTForCausalLM.from_hf(123)
    # transformers' MPT has all kv heads and no biases whatever its config says (llm-foundry's
    # defaults carry kv_n_heads=1 beside multihead_attention; no_bias=False builds no biases)
    odd = _hf_model(no_bias_false=True)
    odd.save_pretrained(tmp_path / "odd")
    cfg_file = tmp_path / "odd" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["attn_config"].update(kv_n_heads=1, attn_type="multihead_attention")
    cfg_file.write_text(json.dumps(cfg))
    for src in (odd, str(tmp_path / "odd")):
        m = MPTForCausalLM.from_hf(src).eval()
        with torch.no_grad():
            assert (m(ids) - odd(ids).logits).abs().max() <= 1e-4
    # what transformers would read as another model is refused
    with pytest.raises(ValueError, match="alibi_bias_max 8"):
        _ours(alibi_bias_max=16).save_pretrained(str(tmp_path / "bias16"))
    q = MPTForCausalLM.from_hf(str(tmp_path / "ours"))
    import mptkernels
    mptkernels.quantize_(q, "weight_only")
    with pytest.raises(ValueError, match="holds int8 layers"):
        q.save_pretrained(str(tmp_path / "int8"))
    # sharded: index + shards as transformers writes them; both loaders read it back
    ours.save_pretrained(str(tmp_path / "ours"), max_shard_bytes=100_000)
    files = sorted(os.listdir(tmp_path / "ours"))
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    for m in (MPTForCausalLM.from_hf(str(tmp_path / "ours")),
              transformers.MptForCausalLM.from_pretrained(str(tmp_path / "ours"))):
        with torch.no_grad():
            out = m.eval()(ids)
        assert (getattr(out, "logits", out) - want).abs().max() <= 1e-4
    # damaged files are named
    (tmp_path / "ours" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        MPTForCausalLM.from_hf(str(tmp_path / "ours"))
    ours.save_pretrained(str(tmp_path / "cut"))
    st = tmp_path / "cut" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read .*model.safetensors"):
        MPTForCausalLM.from_hf(str(tmp_path / "cut"))


@pytest.mark.parametrize("attn", [dict(alibi=True, kv_n_heads=2), dict(alibi=False, rope=True),
                                  dict(alibi=True, clip_qkv=0.5), dict(alibi=True, qk_ln=True, kv_n_heads=4)], ids=str)
def test_cached_decoding_equals_full_recompute(attn):
    model = _ours(**attn)
    prompt = torch.randint(0, 257, (2, 9))
    got = model.generate(prompt, 15)
    seq = prompt
    with torch.no_grad():
        for _ in range(15):  # no cache: the whole sequence every step
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq)
    # the logits too (tokens alone let a small error in the cached path through): prefill 9,
    # then one token at a time over the cache, against one pass over the whole sequence
    with torch.no_grad():
        full = model(seq)
        cache, lens = model.new_cache(2, seq.shape[1]), torch.zeros(2, dtype=torch.int32)
        steps = [model(seq[:, :9], cache=cache, cache_seqlens=lens)]
        lens += 9
        for t in range(9, seq.shape[1]):
            steps.append(model(seq[:, t:t + 1], cache=cache, cache_seqlens=lens))
            lens += 1
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4


def test_position_tables_stay_out_of_the_state_dict_and_in_float32():
    alibi, rope = _ours(), _ours(alibi=False, rope=True)
    assert set(rope.state_dict()) == set(alibi.state_dict())  # HF's keys: no slopes, no rotary tables
    ids = torch.randint(0, 257, (2, 9))
    with torch.no_grad():
        want = rope(ids)
        # a meta-device model (from_hf's way) gets real tables: to_empty + load gives the same logits
        meta = MPTForCausalLM(rope.config, device="meta").to_empty(device="cpu")
        meta.load_state_dict(rope.state_dict())
        assert torch.equal(meta.eval()(ids), want)
        # a bf16 model keeps float32 rotary tables and slopes
        half = _ours(alibi=False, rope=True).to(torch.bfloat16)
        assert half.transformer.rotary_emb.cos.dtype == torch.float32
        assert half(ids).dtype == torch.bfloat16 and _ours().to(torch.bfloat16)._alibi("cpu").dtype == torch.float32


def test_learned_positions_decode_and_batch_of_different_lengths():
    torch.manual_seed(2)
    model = MPTForCausalLM(MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=100,
                                     learned_pos_emb=True, attn_config=dict(alibi=False))).eval()
    model.reset_parameters(std=0.3)
    a, b = torch.randint(0, 100, (1, 11)), torch.randint(0, 100, (1, 4))
    alone = [model.generate(a, 8), model.generate(b, 8)]
    batch = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 7:], mask[1, 7:] = b[0], 1  # left padding
    got = model.generate(batch, 8, attention_mask=mask)
    assert torch.equal(got[0], alone[0][0]) and torch.equal(got[1, 11:], alone[1][0, 4:])


def test_sampling_eos_and_streamer():
    model = _ours()
    prompt = torch.randint(0, 257, (2, 5))
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    s1 = model.generate(prompt, 10, temperature=0.8, top_k=20, top_p=0.9, generator=g())
    s2 = model.generate(prompt, 10, temperature=0.8, top_k=20, top_p=0.9, generator=g())
    assert torch.equal(s1, s2)
    assert torch.equal(model.generate(prompt, 10, temperature=1.0, top_k=1, generator=g()), model.generate(prompt, 10))
    greedy = model.generate(prompt, 10)
    eos = int(greedy[0, 7])  # the third new token of sequence 0
    stopped = model.generate(prompt, 10, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(stopped[0, :8], greedy[0, :8]) and (stopped[0, 8:] == 0).all()

    class Streamer:
        def __init__(self):
            self.got, self.ended = [], False

        def put(self, t):
            self.got.append(t)

        def end(self):
            self.ended = True

    st = Streamer()
    out = model.generate(prompt, 6, streamer=st)
    # HF's protocol: the prompt first, then each step's tokens, then end()
    assert st.ended and torch.equal(st.got[0], prompt) and torch.equal(torch.stack(st.got[1:], 1), out[:, 5:])
    # transformers' own streamer, prompt skipped or not
    from mptkernels.generate import ByteTokenizer

    class Tok:  # what TextStreamer asks of a tokenizer
        def decode(self, ids, **kw):
            return ByteTokenizer().decode(list(ids))

    for skip in (True, False):
        ts = transformers.TextStreamer(Tok(), skip_prompt=skip)
        printed = []
        ts.on_finalized_text = lambda text, stream_end=False: printed.append(text)
        out = model.generate(prompt[:1], 6, streamer=ts)
        assert "".join(printed).rstrip("\n") == Tok().decode(out[0, 0 if not skip else 5:].tolist())


def test_top_p_keeps_the_smallest_set_reaching_it():
    from mptkernels.models.mpt import _sample

    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert (_sample(logits, 1.0, None, 0.5, g) == 0).all()  # 0.5 alone reaches 0.5, as HF keeps it
    assert set(_sample(logits, 1.0, None, 0.51, g).tolist()) == {0, 1}
    assert (_sample(logits, 1.0, None, 1e-6, g) == 0).all()  # the top token is always kept


def test_training_on_cpu_learns_and_reaches_every_parameter():
    torch.manual_seed(3)
    model = MPTForCausalLM(MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=50,
                                     attn_config=dict(kv_n_heads=2)))
    model.train()
    data = torch.arange(40).remainder(10).repeat(4, 1)  # a learnable repeating pattern
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        _, loss = model(data, labels=data)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("mode, tol", [("w8a8", 0.05), ("weight_only", 0.02)])
def test_int8_model_keeps_the_float_output_and_generates(mode, tol):
    import mptkernels

    model = _ours()
    prompt = torch.randint(0, 257, (1, 6))
    with torch.no_grad():
        want = model(prompt)
    report = mptkernels.quantize_(model, mode, filter=lambda name, m: "lm_head" not in name)
    assert len(report) == 8  # Wqkv, out_proj, up, down of two blocks
    assert model.transformer.blocks[0].ffn.up_proj.activation == "gelu"  # the up projection's GELU goes along
    with torch.no_grad():
        got = model(prompt)
    assert ((got - want).norm() / want.norm()) < tol
    assert model.generate(prompt, 5).shape == (1, 11)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown attn_config keys"):
        MPTConfig(attn_config={"alibbi": True})
    with pytest.raises(ValueError, match="multiple of kv_n_heads"):
        MPTConfig(d_model=64, n_heads=8, attn_config={"kv_n_heads": 3})
    with pytest.raises(ValueError, match="exclusive"):
        MPTConfig(attn_config={"alibi": True, "rope": True})
    with pytest.raises(ValueError, match="at least one token"):
        _ours().generate(torch.zeros(1, 3, dtype=torch.long), 2, attention_mask=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        _ours().generate(torch.zeros(2, 3, dtype=torch.long), 2, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="max_seq_len is 128"):
        _ours().generate(torch.zeros(1, 129, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="input_ids must be"):
        _ours().generate(torch.zeros(3, dtype=torch.long), 2)
    ids = torch.zeros(1, 3, dtype=torch.long)
    for kw, match in [(dict(temperature=-1.0), "temperature must be a number >= 0"), (dict(top_k=0), "top_k must be"),
                      (dict(temperature=1.0, top_p=-0.5), r"top_p must be None or a number in \(0, 1\]"),
                      (dict(top_p=1.5), "top_p must be")]:
        with pytest.raises(ValueError, match=match):
            _ours().generate(ids, 2, **kw)
    for bad in (torch.tensor([[1, 257]]), torch.tensor([[-1, 2]]), torch.zeros(1, 2)):
        with pytest.raises(ValueError, match=r"token ids in \[0, 257\)"):
            _ours().generate(bad, 2)
    # MPTConfig: each field checked, by name
    for kw, match in [(dict(d_model="64"), "d_model must be an int >= 1, got '64'"), (dict(n_heads=0), "n_heads must be"),
                      (dict(logit_scale="foo"), "logit_scale must be None, a number or 'inv_sqrt_d_model'"),
                      (dict(expansion_ratio=-1), "expansion_ratio must be a number >= 0"),
                      (dict(attn_config={"prefix_lm": True}), "prefix_lm is not supported"),
                      (dict(attn_config={"attn_type": "cross"}), "attn_type 'cross' is not supported"),
                      (dict(resid_pdrop=1.0), r"resid_pdrop must be in \[0, 1\)"),
                      (dict(norm_cast="gemma"), "norm_cast must be 'torch' or 'mpt'"),
                      (dict(d_model=68, n_heads=4, attn_config={"alibi": False, "rope": True}), "rope needs an even"),
                      (dict(attn_config={"attn_pdrop": 1.5}), "attn_pdrop must be a number in"),
                      (dict(learned_pos_emb="no"), "learned_pos_emb must be true or false"),
                      (dict(attn_config={"kv_n_heads": -2}), "kv_n_heads must be null or an int >= 1"),
                      (dict(attn_config={"alibi_bias_max": "8"}), "alibi_bias_max must be a number > 0"),
                      (dict(attn_config={"clip_qkv": -1}), "clip_qkv must be null or a number > 0")]:
        with pytest.raises(ValueError, match=match):
            MPTConfig(**kw)
    # llm-foundry's attn_type decides the kv heads (its defaults carry kv_n_heads=1 beside MHA)
    assert MPTConfig(n_heads=8, attn_config={"attn_type": "multihead_attention", "kv_n_heads": 1}).kv_n_heads == 8
    assert MPTConfig(n_heads=8, attn_config={"attn_type": "multiquery_attention"}).kv_n_heads == 1
    # llm-foundry's fractional expansion ratios: FFN width int(ratio * d_model)
    m = MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=1, max_seq_len=16, vocab_size=50, expansion_ratio=2.5))
    assert m.transformer.blocks[0].ffn.up_proj.weight.shape == (80, 32) and m(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 50)
    # attention dropout: refused in training (the fused kernel has none), ignored in inference
    m = MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=1, max_seq_len=16, vocab_size=50,
                                 attn_config={"attn_pdrop": 0.1}))
    m.eval()(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="attn_pdrop > 0 is not supported in training"):
        m.train()(torch.zeros(1, 4, dtype=torch.long))


def test_input_ids_outside_the_vocabulary_are_a_one_line_error():
    """An id the embedding cannot look up is a ValueError naming input_ids, the id and the
    vocabulary, before the embedding (a bare IndexError on the CPU, a device-side assert that
    ruins the CUDA context on a GPU); a wrong dtype or rank is named too."""
    m = _ours()  # vocab_size 257
    for bad, match in [(torch.tensor([[1, 257]]), r"MPTForCausalLM: input_ids holds 257, but token ids must be in "
                                                  r"\[0, vocab_size=257\)$"),
                       (torch.tensor([[3, -1, 2]]), r"input_ids holds -1, .*vocab_size=257"),
                       (torch.tensor([[5, 300]], dtype=torch.int32), "input_ids holds 300")]:
        with pytest.raises(ValueError, match=match):
            m(bad)
        with pytest.raises(ValueError, match=match):
            m.train()(bad, labels=bad)
        m.eval()
    for bad, err, match in [(torch.zeros(1, 3), TypeError, "input_ids must be int64 or int32 token ids, got torch.float32"),
                            (torch.zeros(1, 3, dtype=torch.int16), TypeError, "got torch.int16"),
                            (torch.zeros(3, dtype=torch.long), ValueError, r"input_ids must be \(batch, seqlen\), got "
                                                                           r"shape \(3,\)"),
                            ([[1, 2]], TypeError, "input_ids must be a .* tensor of token ids, got list")]:
        with pytest.raises(err, match=match):
            m(bad)
    # the ends of the vocabulary are fine, in int64 and int32 alike
    ids = torch.tensor([[0, 256, 7]])
    with torch.no_grad():
        assert torch.equal(m(ids), m(ids.int()))
    # torch.compile traces without the check (a data-dependent branch would break the graph)
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(ids), m(ids), atol=1e-6)


def test_generate_cli_streams_text_and_reports_speed(tmp_path):
    import subprocess
    import sys

    torch.manual_seed(4)
    model = MPTForCausalLM(MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=256))
    model.save_pretrained(str(tmp_path))
    for extra in ([], ["--int8", "--temperature", "0.7", "--top-k", "40"]):
        r = subprocess.run([sys.executable, "-m", "mptkernels.generate", "--model", str(tmp_path), "--prompt", "héllo",
                            "--max-new-tokens", "12", "--device", "cpu", *extra], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("héllo") and "tokens/s" in r.stderr and "12 new tokens" in r.stderr
    # the printed text is what generate returns
    from mptkernels.generate import ByteTokenizer

    ids = torch.tensor([ByteTokenizer().encode("héllo")])
    want = ByteTokenizer().decode(model.eval().generate(ids, 12)[0].tolist())
    r = subprocess.run([sys.executable, "-m", "mptkernels.generate", "--model", str(tmp_path), "--prompt", "héllo",
                        "--max-new-tokens", "12", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.stdout.rstrip("\n") == want


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_generation_cuda_graph_matches_eager(dtype):
    model = _ours(alibi=True, kv_n_heads=2).to("cuda", dtype)
    prompt = torch.randint(0, 257, (3, 9), device="cuda")
    mask = torch.ones_like(prompt)
    mask[2, :4] = 0
    eager = model.generate(prompt, 20, attention_mask=mask, cuda_graph=False)
    graphed = model.generate(prompt, 20, attention_mask=mask, cuda_graph=True)
    assert torch.equal(eager, graphed)
    cpu = model.float().cpu().generate(prompt.cpu(), 20, attention_mask=mask.cpu())
    if dtype == torch.float32:
        assert torch.equal(eager.cpu(), cpu)


def test_packed_documents_attend_only_within_each_document():
    model = _ours(alibi=True, kv_n_heads=2)
    docs = [torch.randint(0, 257, (n,)) for n in (7, 1, 20, 4)]
    ids = torch.cat(docs).view(2, 16)
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)]).view(2, 16)
    with torch.no_grad():
        packed = model(ids, doc_ids=doc_ids).view(32, -1)
        # row 1 starts in the middle of document 2: that piece is its own document there
        pieces = [docs[0], docs[1], docs[2][:8], docs[2][8:], docs[3]]
        alone = torch.cat([model(p.view(1, -1))[0] for p in pieces])
    assert (packed - alone).abs().max() < 1e-4
    # training through it: gradients reach everything, the loss skips cross-document targets
    model.train()
    _, loss = model(ids, labels=ids, doc_ids=doc_ids)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match="doc_ids must have input_ids' shape"):
        model(ids, doc_ids=doc_ids[:1])


def _planned_and_eager_steps(model, batch=3, steps=6, use_plan=True):
    """Logits of `steps` decode steps after a prefill, through generate()'s _DecodeStep."""
    from mptkernels.models.mpt.generation import _DecodeStep

    torch.manual_seed(5)
    prompt = torch.randint(0, model.config.vocab_size, (batch, 7))
    tokens = torch.randint(0, model.config.vocab_size, (steps, batch))
    out = []
    with torch.no_grad():
        cache, lens = model.new_cache(batch, 7 + steps), torch.zeros(batch, dtype=torch.int32)
        model(prompt, cache=cache, cache_seqlens=lens)
        lens += 7
        step = _DecodeStep(model, cache, lens, use_graph=False, use_plan=use_plan)
        for t in tokens:
            out.append(step(t))
        return torch.stack(out), step, cache


def _odd_model(dtype=torch.float32, quantize=None, **kw):
    torch.manual_seed(3)
    attn = kw.pop("attn", {})
    cfg = MPTConfig(d_model=96, n_heads=6, n_layers=3, max_seq_len=64, vocab_size=301, attn_config=attn, **kw)
    m = MPTForCausalLM(cfg).eval()
    m.reset_parameters(std=0.3)
    for name, p in m.named_parameters():  # non-trivial norm weights and biases
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5) if name.endswith("weight") else p.data.uniform_(-0.3, 0.3)
    m = m.to(dtype)
    if quantize:
        import mptkernels
        mptkernels.quantize_(m, quantize)
    return m


@pytest.mark.parametrize("case", [
    dict(attn=dict(kv_n_heads=2)), dict(attn=dict(clip_qkv=0.4, softmax_scale=0.3)),
    dict(attn=dict(qk_ln=True, kv_n_heads=3), no_bias=False), dict(learned_pos_emb=True, attn=dict(alibi=False)),
    dict(logit_scale="inv_sqrt_d_model", no_bias=False), dict(dtype=torch.bfloat16, attn=dict(kv_n_heads=2)),
    dict(quantize="weight_only", no_bias=False), dict(quantize="w8a8"),
    dict(dtype=torch.bfloat16, quantize="weight_only")], ids=str)
def test_cpu_decode_plan_computes_what_the_eager_step_computes(case):
    """generate()'s CPU decode step (cpu_step.plan: the kernels called directly) gives bitwise the
    eager forward's logits and cache, step after step, for every model feature it takes on."""
    model = _odd_model(**case)
    planned, step, cache = _planned_and_eager_steps(model)
    assert step.plan is not None, step.why_not
    eager, step_e, cache_e = _planned_and_eager_steps(model, use_plan=False)
    assert step_e.plan is None and torch.isfinite(eager).all()
    assert torch.equal(planned, eager)
    assert torch.equal(cache[0], cache_e[0]) and torch.equal(cache[1], cache_e[1])


def test_cpu_decode_plan_steps_aside_for_what_it_does_not_reproduce():
    """Rotary models, hooked modules, a backend forced to PyTorch's op and a replaced module decode
    eagerly (the plan says why), with the eager step's results; a hook fires on every step."""
    from mptkernels import backend

    model = _odd_model(attn=dict(alibi=False, rope=True))
    _, step, _ = _planned_and_eager_steps(model)
    assert step.plan is None and step.why_not == "rotary embeddings"

    model = _odd_model()
    want, _, _ = _planned_and_eager_steps(model, use_plan=False)
    calls = []
    handle = model.transformer.blocks[1].ffn.up_proj.register_forward_hook(lambda *a: calls.append(1))
    got, step, _ = _planned_and_eager_steps(model)
    handle.remove()
    assert step.plan is None and "hooks" in step.why_not and len(calls) == 1 + 6 and torch.equal(got, want)  # prefill + steps

    with backend(linear="torch"):
        got, step, _ = _planned_and_eager_steps(model)
    assert step.plan is None and "linear" in step.why_not and torch.allclose(got, want, atol=1e-4)

    model.transformer.blocks[0].attn.out_proj = torch.nn.Linear(96, 96, bias=False)
    _, step, _ = _planned_and_eager_steps(model)
    assert step.plan is None and step.why_not == "a linear is Linear"
