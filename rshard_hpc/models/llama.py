"""Llama-family decoder (pre-RMSNorm, RoPE, grouped-query attention, SwiGLU) as per-token passes.

CompNodes hold `embed/word` and every layer (`Llama.tensor_keys`); the client holds only the head
(`Llama.head_keys`: final RMSNorm weight and LM head, which is `embed/word` when tied) and turns the
un-normed final rows into logits with `head_logits(cfg, head, rows)`.

Numerics follow Hugging Face's LlamaForCausalLM: RMSNorm statistics in fp32 then times the weight;
RoPE angles in fp32 from fp32 inverse frequencies at the absolute positions, "rotate_half" layout
(the first and second halves of each head are the pair).
"""
from __future__ import annotations

import numpy as np

from rshard_hpc.errors import InputError
from rshard_hpc.models import weights
from rshard_hpc.models.common import (
    concat_rows,
    fused,
    linear,
    place_tensors,
    rms_norm,
    rms_norm_input,
    silu_mul_input,
)
from rshard_hpc.models.config import ModelConfig
from rshard_hpc.ops.arrays import xp_of

LAYER_KEYS = ("attn_norm_w", "wq", "wk", "wv", "wo", "mlp_norm_w", "w_gate", "w_up", "w_down")  # as in the file
# the weights a layer multiplies by, as placed: q, k, v one product (wq, wk, wv stacked: ((H + 2 Hkv) D, d)),
# gate and up one product (w_gate, w_up stacked: (2 F, d)); four products a layer instead of seven
CONCAT_KEYS = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}
MATRIX_KEYS = ("wqkv", "wo", "w_gate_up", "w_down")  # bf16 under --dtype bfloat16
ROPE_KEPT = 8  # RoPE tables kept, one a pos array: a step's, or each of its lanes' (engine/micro.py)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """(head_dim/2,) float32 inverse frequencies, as HF computes them (fp32 power of the base).

    `cfg.extra["rope_scaling"]` may hold a Hugging Face rope_scaling dict of type "llama3";
    `cfg.extra["rope_freq_factors"]` (from a GGUF rope_freqs tensor) divides the frequencies.
    """
    dim = cfg.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponents)).astype(np.float32)
    extra = cfg.extra or {}
    scaling = extra.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "llama3":
            inv_freq = _llama3_scaling(inv_freq, scaling)
        elif kind != "default":
            raise InputError(f"rope scaling {kind!r} is not supported (default, llama3)")
    factors = extra.get("rope_freq_factors")
    if factors:
        inv_freq = (inv_freq / np.asarray(factors, dtype=np.float32)).astype(np.float32)
    return inv_freq


def _llama3_scaling(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = np.float32(2 * np.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(inv_freq, pos, xp):
    """pos: (n,) ints -> cos, sin: (n, 1, head_dim) float32 (angles duplicated over both halves)."""
    angles = xp.asarray(pos).astype(xp.float32)[:, None] * xp.asarray(inv_freq)[None, :]
    emb = xp.concatenate([angles, angles], axis=-1)
    return xp.cos(emb)[:, None, :], xp.sin(emb)[:, None, :]


def apply_rope(x, cos, sin):
    """x: (n, heads, D) -> rotated, HF rotate_half convention, computed in fp32, cast back."""
    xp = xp_of(x)
    half = x.shape[-1] // 2
    x32 = x.astype(xp.float32)
    rotated = xp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def rope_tables(inv_freq, pos, xp, fused_kernel: bool):
    """What RoPE needs for a step's positions pos (n,), made once a step: (cos, sin) (rope_cos_sin) for the
    array code, the positions as the fused kernel reads them (passes_cuda.rope_positions) for the kernel."""
    if fused_kernel:
        from rshard_hpc.ops import passes_cuda

        return passes_cuda.rope_positions(pos)
    return rope_cos_sin(inv_freq, pos, xp)


def rope_qk(q, k, tables, inv_freq):
    """q: (n, H, D), k: (n, Hkv, D) -> both rotated; tables from rope_tables (one launch on CuPy)."""
    if fused(q):
        from rshard_hpc.ops import passes_cuda

        return passes_cuda.rope_qk(q, k, tables, inv_freq)
    cos, sin = tables
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def head_logits(cfg: ModelConfig, head: dict, rows):
    """Final rows (n, d) un-normed -> logits (n, vocab) float32: final RMSNorm, then the LM head.

    `head` holds the tensors named by `Llama.head_keys(cfg)` (NumPy or CuPy arrays)."""
    xp = xp_of(rows)
    w_out = head["embed/word"] if cfg.tie_embeddings else head["lm_head/w"]
    normed = rms_norm(rows, xp.asarray(head["final_norm/w"]), cfg.norm_eps)
    return linear(normed, xp.asarray(w_out)).astype(xp.float32)


def load_head(path, cfg: ModelConfig, dtype="float32", xp=None) -> dict:
    """The client's head tensors (final norm + LM head) from a weight file."""
    xp = xp or np
    return {k: xp.asarray(v, dtype=dtype) for k, v in weights.read_tensors(path, Llama.head_keys(cfg)).items()}


