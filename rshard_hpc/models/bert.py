"""BERT-family encoder (post-LN, GELU, biases) as per-token passes around attention."""
from __future__ import annotations

import numpy as np

from rshard_hpc.models import weights
from rshard_hpc.models.common import concat_rows, erf_of, fused_arrays, gelu_input, layer_norm, linear, place_tensors
from rshard_hpc.models.config import ModelConfig
from rshard_hpc.ops.precision import matmul_t

EMBED_KEYS = ("embed/word", "embed/position", "embed/token_type", "embed/norm_w", "embed/norm_b")
LAYER_KEYS = ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "attn_norm_w", "attn_norm_b",
              "w_up", "b_up", "w_down", "b_down", "mlp_norm_w", "mlp_norm_b")  # as in the file
# q, k, v as one product, as placed: wq, wk, wv stacked ((H + 2 Hkv) D, d), their biases likewise
CONCAT_KEYS = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv")}
MATRIX_KEYS = ("wqkv", "wo", "w_up", "w_down")  # bf16 under --dtype bfloat16


class Bert:
    """Every function here is per token: rows never mix, so any shard of positions can run it."""

    def __init__(self, cfg: ModelConfig, tensors: dict, xp=np, dtype="float32"):
        self.cfg, self.xp, self.dtype = cfg, xp, dtype
        matrices = [weights.layer_key(i, name) for i in range(cfg.n_layers) for name in MATRIX_KEYS]
        self.t = place_tensors(concat_rows(tensors, cfg.n_layers, CONCAT_KEYS), xp, dtype, matrices)
        if xp is not np and not fused_arrays(xp):  # cupyx's erf imported now (start-up), not in the first
            erf_of(xp)  # forward; fused kernels (CuPy float32) and NumPy float32 (ops/gelu_host.py) need no erf

    @staticmethod
    def tensor_keys(cfg: ModelConfig) -> list:
        keys = list(EMBED_KEYS)
        for i in range(cfg.n_layers):
            keys += [weights.layer_key(i, name) for name in LAYER_KEYS]
        return keys

    def _w(self, layer: int, name: str):
        return self.t[weights.layer_key(layer, name)]

    def embed(self, ids, pos):
        """ids, pos: (n,) ints -> h: (n, d). Token type 0 (single-segment input)."""
        t = self.t
        h = t["embed/word"][ids] + t["embed/position"][pos] + t["embed/token_type"][0]
        return layer_norm(h, t["embed/norm_w"], t["embed/norm_b"], self.cfg.norm_eps)

    def pre(self, layer: int, h, pos):
        """h: (n, d) -> q: (n, H, D), k, v: (n, Hkv, D): views of one product's columns."""
        c, w = self.cfg, lambda name: self._w(layer, name)
        n, H, Hkv = h.shape[0], c.n_heads, c.n_kv_heads
        qkv = linear(h, w("wqkv"), w("bqkv")).reshape(n, H + 2 * Hkv, c.head_dim)  # one product, its bias
        return qkv[:, :H], qkv[:, H:H + Hkv], qkv[:, H + Hkv:]

    def post(self, layer: int, h, attn):
        """h: (n, d), attn: (n, H, D) merged attention -> next h: (n, d)."""
        c, w = self.cfg, lambda name: self._w(layer, name)
        n = h.shape[0]
        # LayerNorm(h + (attn Woᵀ + bo)): the residual and the bias fused into the norm
        h = layer_norm(h, w("attn_norm_w"), w("attn_norm_b"), c.norm_eps,
                       residual=matmul_t(attn.reshape(n, c.n_heads * c.head_dim), w("wo")), residual_bias=w("bo"))
        act = gelu_input(matmul_t(h, w("w_up")), w("b_up"), w("w_down"))  # (n, intermediate)
        return layer_norm(h, w("mlp_norm_w"), w("mlp_norm_b"), c.norm_eps,
                          residual=matmul_t(act, w("w_down")), residual_bias=w("b_down"))

    def final_rows(self, h):
        """What a CompNode returns to the client: the last hidden states (post-LN: already normed)."""
        return h
