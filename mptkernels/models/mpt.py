"""The reference MPT model on mptkernels ops: training forward, static-KV-cache generation,
and Hugging Face MPT checkpoints in and out.

Architecture (MosaicML MPT / llm-foundry): token embedding (+ learned positions when
``learned_pos_emb``), n pre-norm blocks of [LayerNorm -> fused QKV -> attention (causal,
ALiBi or rotary, GQA with kv_n_heads) -> out proj -> residual; LayerNorm -> up proj + GELU ->
down proj -> residual], a final LayerNorm, and the LM head tied to the embedding. Every
residual add is fused into the next norm (``ops.layer_norm`` with ``residual``), the GELU
into the up projection's epilogue (``ops.linear``), attention is ``ops.attention`` (training,
prefill) or ``ops.attention_with_kvcache`` (decoding). The state_dict keys are HF's
``MptForCausalLM`` keys, so ``from_hf`` / ``save_pretrained`` are renames-free.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import torch
import torch.nn.functional as F

from .. import nn as mnn
from .. import ops, reference
from . import safetensors_io

_ATTN_DEFAULTS = dict(attn_pdrop=0.0, alibi=True, alibi_bias_max=8, clip_qkv=None, qk_ln=False, softmax_scale=None,
                      kv_n_heads=None, rope=False, rope_theta=10000.0)


@dataclasses.dataclass
class MPTConfig:
    """The fields of Hugging Face's ``MptConfig`` (and llm-foundry's attn_config keys), plus
    our switches. ``attn_config`` keys: alibi, alibi_bias_max, clip_qkv, qk_ln, softmax_scale,
    kv_n_heads (GQA), rope, rope_theta, attn_pdrop."""
    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 24
    expansion_ratio: int = 4
    max_seq_len: int = 2048
    vocab_size: int = 50368
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    layer_norm_epsilon: float = 1e-5
    learned_pos_emb: bool = False
    logit_scale: float | str | None = None  # or "inv_sqrt_d_model"
    no_bias: bool = True
    attn_config: dict = dataclasses.field(default_factory=dict)
    # ours: LayerNorm rounding ("torch"; "mpt" = llm-foundry's low-precision LayerNorm)
    norm_cast: str = "torch"

    def __post_init__(self):
        _check_values(vars(self), _FIELD_RULES, "")
        if self.ffn_hidden < 1:
            raise ValueError(f"MPTConfig: expansion_ratio {self.expansion_ratio} x d_model {self.d_model} leaves no "
                             "FFN width")
        if not isinstance(self.attn_config, dict):
            raise ValueError(f"MPTConfig: attn_config must be a dict, got {type(self.attn_config).__name__}")
        unknown = set(self.attn_config) - set(_ATTN_DEFAULTS) - {"attn_type", "attn_impl", "prefix_lm",
                                                                  "attn_uses_sequence_id"}
        if unknown:
            raise ValueError(f"MPTConfig: unknown attn_config keys {sorted(unknown)}; known: {sorted(_ATTN_DEFAULTS)}")
        # llm-foundry's keys that would change the maths are refused rather than dropped
        for key in ("prefix_lm", "attn_uses_sequence_id"):
            if self.attn_config.get(key):
                raise ValueError(f"MPTConfig: attn_config.{key} is not supported (set it to false)")
        attn = {k: v for k, v in self.attn_config.items() if k in _ATTN_DEFAULTS}
        # llm-foundry's attn_type decides kv_n_heads: its default config carries kv_n_heads=1
        # beside multihead_attention, which is not multi-query attention
        attn_type = self.attn_config.get("attn_type")
        if attn_type == "multihead_attention":
            attn["kv_n_heads"] = None
        elif attn_type == "multiquery_attention":
            attn["kv_n_heads"] = 1
        elif attn_type not in (None, "grouped_query_attention"):
            raise ValueError(f"MPTConfig: attn_config.attn_type {attn_type!r} is not supported (multihead_attention, "
                             "multiquery_attention or grouped_query_attention)")
        self.attn_config = {**_ATTN_DEFAULTS, **attn}
        _check_values(self.attn_config, _ATTN_RULES, "attn_config.")
        if self.d_model % self.n_heads:
            raise ValueError(f"MPTConfig: d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.n_heads % self.kv_n_heads:
            raise ValueError(f"MPTConfig: n_heads ({self.n_heads}) must be a multiple of kv_n_heads ({self.kv_n_heads})")
        if self.attn_config["alibi"] and self.attn_config["rope"]:
            raise ValueError("MPTConfig: attn_config.alibi and attn_config.rope are exclusive")
        if self.attn_config["rope"] and self.head_dim % 2:
            raise ValueError(f"MPTConfig: rope needs an even head_dim, got d_model / n_heads = {self.head_dim}")

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self):
        """The FFN's width, int(expansion_ratio * d_model) as llm-foundry (which allows ratios like 2.5)."""
        return int(self.expansion_ratio * self.d_model)

    @property
    def kv_n_heads(self):
        return self.attn_config.get("kv_n_heads") or self.n_heads

    @classmethod
    def from_dict(cls, d: dict) -> "MPTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_at_least_1(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_bool(v):
    return isinstance(v, bool)