def few_rows(h) -> bool:
    """Whether a CompNode's rows h (n, d) take the small-step kernels (ops/small_rows_cuda.py): a decode step's few
    fused rows on a GPU."""
    if not fused(h):
        return False
    from rshard_hpc.ops import small_rows_cuda

    return small_rows_cuda.takes(h)


class Llama:
    """Every function here is per token: rows never mix, so any shard of positions can run it."""

    def __init__(self, cfg: ModelConfig, tensors: dict, xp=np, dtype="float32"):
        self.cfg, self.xp, self.dtype = cfg, xp, dtype
        matrices = [weights.layer_key(i, name) for i in range(cfg.n_layers) for name in MATRIX_KEYS]
        self.t = place_tensors(concat_rows(tensors, cfg.n_layers, CONCAT_KEYS), xp, dtype, matrices)
        self.inv_freq = xp.asarray(rope_inv_freq(cfg))
        self._rope_steps = []  # [(pos, fused?, tables), …]: RoPE's tables for the latest pos arrays (ROPE_KEPT)

    @staticmethod
    def tensor_keys(cfg: ModelConfig) -> list:
        keys = ["embed/word"]
        for i in range(cfg.n_layers):
            keys += [weights.layer_key(i, name) for name in LAYER_KEYS]
        return keys

    @staticmethod
    def head_keys(cfg: ModelConfig) -> list:
        return ["final_norm/w", "embed/word" if cfg.tie_embeddings else "lm_head/w"]

    def _w(self, layer: int, name: str):
        return self.t[weights.layer_key(layer, name)]

    def graph_safe(self, h) -> bool:
        """Whether pre and post on rows h (n, d) launch only kernels a CUDA graph may capture (the few-row kernels:
        no cuBLAS call, no host synchronization; engine/step_graphs.py)."""
        return few_rows(h)

    def embed(self, ids, pos):
        """ids, pos: (n,) ints -> h: (n, d). Positions enter later, through RoPE."""
        return self.t["embed/word"][ids]

    def pre(self, layer: int, h, pos):
        """h: (n, d), pos: (n,) absolute positions -> q: (n, H, D), k, v: (n, Hkv, D) (q, k rotated; v a view of
        the q/k/v product's columns)."""
        c, w = self.cfg, lambda name: self._w(layer, name)
        n, H, Hkv = h.shape[0], c.n_heads, c.n_kv_heads
        if few_rows(h):  # norm, product and RoPE in one launch
            from rshard_hpc.ops import small_rows_cuda

            qkv = small_rows_cuda.norm_rope(h, w("attn_norm_w"), c.norm_eps, w("wqkv"), self.rope_tables(pos, True),
                                            self.inv_freq, H + 2 * Hkv, H + Hkv, c.head_dim)
            qkv = qkv.reshape(n, H + 2 * Hkv, c.head_dim)
            return qkv[:, :H], qkv[:, H:H + Hkv], qkv[:, H + Hkv:]
        _, x = rms_norm_input(h, w("attn_norm_w"), c.norm_eps, w("wqkv"))  # rounded once for the product
        qkv = linear(x, w("wqkv")).reshape(n, H + 2 * Hkv, c.head_dim)  # one product; heads q's, k's, v's
        q, k, v = qkv[:, :H], qkv[:, H:H + Hkv], qkv[:, H + Hkv:]  # views: the kernels read them in place
        q, k = rope_qk(q, k, self.rope_tables(pos, fused(qkv)), self.inv_freq)
        return q, k, v

    def rope_tables(self, pos, fused_kernel: bool):
        """rope_tables for pos, made at the first layer that sees this pos array and kept for the others (a
        step passes one pos array to every layer, a step cut into lanes one a lane; a new array is a new step)."""
        for kept_pos, kept_fused, tables in self._rope_steps:
            if kept_pos is pos and kept_fused == fused_kernel:
                return tables
        tables = rope_tables(self.inv_freq, pos, self.xp, fused_kernel)
        self._rope_steps = [(pos, fused_kernel, tables)] + self._rope_steps[:ROPE_KEPT - 1]
        return tables

    def post(self, layer: int, h, attn):
        """h: (n, d) residual stream, attn: (n, H, D) merged attention -> next h: (n, d)."""
        c, w = self.cfg, lambda name: self._w(layer, name)
        n = h.shape[0]
        if few_rows(h):  # three launches: O + residual, norm + gate/up + SiLU * up, down + residual
            from rshard_hpc.ops import small_rows_cuda as small

            h = small.linear(attn.reshape(n, c.n_heads * c.head_dim), w("wo"), residual=h)
            act = small.norm_silu(h, w("mlp_norm_w"), c.norm_eps, w("w_gate_up"))
            return small.linear(act, w("w_down"), residual=h)
        attn_out = linear(attn.reshape(n, c.n_heads * c.head_dim).astype(h.dtype, copy=False), w("wo"))
        # h + attn_out, then its norm rounded once for the gate/up product
        h, x = rms_norm_input(h, w("mlp_norm_w"), c.norm_eps, w("w_gate_up"), residual=attn_out)
        gate_up = linear(x, w("w_gate_up"))  # (n, 2 F): gate's columns, then up's
        f = gate_up.shape[1] // 2
        act = silu_mul_input(gate_up[:, :f], gate_up[:, f:], w("w_down"))
        return linear(act, w("w_down"), residual=h)  # h is this pass's own array (the norm's residual sum)

    def final_rows(self, h):
        """What a CompNode returns to the client: the residual stream, un-normed (the client applies the head)."""
        return h


def render_chat(template: str, messages: list, add_generation_prompt: bool = True, **context) -> str:
    """Render a Jinja chat template like transformers does (sandboxed, trim_blocks, lstrip_blocks)."""
    import json

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **context)
    except TemplateError as exc:
        raise InputError(f"chat template failed: {exc}") from exc


def apply_chat_template(cfg: ModelConfig, messages: list, add_generation_prompt: bool = True,
                        special_tokens: dict | None = None) -> str:
    """The prompt text for `messages` ([{"role", "content"}, …]) under the model's chat template,
    as transformers' `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` renders it.

    Tokenize the result without adding special tokens (the template writes them itself).
    The template sees bos_token, eos_token, … from `cfg.extra["special_tokens"]` (set by the
    converters), overridden by `special_tokens`."""
    if not cfg.chat_template:
        raise InputError(f"model {cfg.name!r} has no chat template")
    context = dict((cfg.extra or {}).get("special_tokens") or {})
    context.update(special_tokens or {})
    return render_chat(cfg.chat_template, messages, add_generation_prompt, **context)
