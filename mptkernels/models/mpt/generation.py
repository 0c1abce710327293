"""Generation for MPTForCausalLM: the static KV cache, ``generate`` (batched decoding of prompts
of different lengths, greedy or sampled, HF's streamer protocol), the decode step captured as
a CUDA graph, and sampling."""
from __future__ import annotations

import torch

from . import cpu_step
from .config import _int_at_least_1, _number


class GenerationMixin:
    """``new_cache`` and ``generate`` of MPTForCausalLM (a mixin: it needs the model's
    ``config``, ``transformer.wte`` and its forward over a cache)."""

    def new_cache(self, batch: int, max_seqlen: int, device=None, dtype=None):
        """A static KV cache: (k, v), each (n_layers, batch, max_seqlen, kv_heads, head_dim)."""
        p = self.transformer.wte.weight
        shape = (self.config.n_layers, batch, max_seqlen, self.config.kv_n_heads, self.config.head_dim)
        return (torch.zeros(shape, device=device or p.device, dtype=dtype or p.dtype),
                torch.zeros(shape, device=device or p.device, dtype=dtype or p.dtype))

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, *, attention_mask=None, temperature=0.0, top_k=None, top_p=None,
                 eos_token_id=None, streamer=None, generator=None, pad_token_id=None, cuda_graph=True):
        """Prompt + new tokens, (batch, prompt_len + max_new_tokens) like HF ``generate``.

        Prompts of different lengths: left padding with ``attention_mask`` (1 = token); each
        prompt is prefilled on its own (padding never enters the cache) and decoding then runs
        batched with per-sequence cache lengths, so a batch gives each prompt's result alone.
        temperature 0: greedy; else sampling (``top_k``, ``top_p``), reproducible with a
        ``generator``. A sequence that emitted ``eos_token_id`` continues with
        ``pad_token_id`` (default: eos). HF's streamer protocol: ``streamer.put(input_ids)``
        (the prompt, (batch, prompt_len)) first, then ``put(tokens (batch,))`` every step and
        ``streamer.end()`` at the end, so transformers' TextStreamer(skip_prompt=...) works. On CUDA (``cuda_graph``) the decode
        step (the whole forward over the cache) is captured once as a CUDA graph and replayed,
        so a step costs one graph launch instead of a Python pass over every layer.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"generate: input_ids must be (batch, seqlen), got {tuple(input_ids.shape)}")
        b, p = input_ids.shape
        dev = input_ids.device
        if attention_mask is not None and tuple(attention_mask.shape) != (b, p):
            raise ValueError(f"generate: attention_mask must have input_ids' shape {(b, p)}, got "
                             f"{tuple(attention_mask.shape)}")
        if p > self.config.max_seq_len:
            raise ValueError(f"generate: the prompt has {p} tokens but max_seq_len is {self.config.max_seq_len}")
        if max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        _check_sampling(temperature, top_k, top_p)
        _check_token_ids(input_ids, self.config.vocab_size)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        lengths = mask.sum(1)
        if (lengths == 0).any():
            raise ValueError("generate: every prompt needs at least one token (attention_mask row of zeros)")
        total = int(lengths.max()) + max_new_tokens
        if total > self.config.max_seq_len and (self.config.learned_pos_emb or self.config.attn_config["rope"]):
            raise ValueError(f"generate: {total} tokens exceed max_seq_len {self.config.max_seq_len}")
        if streamer is not None:
            streamer.put(input_ids.cpu())
        was_training = self.training
        self.eval()
        cache = self.new_cache(b, total)
        seqlens = torch.zeros(b, dtype=torch.int32, device=dev)
        last = []
        for i in range(b):  # prefill each prompt alone: no padding in the cache
            ids = input_ids[i][mask[i]].unsqueeze(0)
            one = (cache[0][:, i:i + 1], cache[1][:, i:i + 1])
            logits = self(ids, cache=one, cache_seqlens=seqlens[i:i + 1], logits_to_keep=1)  # the last one is used
            last.append(logits[0, -1])
        seqlens += lengths.to(torch.int32)
        logits = torch.stack(last)
        pad = eos_token_id if pad_token_id is None else pad_token_id
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        out = []
        step_fn = _DecodeStep(self, cache, seqlens, use_graph=cuda_graph and dev.type == "cuda")
        for step in range(max_new_tokens):
            nxt = _sample(logits.float(), temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                done |= nxt == eos_token_id
            out.append(nxt)
            if streamer is not None:
                streamer.put(nxt.cpu())
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits = step_fn(nxt)  # appends nxt at seqlens, then advances seqlens
        if streamer is not None:
            streamer.end()
        self.train(was_training)
        new = torch.stack(out, 1)
        if new.shape[1] < max_new_tokens:  # everyone stopped: pad like HF does
            fill = torch.full((b, max_new_tokens - new.shape[1]), pad, dtype=new.dtype, device=dev)
            new = torch.cat([new, fill], 1)
        return torch.cat([input_ids, new], 1)


class _DecodeStep:
    """One decode step over the static cache: logits of the next token for each sequence.

    The first step runs eagerly (every argument checked; on a GPU it compiles every kernel and
    measures any per-shape choice). On CUDA with ``use_graph`` the second is captured as a CUDA
    graph over static input buffers, and every later step copies its tokens into the buffer and
    replays the graph. The cache and ``seqlens`` are the same tensors throughout, so the
    captured kernels read the current lengths from memory (the decode kernels compute their key
    ranges on the device). On the CPU with ``use_plan`` the later steps run cpu_step.plan: the
    same kernels on the same arguments without the Python between them (or eagerly, where the
    plan says why not: ``why_not``).
    """

    def __init__(self, model, cache, seqlens, use_graph, use_plan=True):
        self.model, self.cache, self.seqlens, self.use_graph = model, cache, seqlens, use_graph
        self.calls, self.graph, self.plan, self.why_not = 0, None, None, None
        self.use_plan = use_plan and seqlens.device.type == "cpu"

    def _eager(self, ids):
        return self.model(ids, cache=self.cache, cache_seqlens=self.seqlens)[:, -1]

    def __call__(self, nxt):
        ids = nxt.unsqueeze(1)
        if self.use_plan and self.calls == 1:
            self.plan, self.why_not = cpu_step.plan(self.model, self.cache, self.seqlens)
        if self.plan is not None:
            logits = self.plan(ids)
        elif not self.use_graph or self.calls == 0:
            logits = self._eager(ids)
        else:
            if self.graph is None:
                self.static_ids = ids.clone()
                self.graph = torch.cuda.CUDAGraph()
                torch.cuda.synchronize()
                with torch.cuda.graph(self.graph):
                    self.static_logits = self._eager(self.static_ids)
            self.static_ids.copy_(ids)
            self.graph.replay()
            logits = self.static_logits.clone()
        self.calls += 1
        self.seqlens += 1
        return logits


def _check_token_ids(ids, vocab):
    """Prompt ids are int64/int32 in [0, vocab): an embedding lookup would fail deep inside
    (or, on CUDA, assert) otherwise. One host read of their range per generate call."""
    integral = ids.dtype in (torch.int64, torch.int32)
    lo, hi = (int(t) for t in torch.aminmax(ids)) if integral and ids.numel() else (0, 0)
    if not integral or lo < 0 or hi >= vocab:
        raise ValueError(f"generate: input_ids must be int64/int32 token ids in [0, {vocab}), got {ids.dtype}"
                         + (f" in [{lo}, {hi}]" if integral else ""))


def _check_sampling(temperature, top_k, top_p):
    if not (_number(temperature) and temperature >= 0):
        raise ValueError(f"generate: temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if not (top_k is None or _int_at_least_1(top_k)):
        raise ValueError(f"generate: top_k must be None or an int >= 1, got {top_k!r}")
    if not (top_p is None or (_number(top_p) and 0 < top_p <= 1)):
        raise ValueError(f"generate: top_p must be None or a number in (0, 1], got {top_p!r}")


def _sample(logits, temperature, top_k, top_p, generator):
    """Next tokens (batch,) from logits (batch, vocab): argmax at temperature 0, else sampling
    from softmax(logits / temperature) restricted to the top_k and the top_p nucleus."""
    if not temperature:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, idx = torch.sort(logits, descending=True)
        p = sorted_logits.softmax(-1)
        # keep the smallest set whose mass reaches top_p (HF's rule: a token whose predecessors
        # already hold top_p is dropped; the first token is always kept)
        drop = p.cumsum(-1) - p >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