# (check, what it expects) per field, for MPTConfig's errors: "MPTConfig: <field> must be <what>"
_FIELD_RULES = {
    **dict.fromkeys(("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size"), (_int_at_least_1, "an int >= 1")),
    **dict.fromkeys(("expansion_ratio", "layer_norm_epsilon"), (lambda v: _number(v) and v >= 0, "a number >= 0")),
    **dict.fromkeys(("resid_pdrop", "emb_pdrop"), (lambda v: _number(v) and 0 <= v < 1, "in [0, 1)")),
    **dict.fromkeys(("learned_pos_emb", "no_bias"), (_is_bool, "true or false")),
    "logit_scale": (lambda v: v is None or v == "inv_sqrt_d_model" or _number(v),
                    "None, a number or 'inv_sqrt_d_model'"),
    # the LayerNorm roundings (llama and gemma are RMSNorm's)
    "norm_cast": (lambda v: v in ("torch", "mpt"), "'torch' or 'mpt'"),
}  # attn_config: _ATTN_RULES, once its defaults are in
_ATTN_RULES = {
    "attn_pdrop": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    **dict.fromkeys(("alibi", "rope", "qk_ln"), (_is_bool, "true or false")),
    **dict.fromkeys(("alibi_bias_max", "rope_theta"), (lambda v: _number(v) and v > 0, "a number > 0")),
    **dict.fromkeys(("clip_qkv", "softmax_scale"), (lambda v: v is None or (_number(v) and v > 0),
                                                    "null or a number > 0")),
    "kv_n_heads": (lambda v: v is None or _int_at_least_1(v), "null or an int >= 1"),
}


def _check_values(values: dict, rules: dict, prefix: str):
    for key, (ok, what) in rules.items():
        if not ok(values[key]):
            raise ValueError(f"MPTConfig: {prefix}{key} must be {what}, got {values[key]!r}")


