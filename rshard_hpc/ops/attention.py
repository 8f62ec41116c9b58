"""Partial attention and the exact merge of partials (DESIGN §1), NumPy path.

partial_attention returns, per query row and head, o = softmax(q kᵀ·scale + m) v over the given keys
and lse = log Σ exp(q kᵀ·scale + m), both fp32. m is 0 where the key may be seen (same sequence,
and pos_k <= pos_q when causal), −inf elsewhere. A row with no visible key gives (o = 0, lse = −inf).
"""
from __future__ import annotations

import numpy as np

from rshard_hpc.ops.arrays import xp_of
from rshard_hpc.ops.precision import bf16_bits_to_float

Q_BLOCK = 1024  # queries per block on the NumPy path: bounds the (heads, block, keys) score array


def visible(q_pos, q_seq, k_pos, k_seq, causal: bool):
    """(nq, nk) bool: key may be attended by query."""
    ok = q_seq[:, None] == k_seq[None, :]
    if causal:
        ok &= k_pos[None, :] <= q_pos[:, None]
    return ok


def partial_attention(q, q_pos, q_seq, k, v, k_pos, k_seq, causal: bool, scale: float, launches=None):
    """q: (nq, Hq, D); k, v: (nk, Hkv, D), float or uint16 bf16 bits; positions/seqs: (nq,), (nk,) ints.

    Returns o: (nq, Hq, D) float32 and lse: (nq, Hq) float32. `launches` (GPU path): a dict kept while
    the positions stay the same, so the kernels' preparation is made once (attention_gpu).
    """
    xp = xp_of(q)
    if xp is not np:
        from rshard_hpc.ops import attention_cuda

        return attention_cuda.partial_attention(q, q_pos, q_seq, k, v, k_pos, k_seq, causal, scale, launches)
    if q.dtype == np.uint16:  # bf16 bit patterns: their exact float32 values
        q, k, v = (bf16_bits_to_float(a) for a in (q, k, v))
    nq, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    o = np.zeros((nq, n_heads, head_dim), dtype=np.float32)
    lse = np.full((nq, n_heads), -np.inf, dtype=np.float32)
    if nq == 0 or len(k) == 0:
        return o, lse
    for s in np.unique(q_seq):
        q_rows = np.flatnonzero(q_seq == s)
        k_rows = np.flatnonzero(k_seq == s)
        if len(k_rows) == 0:
            continue
        k_s = _heads_first(k[k_rows], n_kv)  # (Hkv, 1, nk, D)
        v_s = _heads_first(v[k_rows], n_kv)
        for start in range(0, len(q_rows), Q_BLOCK):
            rows = q_rows[start:start + Q_BLOCK]
            mask = visible(q_pos[rows], q_seq[rows], k_pos[k_rows], k_seq[k_rows], causal)
            o_blk, lse_blk = _block(q[rows], k_s, v_s, mask, n_kv, scale)
            o[rows] = o_blk
            lse[rows] = lse_blk
    return o, lse


def _heads_first(x, n_kv):
    """(n, Hkv, D) -> (Hkv, 1, n, D) float32."""
    return np.ascontiguousarray(x.transpose(1, 0, 2)[:, None], dtype=np.float32)


def _block(q_blk, k_s, v_s, mask, n_kv, scale):
    """One query block against one sequence's keys. mask: (nb, nk) bool."""
    nb, n_heads, head_dim = q_blk.shape
    group = n_heads // n_kv
    q_h = q_blk.astype(np.float32).transpose(1, 0, 2).reshape(n_kv, group, nb, head_dim)  # (Hkv, G, nb, D)
    scores = (q_h @ k_s.transpose(0, 1, 3, 2)) * np.float32(scale)  # (Hkv, G, nb, nk)
    scores = np.where(mask, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)  # (Hkv, G, nb, 1)
    any_key = np.isfinite(row_max)
    shift = np.where(any_key, row_max, 0.0).astype(np.float32)
    probs = np.exp(scores - shift)  # masked entries: exp(-inf) = 0
    denom = probs.sum(axis=-1, keepdims=True)
    out = (probs @ v_s) / np.where(any_key, denom, 1.0)  # (Hkv, G, nb, D)
    lse = np.where(any_key, shift + np.log(np.where(any_key, denom, 1.0)), -np.inf)[..., 0]
    out = out.reshape(n_heads, nb, head_dim).transpose(1, 0, 2)  # (nb, Hq, D)
    lse = lse.reshape(n_heads, nb).T  # (nb, Hq)
    return out.astype(np.float32), lse.astype(np.float32)


def merge_partials(o_parts, lse_parts):
    """Exact merge over the first axis. o_parts: (P, n, H, D); lse_parts: (P, n, H).

    L = logsumexp_p(lse_p), o = Σ_p exp(lse_p − L) o_p. All-(−inf) rows give (0, −inf).
    Returns o: (n, H, D) float32, lse: (n, H) float32.
    """
    xp = xp_of(o_parts)
    if xp is not np:
        from rshard_hpc.ops import attention_cuda

        return attention_cuda.merge_partials(o_parts, lse_parts)
    lse_parts = lse_parts.astype(xp.float32)
    top = lse_parts.max(axis=0)  # (n, H)
    any_part = xp.isfinite(top)
    shift = xp.where(any_part, top, xp.float32(0))
    weights = xp.exp(lse_parts - shift[None])  # (P, n, H); -inf partials weigh 0
    total = weights.sum(axis=0)  # (n, H)
    safe_total = xp.where(any_part, total, xp.float32(1))
    o = (weights[..., None] * o_parts).sum(axis=0) / safe_total[..., None]
    o = xp.where(any_part[..., None], o, xp.float32(0))
    lse = xp.where(any_part, shift + xp.log(safe_total), xp.float32(-np.inf))
    return o.astype(xp.float32), lse.astype(xp.float32)
