"""Hugging Face MPT checkpoints in and out: ``from_hf`` (a transformers MptForCausalLM or a
save_pretrained directory: safetensors, shards or pytorch_model.bin), ``save_pretrained``
(config.json + safetensors, sharded as transformers writes them), the config conversions."""
from __future__ import annotations

import json
import os

import torch

from ... import nn as mnn
from .. import safetensors_io
from .config import _ATTN_DEFAULTS, MPTConfig, _int_at_least_1


class HFCheckpointMixin:
    """``from_hf`` and ``save_pretrained`` of MPTForCausalLM (a mixin: the state_dict keys are
    HF's, so neither renames anything)."""

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
        elif isinstance(src, torch.nn.Module) and hasattr(src, "config"):
            hf = src.config.to_dict()
            state = src.state_dict()
        else:
            raise TypeError("from_hf: src must be a save_pretrained directory or a transformers MptForCausalLM, "
                            f"got {type(src).__name__}")
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
        hf = _config_to_hf(self.config, self.transformer.wte.weight.dtype)
        if any(isinstance(m, mnn.Int8Linear) for m in self.modules()):
            raise ValueError("save_pretrained: the model holds int8 layers (quantize_); the HF format stores float "
                             "weights: save before quantising, and quantise again after loading")
        if max_shard_bytes is not None and not _int_at_least_1(max_shard_bytes):
            raise ValueError(f"save_pretrained: max_shard_bytes must be None or an int >= 1, got {max_shard_bytes!r}")
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        _save_state_dict({k: v for k, v in self.state_dict().items() if k != "lm_head.weight"}, path, max_shard_bytes)


def _config_to_hf(cfg: MPTConfig, dtype) -> dict:
    """transformers' MptConfig (as a config.json dict) of cfg; a config it cannot express is refused."""
    if cfg.kv_n_heads != cfg.n_heads or cfg.attn_config["rope"] or cfg.learned_pos_emb or not cfg.no_bias \
            or cfg.expansion_ratio != 4 or not cfg.attn_config["alibi"] or cfg.logit_scale is not None \
            or cfg.attn_config["qk_ln"] or cfg.attn_config["alibi_bias_max"] != 8:
        raise ValueError("save_pretrained: transformers' MPT covers ALiBi with alibi_bias_max 8, no biases, "
                         "expansion_ratio 4, no GQA, no rope, no qk_ln, no learned positions and no logit_scale; "
                         "this config differs")
    return dict(model_type="mpt", architectures=["MptForCausalLM"], d_model=cfg.d_model, n_heads=cfg.n_heads,
                n_layers=cfg.n_layers, expansion_ratio=cfg.expansion_ratio, max_seq_len=cfg.max_seq_len,
                vocab_size=cfg.vocab_size, resid_pdrop=cfg.resid_pdrop, emb_pdrop=cfg.emb_pdrop,
                layer_norm_epsilon=cfg.layer_norm_epsilon, learned_pos_emb=cfg.learned_pos_emb,
                logit_scale=cfg.logit_scale, no_bias=cfg.no_bias, norm_type="low_precision_layernorm",
                attn_config=_hf_attn_config(cfg.attn_config),
                torch_dtype=str(dtype).replace("torch.", ""), tie_word_embeddings=True)


def _hf_attn_config(attn_config: dict) -> dict:
    """attn_config as transformers' MptAttentionConfig types it. transformers 5.x validates the
    fields' types and declares attn_pdrop an int (a float 0.0 is refused; 4.57 takes either), so
    an integral dropout is written as an int: the file then loads in both."""
    out = {k: v for k, v in attn_config.items() if k not in ("kv_n_heads", "rope", "rope_theta")}
    if float(out["attn_pdrop"]).is_integer():
        out["attn_pdrop"] = int(out["attn_pdrop"])
    return out


def _save_state_dict(state: dict, path, max_shard_bytes):
    """model.safetensors, or (over max_shard_bytes) numbered shards + model.safetensors.index.json."""
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


def _config_from_hf(hf: dict) -> MPTConfig:
    """The MPTConfig of transformers' MptConfig dict hf (what its MptModel computes)."""
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


def _load_state_dict(path) -> dict:
    """The state of a save_pretrained directory: every *.safetensors file, else pytorch_model*.bin."""
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