class MPTBlock(torch.nn.Module):
    def __init__(self, cfg: MPTConfig, device=None, dtype=None):
        super().__init__()
        d, bias = cfg.d_model, not cfg.no_bias
        kw = dict(device=device, dtype=dtype)
        self.cfg = cfg
        self.norm_1 = mnn.LayerNorm(d, eps=cfg.layer_norm_epsilon, bias=bias, cast=cfg.norm_cast, **kw)
        self.attn = torch.nn.Module()
        self.attn.Wqkv = torch.nn.Linear(d, (cfg.n_heads + 2 * cfg.kv_n_heads) * cfg.head_dim, bias=bias, **kw)
        self.attn.out_proj = torch.nn.Linear(d, d, bias=bias, **kw)
        if cfg.attn_config["qk_ln"]:  # llm-foundry's qk_ln: LayerNorm over all of q and all of k
            self.attn.q_ln = mnn.LayerNorm(d, eps=cfg.layer_norm_epsilon, bias=bias, cast=cfg.norm_cast, **kw)
            self.attn.k_ln = mnn.LayerNorm(cfg.kv_n_heads * cfg.head_dim, eps=cfg.layer_norm_epsilon, bias=bias,
                                           cast=cfg.norm_cast, **kw)
        self.norm_2 = mnn.LayerNorm(d, eps=cfg.layer_norm_epsilon, bias=bias, cast=cfg.norm_cast, **kw)
        self.ffn = torch.nn.Module()
        self.ffn.up_proj = torch.nn.Linear(d, cfg.ffn_hidden, bias=bias, **kw)
        self.ffn.down_proj = torch.nn.Linear(cfg.ffn_hidden, d, bias=bias, **kw)

    @staticmethod
    def _linear(layer, x, activation=None):
        if isinstance(layer, mnn.Int8Linear):  # after quantize_: int8 weights
            out = layer(x)
            return reference.activation(out, activation) if activation else out
        return ops.linear(x, layer.weight, layer.bias, activation)

    def attention(self, h, slopes, rope, cache, varlen=None):
        cfg, (b, s, _) = self.cfg, h.shape
        nh, kv, hd = cfg.n_heads, cfg.kv_n_heads, cfg.head_dim
        qkv = self._linear(self.attn.Wqkv, h)
        if cfg.attn_config["clip_qkv"]:
            qkv = qkv.clamp(-cfg.attn_config["clip_qkv"], cfg.attn_config["clip_qkv"])
        q, k, v = qkv.split([nh * hd, kv * hd, kv * hd], dim=-1)
        if cfg.attn_config["qk_ln"]:
            q, k = self.attn.q_ln(q), self.attn.k_ln(k)
        q, k, v = q.reshape(b, s, nh, hd), k.reshape(b, s, kv, hd), v.reshape(b, s, kv, hd)
        if rope is not None:
            cos, sin, offsets = rope
            q, k = ops.apply_rotary(q, cos, sin, seqlen_offsets=offsets), ops.apply_rotary(k, cos, sin, seqlen_offsets=offsets)
        scale = cfg.attn_config["softmax_scale"]
        if varlen is not None:  # packed documents: no token attends across a boundary
            cu, longest = varlen
            out = ops.attention_varlen(q.reshape(b * s, nh, hd), k.reshape(b * s, kv, hd), v.reshape(b * s, kv, hd),
                                       cu, cu, longest, longest, causal=True, alibi_slopes=slopes,
                                       softmax_scale=scale)
        elif cache is None:
            out = ops.attention(q, k, v, causal=True, alibi_slopes=slopes, softmax_scale=scale)
        else:
            k_cache, v_cache, seqlens = cache
            out = ops.attention_with_kvcache(q, k_cache, v_cache, seqlens, k=k.contiguous(), v=v.contiguous(),
                                             causal=True, alibi_slopes=slopes, softmax_scale=scale)
        return self._linear(self.attn.out_proj, out.reshape(b, s, nh * hd))

    def forward(self, pending, resid, slopes, rope=None, cache=None, varlen=None):
        """pending: the last sublayer's output not yet added to the residual stream resid."""
        if pending is None:
            h, resid = self.norm_1(resid), resid
        else:
            h, resid = self.norm_1(pending, resid)
        a = self.attention(h, slopes, rope, cache, varlen)
        if self.training and self.cfg.resid_pdrop:
            a = F.dropout(a, self.cfg.resid_pdrop)
        h, resid = self.norm_2(a, resid)
        f = self._linear(self.ffn.down_proj, self._linear(self.ffn.up_proj, h, "gelu"))
        if self.training and self.cfg.resid_pdrop:
            f = F.dropout(f, self.cfg.resid_pdrop)
        return f, resid


