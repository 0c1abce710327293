"""The MPT model on mptkernels' modules and ops: the blocks and MPTForCausalLM's forward
(training, prefill and decoding over a cache share it).

Architecture (MosaicML MPT / llm-foundry): token embedding (+ learned positions when
``learned_pos_emb``), n pre-norm blocks of [LayerNorm -> fused QKV -> attention (causal,
ALiBi or rotary, GQA with kv_n_heads) -> out proj -> residual; LayerNorm -> up proj + GELU ->
down proj -> residual], a final LayerNorm, and the LM head tied to the embedding. Every
residual add is fused into the next norm (``nn.LayerNorm`` with a residual), the GELU into
the up projection's epilogue (``nn.Linear(activation="gelu")``), rotary is
``nn.RotaryEmbedding``, attention is ``ops.attention`` (training, prefill),
``ops.attention_varlen`` (packed documents) or ``ops.attention_with_kvcache`` (decoding).
The state_dict keys are HF's ``MptForCausalLM`` keys, so ``from_hf`` / ``save_pretrained``
(hf_io.py) are renames-free; ``generate`` and the KV cache are in generation.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ... import nn as mnn
from ... import ops
from .config import MPTConfig
from .generation import GenerationMixin
from .hf_io import HFCheckpointMixin


class MPTBlock(torch.nn.Module):
    def __init__(self, cfg: MPTConfig, device=None, dtype=None):
        super().__init__()
        d, bias = cfg.d_model, not cfg.no_bias
        kw = dict(device=device, dtype=dtype)
        self.cfg = cfg
        self.norm_1 = mnn.LayerNorm(d, eps=cfg.layer_norm_epsilon, bias=bias, cast=cfg.norm_cast, **kw)
        self.attn = torch.nn.Module()
        self.attn.Wqkv = mnn.Linear(d, (cfg.n_heads + 2 * cfg.kv_n_heads) * cfg.head_dim, bias=bias, **kw)
        self.attn.out_proj = mnn.Linear(d, d, bias=bias, **kw)
        if cfg.attn_config["qk_ln"]:  # llm-foundry's qk_ln: LayerNorm over all of q and all of k
            self.attn.q_ln = mnn.LayerNorm(d, eps=cfg.layer_norm_epsilon, bias=bias, cast=cfg.norm_cast, **kw)
            self.attn.k_ln = mnn.LayerNorm(cfg.kv_n_heads * cfg.head_dim, eps=cfg.layer_norm_epsilon, bias=bias,
                                           cast=cfg.norm_cast, **kw)
        self.norm_2 = mnn.LayerNorm(d, eps=cfg.layer_norm_epsilon, bias=bias, cast=cfg.norm_cast, **kw)
        self.ffn = torch.nn.Module()
        # the GELU runs in the up projection's epilogue (and stays fused in a W8A8 Int8Linear after quantize_)
        self.ffn.up_proj = mnn.Linear(d, cfg.ffn_hidden, bias=bias, activation="gelu", **kw)
        self.ffn.down_proj = mnn.Linear(cfg.ffn_hidden, d, bias=bias, **kw)

    def attention(self, h, slopes, rope, cache, varlen=None):
        """rope: (the model's RotaryEmbedding, seqlen offsets) or None."""
        cfg, (b, s, _) = self.cfg, h.shape
        nh, kv, hd = cfg.n_heads, cfg.kv_n_heads, cfg.head_dim
        qkv = self.attn.Wqkv(h)
        if cfg.attn_config["clip_qkv"]:
            qkv = qkv.clamp(-cfg.attn_config["clip_qkv"], cfg.attn_config["clip_qkv"])
        q, k, v = qkv.split([nh * hd, kv * hd, kv * hd], dim=-1)
        if cfg.attn_config["qk_ln"]:
            q, k = self.attn.q_ln(q), self.attn.k_ln(k)
        q, k, v = q.reshape(b, s, nh, hd), k.reshape(b, s, kv, hd), v.reshape(b, s, kv, hd)
        if rope is not None:
            rotary, offsets = rope
            q, k = rotary(q, k, seqlen_offsets=offsets)
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
        return self.attn.out_proj(out.reshape(b, s, nh * hd))

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
        f = self.ffn.down_proj(self.ffn.up_proj(h))
        if self.training and self.cfg.resid_pdrop:
            f = F.dropout(f, self.cfg.resid_pdrop)
        return f, resid


class MPTForCausalLM(GenerationMixin, HFCheckpointMixin, torch.nn.Module):
    """MPT on mptkernels ops. ``forward(input_ids, labels=None)`` -> logits, or (None, the mean
    next-token cross-entropy) when labels are given; ``generate(...)`` decodes with a static
    KV cache (``new_cache``); ``from_hf`` / ``save_pretrained`` read and write HF checkpoints.
    Parameters and state_dict keys are HF ``MptForCausalLM``'s (``transformer.*``,
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
        self.lm_head = mnn.Linear(cfg.d_model, cfg.vocab_size, bias=False, **kw)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as MPT
        if cfg.attn_config["rope"]:
            # float32 tables out of the state_dict (non-persistent buffers); made on a real device
            # even for a meta-device model (nothing loads them), they follow the model's moves
            real = None if device is not None and torch.device(device).type == "meta" else device
            self.transformer.rotary_emb = mnn.RotaryEmbedding(cfg.head_dim, base=cfg.attn_config["rope_theta"],
                                                              max_seqlen=cfg.max_seq_len, device=real)
        self._slopes = {}  # the ALiBi slopes per device (float32 whatever the model's dtype; not a parameter)
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
        key = str(device)
        if key not in self._slopes:
            cfg = self.config
            self._slopes[key] = ops.alibi_slopes(cfg.n_heads, cfg.attn_config["alibi_bias_max"]).to(device)
        return self._slopes[key]

    def forward(self, input_ids, labels=None, *, doc_ids=None, cache=None, cache_seqlens=None, loss_reduction="mean",
                logits_to_keep=0):
        """input_ids (batch, seqlen). With ``cache`` (from ``new_cache``) and ``cache_seqlens``
        (batch,) int32, the tokens are appended to the cache at those positions (not advanced
        here) and attend to it. ``doc_ids`` (batch, seqlen) marks packed documents (a new
        document starts where the id changes, and at each row): attention then stays inside
        each document (``ops.attention_varlen``), ALiBi distances included; positions of learned
        or rotary embeddings stay the row's. Returns logits (batch, seqlen, vocab); with ``labels``,
        (None, the mean next-token cross-entropy, or its sum with ``loss_reduction="sum"``; a
        target in another document is not counted), computed by ops.linear_cross_entropy from the
        last hidden states, so the logits are never materialised (a quantised lm_head: (logits,
        loss) from the logits). ``logits_to_keep`` n > 0 (transformers' name): the logits of the
        last n positions only (a prefill needs the last one: the LM head then runs on one row
        instead of seqlen; generate() does it)."""
        cfg = self.config
        _check_input_ids(input_ids, cfg.vocab_size)
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"forward: logits_to_keep must be an integer >= 0 (0: every position), "
                             f"got {logits_to_keep!r}")
        if logits_to_keep and labels is not None:
            raise ValueError("forward: logits_to_keep is for inference; with labels the loss needs every position")
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
        slopes = self._alibi(dev)
        rope = (self.transformer.rotary_emb, offsets) if cfg.attn_config["rope"] else None
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
        scale = _logit_scale(cfg)
        if labels is not None:
            # shift the labels, not the logits: position t predicts token t + 1, the last predicts
            # nothing (-100)
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
            if doc_ids is not None:  # the first token of a document is not predicted from the last one
                targets[:, :-1] = targets[:, :-1].masked_fill(doc_ids[:, 1:] != doc_ids[:, :-1], -100)
            if mnn.linear.is_plain_linear(self.lm_head):
                # the LM head and its loss fused: the (tokens, vocab) logits never exist and are
                # not returned (as Liger-Kernel); the logit scale goes on h, before the GEMM
                hs = h if scale is None else h * scale
                loss = ops.linear_cross_entropy(hs.reshape(-1, hs.shape[-1]), self.lm_head.weight,
                                                targets.reshape(-1), reduction=loss_reduction)
                return None, loss
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)  # tied to wte (an Int8Linear of its own after quantize_)
        if scale is not None:
            logits = logits * scale
        if labels is None:
            return logits
        flat = logits.reshape(-1, logits.shape[-1])  # a quantised head: the logits, then the loss
        loss = F.cross_entropy(flat if flat.dtype == torch.float32 else flat.float(), targets.reshape(-1),
                               ignore_index=-100, reduction=loss_reduction)
        return logits, loss


def _logit_scale(cfg):
    """The factor on the logits (None: none); the one place it is computed (the CPU decode plan
    uses it too, so its logits stay bitwise the forward's)."""
    if cfg.logit_scale is None:
        return None
    return 1.0 / math.sqrt(cfg.d_model) if cfg.logit_scale == "inv_sqrt_d_model" else cfg.logit_scale


def _check_input_ids(input_ids, vocab_size):
    """input_ids: an int64/int32 (batch, seqlen) tensor of ids in [0, vocab_size), or a one-line
    error naming what is wrong. Without the range check an id out of range fails inside the
    embedding: a bare IndexError on the CPU, a device-side assert on CUDA that leaves the CUDA
    context unusable (every later call in the process fails)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"MPTForCausalLM: input_ids must be a (batch, seqlen) tensor of token ids, got "
                        f"{type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"MPTForCausalLM: input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"MPTForCausalLM: input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
    # The range check reads two numbers back on the host: free on the CPU, one device sync per
    # forward on CUDA (~tens of microseconds, and the host cannot queue this forward's kernels
    # while earlier work is still running). It is skipped where a read-back is impossible: while
    # torch.compile traces (a data-dependent branch would break the graph) and while a CUDA
    # graph is captured (a sync is illegal there); those paths are the plain embedding's. The
    # graphed decode of generate() is covered anyway: it checks the prompt, samples in range,
    # and its eager first step runs this check before the capture.
    if (input_ids.numel() and not input_ids.is_meta and not torch.compiler.is_compiling()
            and not (input_ids.is_cuda and torch.cuda.is_current_stream_capturing())):
        lo, hi = (int(t) for t in torch.aminmax(input_ids))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"MPTForCausalLM: input_ids holds {lo if lo < 0 else hi}, but token ids must be in "
                             f"[0, vocab_size={vocab_size})")


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
