"""MPTConfig: the fields of Hugging Face's MptConfig and llm-foundry's attn_config, each checked."""
from __future__ import annotations

import dataclasses

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
