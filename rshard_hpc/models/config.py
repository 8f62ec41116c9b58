"""The model configuration stored as JSON in a weight file's /config."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "bert" (post-LN encoder) | "llama" (pre-RMSNorm decoder)
    name: str  # human-readable model name
    hidden: int  # d_model
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (== n_heads without GQA)
    head_dim: int
    intermediate: int  # MLP width
    vocab_size: int
    max_positions: int  # size of the position table (bert) or trained context (llama)
    norm: str  # "layernorm" | "rmsnorm"
    norm_eps: float
    act: str  # "gelu" (erf) | "silu" (SwiGLU)
    causal: bool
    rope_theta: float = 0.0  # 0: no RoPE
    type_vocab_size: int = 0  # bert token types
    tie_embeddings: bool = False  # llama: lm_head == embed/word
    pooling: str = "none"  # embedding pooling: "mean" | "cls" | "none"
    normalize: bool = False  # L2-normalize the pooled embedding
    max_seq_length: int = 0  # the model's prompt limit (sentence-transformers' max_seq_length)
    bos_token_id: int = -1
    eos_token_ids: tuple = ()
    chat_template: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if "eos_token_ids" in values:
            values["eos_token_ids"] = tuple(values["eos_token_ids"])
        return cls(**values)

    @property
    def prompt_limit(self) -> int:
        return self.max_seq_length or self.max_positions

    @property
    def layer_matrix_params(self) -> int:
        """Weights of one layer's matrices: q, k, v, o projections and the MLP (SwiGLU: 3, else 2 matrices)."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        mlp = (3 if self.act == "silu" else 2) * self.hidden * self.intermediate
        return self.hidden * (2 * q + 2 * kv) + mlp
