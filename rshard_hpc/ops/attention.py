"""Partial attention and the exact merge of partials (architecture.md §1): the interface, and the NumPy path.

Partial attention gives, per query row and head, o = softmax(q kᵀ·scale + m) v over the given keys
and lse = log Σ exp(q kᵀ·scale + m), both fp32. m is 0 where the key may be seen (same sequence,
and pos_k <= pos_q when causal), −inf elsewhere. A row with no visible key gives (o = 0, lse = −inf).

Two steps, as in flash-attention's interface layer: the positions are prepared once, the plan is then
called with the arrays (every layer of one engine step has the same positions):

    plan = prepare_attention(q_pos, q_seq, k_pos, k_seq, causal=True, scale=d ** -0.5)
    o, lse = plan(q, k, v)

prepare_attention dispatches on the array module of the positions (or `xp=`): NumPy here, CuPy on the
CUDA kernels (attention_cuda.CudaAttentionPlan). Both plans take the same arguments and check on call that
q, k, v have the prepared row counts. partial_attention(q, ..., causal, scale) is prepare-then-call in one.
"""
from __future__ import annotations


import numpy as np

from rshard_hpc.ops.arrays import xp_of
from rshard_hpc.ops.attention_checks import check_qkv, check_rows, check_scale
from rshard_hpc.ops.precision import bf16_bits_to_float

Q_BLOCK = 1024  # queries per block on the NumPy path: bounds the (heads, block, keys) score array


def visible(q_pos, q_seq, k_pos, k_seq, causal: bool):
    """(nq, nk) bool: key may be attended by query."""
    ok = q_seq[:, None] == k_seq[None, :]
    if causal:
        ok &= k_pos[None, :] <= q_pos[:, None]
    return ok


def prepare_attention(q_pos, q_seq, k_pos, k_seq, *, causal: bool, scale: float, xp=None, mma_config=None):
    """A plan for partial attention over these rows: plan(q, k, v) -> (o, lse).

    q_pos, q_seq: (nq,) ints; k_pos, k_seq: (nk,) ints. xp: numpy or cupy (default: the module of q_pos);
    the plan then takes arrays of that module. mma_config: the tensor-core kernel's configuration
    (attention_cuda.MmaConfig), CuPy only.
    """
    xp = xp_of(q_pos) if xp is None else xp
    if xp is not np:
        from rshard_hpc.ops import attention_cuda

        return attention_cuda.prepare_attention(q_pos, q_seq, k_pos, k_seq, causal=causal, scale=scale,
                                               mma_config=mma_config)
    if mma_config is not None:
        raise ValueError("mma_config configures the CUDA kernel; this plan runs on NumPy")
    return AttentionPlan(q_pos, q_seq, k_pos, k_seq, causal=causal, scale=scale)


def partial_attention(q, q_pos, q_seq, k, v, k_pos, k_seq, causal: bool, scale: float):
    """One-shot prepare_attention(...)(q, k, v), on the array module of q (tests, references)."""
    plan = prepare_attention(q_pos, q_seq, k_pos, k_seq, causal=causal, scale=scale, xp=xp_of(q))
    return plan(q, k, v)