class MPTForCausalLM(torch.nn.Module):
    """MPT on mptkernels ops. ``forward(input_ids, labels=None)`` -> logits (and the mean
    next-token cross-entropy when labels are given); ``generate(...)`` decodes with a static
    KV cache. Parameters and state_dict keys are HF ``MptForCausalLM``'s (``transformer.*``,
    ``lm_head.weight`` tied to ``transformer.wte.weight``)."""

    def __init__(self, cfg: MPTConfig, device=None, dtype=None):
        super().__init__()
        self.config = cfg
        kw = dict(device=device, dtype=dtype)
        self.transformer = torch.nn.Module()
        self.transformer.wte = torch.nn.Embedding(cfg.vocab_size, cfg.d_model, **kw)
        if cfg.learned_pos_emb:
            self.transformer.wpe = torch.nn.Embedding(cfg.max_seq_len, cfg.d_model, **kw)
        self.transformer.blocks = torch.nn.ModuleList(MPTBlock(cfg, **kw) for _ in range(cfg.n_layers))
        self.transformer.norm_f = mnn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, bias=not cfg.no_bias,
                                                cast=cfg.norm_cast, **kw)
        self.lm_head = torch.nn.Linear(cfg.d_model, cfg.vocab_size, bias=False, **kw)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as MPT
        self._tables = {}  # ALiBi slopes / rotary tables per device (not parameters)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02):
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=std)
            elif name.endswith("weight"):
                torch.nn.init.ones_(p)
            else:
                torch.nn.init.zeros_(p)

    # ---- the forward pass (training, prefill and decode share it)
    def _alibi(self, device):
        """The ALiBi slopes on device, made once (a host-to-device copy cannot be captured in a
        CUDA graph, so a decode step must not make them)."""
        if not self.config.attn_config["alibi"]:
            return None
        key = ("alibi", str(device))
        if key not in self._tables:
            cfg = self.config
            self._tables[key] = reference.alibi_slopes(cfg.n_heads, cfg.attn_config["alibi_bias_max"]).to(device)
        return self._tables[key]

    def _rope(self, device, offsets):
        if not self.config.attn_config["rope"]:
            return None
        key = ("rope", str(device))
        if key not in self._tables:
            self._tables[key] = ops.rotary_cos_sin(self.config.max_seq_len, self.config.head_dim,
                                                   base=self.config.attn_config["rope_theta"], device=device)
        cos, sin = self._tables[key]
        return cos, sin, offsets

    def forward(self, input_ids, labels=None, *, doc_ids=None, cache=None, cache_seqlens=None, loss_reduction="mean"):
        """input_ids (batch, seqlen). With ``cache`` (from ``new_cache``) and ``cache_seqlens``
        (batch,) int32, the tokens are appended to the cache at those positions (not advanced
        here) and attend to it. ``doc_ids`` (batch, seqlen) marks packed documents (a new
        document starts where the id changes, and at each row): attention then stays inside
        each document (``ops.attention_varlen``), ALiBi distances included; positions of learned
        or rotary embeddings stay the row's. Returns logits (batch, seqlen, vocab) (and the mean
        next-token cross-entropy with ``labels``, or its sum with ``loss_reduction="sum"``; a
        target in another document is not counted)."""
        cfg = self.config
        b, s = input_ids.shape
        dev = input_ids.device
        x = self.transformer.wte(input_ids)
        offsets = cache_seqlens if cache is not None else 0
        if cfg.learned_pos_emb:
            pos = torch.arange(s, device=dev).unsqueeze(0) + (cache_seqlens.long().unsqueeze(1) if cache is not None else 0)
            x = x + self.transformer.wpe(pos)
        if self.training and cfg.emb_pdrop:
            x = F.dropout(x, cfg.emb_pdrop)
        if self.training and cfg.attn_config["attn_pdrop"] and torch.is_grad_enabled():
            raise ValueError("MPTForCausalLM: attn_config.attn_pdrop > 0 is not supported in training (the fused "
                             "attention has no dropout); set it to 0 (inference ignores it, as dropout does)")
        slopes, rope = self._alibi(dev), self._rope(dev, offsets)
        varlen = None
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("forward: doc_ids (packed documents) is for training, not with a cache")
            if tuple(doc_ids.shape) != (b, s):
                raise ValueError(f"forward: doc_ids must have input_ids' shape {(b, s)}, got {tuple(doc_ids.shape)}")
            varlen = _doc_cu_seqlens(doc_ids)
        pending, resid = None, x
        for i, block in enumerate(self.transformer.blocks):
            layer_cache = None if cache is None else (cache[0][i], cache[1][i], cache_seqlens)
            pending, resid = block(pending, resid, slopes, rope, layer_cache, varlen)
        h, _ = self.transformer.norm_f(pending, resid)
        logits = MPTBlock._linear(self.lm_head, h)  # an Int8Linear after quantize_, else tied to wte
        if cfg.logit_scale is not None:
            logits = logits * (1.0 / math.sqrt(cfg.d_model) if cfg.logit_scale == "inv_sqrt_d_model" else cfg.logit_scale)
        if labels is None:
            return logits
        # shift the labels, not the logits: position t predicts token t + 1, the last predicts
        # nothing (-100); the logits stay one contiguous (tokens, vocab) view, never copied
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        if doc_ids is not None:  # the first token of a document is not predicted from the last one
            targets[:, :-1] = targets[:, :-1].masked_fill(doc_ids[:, 1:] != doc_ids[:, :-1], -100)
        flat = logits.reshape(-1, logits.shape[-1])
        loss = F.cross_entropy(flat if flat.dtype == torch.float32 else flat.float(), targets.reshape(-1),
                               ignore_index=-100, reduction=loss_reduction)
        return logits, loss

    # ---- generation
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
            logits = self(ids, cache=one, cache_seqlens=seqlens[i:i + 1])
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

    # ---- Hugging Face checkpoints
    @classmethod
    def from_hf(cls, src, *, device=None, dtype=None) -> "MPTForCausalLM":
        """From a ``transformers`` MptForCausalLM object or a local directory written by its
        ``save_pretrained`` (config.json + model.safetensors, sharded safetensors, or
        pytorch_model.bin). No network."""
        if isinstance(src, (str, os.PathLike)):
            if not os.path.isfile(os.path.join(src, "config.json")):
                raise FileNotFoundError(f"from_hf: no config.json in {src} (expected a save_pretrained directory)")
            with open(os.path.join(src, "config.json")) as f:
                try:
                    hf = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"from_hf: {os.path.join(src, 'config.json')} is not valid JSON: {e}") from None
            state = _load_state_dict(src)
        else:
            hf = src.config.to_dict()
            state = src.state_dict()
        cfg = _config_from_hf(hf)
        model = cls(cfg, device="meta")
        model.load_state_dict({k: v for k, v in state.items() if k != "lm_head.weight"}, strict=False, assign=True)
        model.lm_head.weight = model.transformer.wte.weight
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"from_hf: the checkpoint lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
        return model.to(device=device, dtype=dtype)

    def save_pretrained(self, path, *, max_shard_bytes: int | None = None):
        """Write config.json and model.safetensors in HF's MPT format (transformers'
        ``MptForCausalLM.from_pretrained`` loads it). With ``max_shard_bytes``, a larger state
        is split into model-0000i-of-0000n.safetensors files plus model.safetensors.index.json,
        as transformers writes them. Earlier model*.safetensors files in ``path`` are removed."""
        cfg = self.config
        if cfg.kv_n_heads != cfg.n_heads or cfg.attn_config["rope"] or cfg.learned_pos_emb or not cfg.no_bias \
                or cfg.expansion_ratio != 4 or not cfg.attn_config["alibi"] or cfg.logit_scale is not None \
                or cfg.attn_config["qk_ln"] or cfg.attn_config["alibi_bias_max"] != 8:
            raise ValueError("save_pretrained: transformers' MPT covers ALiBi with alibi_bias_max 8, no biases, "
                             "expansion_ratio 4, no GQA, no rope, no qk_ln, no learned positions and no logit_scale; "
                             "this config differs")
        if any(isinstance(m, mnn.Int8Linear) for m in self.modules()):
            raise ValueError("save_pretrained: the model holds int8 layers (quantize_); the HF format stores float "
                             "weights: save before quantising, and quantise again after loading")
        if max_shard_bytes is not None and not _int_at_least_1(max_shard_bytes):
            raise ValueError(f"save_pretrained: max_shard_bytes must be None or an int >= 1, got {max_shard_bytes!r}")
        os.makedirs(path, exist_ok=True)
        hf = dict(model_type="mpt", architectures=["MptForCausalLM"], d_model=cfg.d_model, n_heads=cfg.n_heads,
                  n_layers=cfg.n_layers, expansion_ratio=cfg.expansion_ratio, max_seq_len=cfg.max_seq_len,
                  vocab_size=cfg.vocab_size, resid_pdrop=cfg.resid_pdrop, emb_pdrop=cfg.emb_pdrop,
                  layer_norm_epsilon=cfg.layer_norm_epsilon, learned_pos_emb=cfg.learned_pos_emb,
                  logit_scale=cfg.logit_scale, no_bias=cfg.no_bias, norm_type="low_precision_layernorm",
                  attn_config={k: v for k, v in cfg.attn_config.items() if k not in ("kv_n_heads", "rope", "rope_theta")},
                  torch_dtype=str(self.transformer.wte.weight.dtype).replace("torch.", ""), tie_word_embeddings=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        state = {k: v for k, v in self.state_dict().items() if k != "lm_head.weight"}
        for f in os.listdir(path):  # a shard left by an earlier save would be loaded beside these
            if f.startswith("model") and (f.endswith(".safetensors") or f == "model.safetensors.index.json"):
                os.remove(os.path.join(path, f))
        shards, size, total = [{}], 0, 0  # in state order, a new shard where the next tensor would overflow
        for k, v in state.items():
            n = v.numel() * v.element_size()
            total += n
            if max_shard_bytes is not None and shards[-1] and size + n > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += n
        if len(shards) == 1:
            safetensors_io.save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            safetensors_io.save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _doc_cu_seqlens(doc_ids):
    """(cu_seqlens int32, longest document) of the documents in doc_ids (batch, seqlen): a
    document starts at each row and wherever the id changes. One host sync (the longest)."""
    b, s = doc_ids.shape
    flat = doc_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::s] = True
    cu = torch.cat([starts.nonzero().squeeze(1), torch.tensor([b * s], device=flat.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


class _DecodeStep:
    """One decode step over the static cache: logits of the next token for each sequence.

    With ``use_graph`` the first step runs eagerly (it compiles every kernel and measures any
    per-shape choice), the second is captured as a CUDA graph over static input buffers, and
    every later step copies its tokens into the buffer and replays the graph. The cache and
    ``seqlens`` are the same tensors throughout, so the captured kernels read the current
    lengths from memory (the decode kernels compute their key ranges on the device).
    """

    def __init__(self, model, cache, seqlens, use_graph):
        self.model, self.cache, self.seqlens, self.use_graph = model, cache, seqlens, use_graph
        self.calls, self.graph = 0, None

    def _eager(self, ids):
        return self.model(ids, cache=self.cache, cache_seqlens=self.seqlens)[:, -1]

    def __call__(self, nxt):
        ids = nxt.unsqueeze(1)
        if not self.use_graph or self.calls == 0:
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


def _config_from_hf(hf: dict) -> MPTConfig:
    if hf.get("model_type", "mpt") != "mpt":
        raise ValueError(f"from_hf: model_type must be 'mpt', got {hf.get('model_type')!r}")
    attn = dict(hf.get("attn_config") or {})
    # transformers' MptModel always applies ALiBi (max 8) over all heads (no GQA: llm-foundry's
    # default kv_n_heads=1 beside multihead_attention is no MQA), has no learned position
    # embedding and no biases, and its FFN is always 4x wide, whatever the config says
    attn.update(alibi=True, alibi_bias_max=8, rope=False, kv_n_heads=None)
    d = {k: hf[k] for k in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size", "layer_norm_epsilon")
         if k in hf}
    return MPTConfig(**d, expansion_ratio=4, learned_pos_emb=False, logit_scale=None, no_bias=True,
                     attn_config={k: v for k, v in attn.items() if k in _ATTN_DEFAULTS})


def _load_state_dict(path):
    files = sorted(os.listdir(path))
    st = [f for f in files if f.endswith(".safetensors")]
    if st:
        state = {}
        for f in st:
            try:
                state.update(safetensors_io.load_file(os.path.join(path, f)))
            except Exception as e:  # a truncated or corrupt file: say which
                raise ValueError(f"from_hf: cannot read {os.path.join(path, f)}: {e}") from e
        return state
    bins = [f for f in files if f.startswith("pytorch_model") and f.endswith(".bin")]
    if not bins:
        raise FileNotFoundError(f"from_hf: no *.safetensors or pytorch_model*.bin in {path}")
    state = {}
    for f in bins:
        state.update(torch.load(os.path.join(path, f), map_location="cpu", weights_only=True))
    return state


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