class AttentionPlan:
    """NumPy plan: the rows of each sequence, grouped once; calling it computes per query block.

    Each block: up to Q_BLOCK query rows of one sequence against all keys of that sequence.
    """

    def __init__(self, q_pos, q_seq, k_pos, k_seq, *, causal: bool, scale: float):
        self.scale = check_scale(scale)
        self.causal = bool(causal)
        self.q_pos, self.q_seq, self.k_pos, self.k_seq = (_host(a) for a in (q_pos, q_seq, k_pos, k_seq))
        self.nq = check_rows(self.q_pos, self.q_seq, "query")
        self.nk = check_rows(self.k_pos, self.k_seq, "key")
        self.blocks = []  # (query rows (nb,), key rows (nk_s,), every key visible to every query?) per block
        for s in np.unique(self.q_seq) if self.nk else ():
            q_rows = np.flatnonzero(self.q_seq == s)
            k_rows = np.flatnonzero(self.k_seq == s)
            if len(k_rows):
                self.blocks += [self._block_rows(q_rows[a:a + Q_BLOCK], k_rows) for a in range(0, len(q_rows), Q_BLOCK)]

    def _block_rows(self, q_rows, k_rows):
        """A block's rows of one sequence, and whether its mask is all true (no mask to build or apply): always
        without causality, else when its last key comes no later than its first query."""
        all_visible = not self.causal or self.k_pos[k_rows].max() <= self.q_pos[q_rows].min()
        return q_rows, k_rows, bool(all_visible)

    def __call__(self, q, k, v):
        """q: (nq, Hq, D); k, v: (nk, Hkv, D), float or uint16 bf16 bits, NumPy.

        Returns o: (nq, Hq, D) float32 and lse: (nq, Hq) float32.
        """
        if xp_of(q) is not np or xp_of(k) is not np or xp_of(v) is not np:
            raise ValueError("this plan was prepared for NumPy arrays (prepare with CuPy positions or xp=cupy)")
        check_qkv(q, k, v, self.nq, self.nk)
        if q.dtype == np.uint16:  # bf16 bit patterns: their exact float32 values (RowSource: float32 only)
            q, k, v = (bf16_bits_to_float(a) for a in (q, k, v))
        nq, n_heads, head_dim = q.shape
        n_kv = k.shape[1]
        o = np.zeros((nq, n_heads, head_dim), dtype=np.float32)
        lse = np.full((nq, n_heads), -np.inf, dtype=np.float32)
        for rows, k_rows, all_visible in self.blocks:
            k_s = _heads_first(k[k_rows], n_kv)  # (Hkv, 1, nk_s, D)
            v_s = _heads_first(v[k_rows], n_kv)
            mask = None if all_visible else visible(self.q_pos[rows], self.q_seq[rows], self.k_pos[k_rows],
                                                    self.k_seq[k_rows], self.causal)
            o[rows], lse[rows] = _block(q[rows], k_s, v_s, mask, n_kv, self.scale)
        return o, lse


class RowSource:
    """Rows read where they lie, never copied together: row r is base[index[r]] (index (n,), or (n, g) for g base
    rows side by side), seen as (n, *tail). A NumPy plan takes it in place of q, k or v (it only gathers rows), so an
    AttnNode can attend straight from its receive buffer. float32 only (bf16 bits are widened whole first)."""

    def __init__(self, base: np.ndarray, index: np.ndarray, tail):
        self.base, self.index, self.tail = base, index, tuple(tail)
        self.shape = (len(index),) + self.tail
        self.ndim, self.dtype = len(self.shape), base.dtype

    def __getitem__(self, rows):
        return self.base[self.index[rows]].reshape((-1,) + self.tail)


def _host(a) -> np.ndarray:
    """A NumPy array of a NumPy or CuPy array (or a sequence)."""
    return a.get() if xp_of(a) is not np else np.asarray(a)


def _heads_first(x, n_kv):
    """(n, Hkv, D) -> (Hkv, 1, n, D) float32."""
    return np.ascontiguousarray(x.transpose(1, 0, 2)[:, None], dtype=np.float32)


def _block(q_blk, k_s, v_s, mask, n_kv, scale):
    """One query block against one sequence's keys. mask: (nb, nk) bool, or None where every key is visible.
    The score array is worked on in place (it is the block's one large temporary)."""
    nb, n_heads, head_dim = q_blk.shape
    group = n_heads // n_kv
    q_h = q_blk.astype(np.float32).transpose(1, 0, 2).reshape(n_kv, group, nb, head_dim)  # (Hkv, G, nb, D)
    scores = q_h @ k_s.transpose(0, 1, 3, 2)  # (Hkv, G, nb, nk)
    scores *= np.float32(scale)
    if mask is not None:
        np.copyto(scores, -np.inf, where=~mask)
    row_max = scores.max(axis=-1, keepdims=True)  # (Hkv, G, nb, 1)
    any_key = np.isfinite(row_max)
    shift = np.where(any_key, row_max, 0.0).astype(np.float32)
    scores -= shift
    probs = np.exp(scores, out=scores)  # masked entries: exp(-inf) = 0
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
