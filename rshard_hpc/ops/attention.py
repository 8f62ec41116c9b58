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

from dataclasses import dataclass

import numpy as np

from rshard_hpc.ops.arrays import xp_of
from rshard_hpc.ops.attention_checks import check_qkv, check_rows, check_scale
from rshard_hpc.ops.precision import bf16_bits_to_float

Q_BLOCK = 1024  # queries per block on the NumPy path: bounds the (heads, block, keys) score array
# A pack's query x key elements over its blocks (x heads x 4 bytes: its score array, which should stay in the
# CPU's cache: 12 heads, 96 KiB). One call per block was as fast for 128-token prompts (43 x 43 a block at 13
# ranks), and 2.6x slower for 300 one-line prompts (5 x 5) than packs of this size; larger packs were slower.
PACK_SCORES = 2048
PACK_CALL_COST = 512  # what a call costs beside its work, in score elements: padding up to this joins a pack
# Keys per block from which a pack's keys are copied as the columns of q kᵀ's right side (_keys_transposed):
# NumPy's batched matmul then runs at BLAS speed (43 keys: 36 -> 17 us for 12 heads), but below ~16 keys the
# transposed copy and the small products cost more than the transposed view saves (2 keys: 240 -> 625 us).
KEYS_LAST_MIN = 32


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
    """NumPy plan: the rows of each sequence, grouped once; calling it computes pack by pack.

    A block is up to Q_BLOCK query rows of one sequence against all keys of that sequence; blocks of similar sizes
    are packed into one batched call (_pack_blocks), padded to the pack's largest, the padded keys masked out and
    the padded queries' rows dropped: a batch of many short prompts is a few large operations, not one small call
    per prompt and layer.
    """

    def __init__(self, q_pos, q_seq, k_pos, k_seq, *, causal: bool, scale: float):
        self.scale = check_scale(scale)
        self.causal = bool(causal)
        self.q_pos, self.q_seq, self.k_pos, self.k_seq = (_host(a) for a in (q_pos, q_seq, k_pos, k_seq))
        self.nq = check_rows(self.q_pos, self.q_seq, "query")
        self.nk = check_rows(self.k_pos, self.k_seq, "key")
        self.q_order, self.k_order = (np.argsort(a, kind="stable") for a in (self.q_seq, self.k_seq))
        blocks = _sequence_blocks(self.q_seq[self.q_order], self.k_seq[self.k_order]) if self.nk else _NO_BLOCKS
        self.packs = [self._pack(*(column[group] for column in blocks)) for group in _pack_blocks(*blocks[1::2])]

    def _pack(self, q_start, q_len, k_start, k_len) -> "Pack":
        """The padded row indices of these blocks (a block's last row stands in for its padding), the query rows
        the pack's results go to, and the mask (None when every query of every block sees every key it is given).
        Starts and lengths (S,) are in the rows ordered by sequence (q_order, k_order)."""
        n_q, n_k = int(q_len.max()), int(k_len.max())
        q_at, k_at = np.arange(n_q)[None, :], np.arange(n_k)[None, :]
        q_idx = self.q_order[q_start[:, None] + np.minimum(q_at, q_len[:, None] - 1)]  # (S, Qm)
        k_idx = self.k_order[k_start[:, None] + np.minimum(k_at, k_len[:, None] - 1)]  # (S, Km)
        query_real = (q_at < q_len[:, None]).ravel()
        mask = np.broadcast_to((k_at < k_len[:, None])[:, None, :], (len(q_len), n_q, n_k))
        if self.causal:
            mask = mask & (self.k_pos[k_idx][:, None, :] <= self.q_pos[q_idx][:, :, None])
        all_visible = bool(mask.all())
        return Pack(q_idx.ravel(), k_idx.ravel(), len(q_len), np.flatnonzero(query_real),
                    q_idx.ravel()[query_real], None if all_visible else mask[:, None, None])

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
        for pack in self.packs:
            q_p = _heads_first(q[pack.q_idx], n_kv, pack.blocks)  # (S, Hkv, G, Qm, D)
            k_t = _keys_transposed(k[pack.k_idx], n_kv, pack.blocks)  # (S, Hkv, 1, D, Km)
            v_p = _heads_first(v[pack.k_idx], n_kv, pack.blocks)  # (S, Hkv, 1, Km, D)
            o_p, lse_p = _block(q_p, k_t, v_p, pack.mask, self.scale)
            o[pack.rows] = o_p[pack.real]
            lse[pack.rows] = lse_p[pack.real]
        return o, lse


@dataclass(frozen=True)
class Pack:
    """S blocks attended in one batched call: q_idx (S * Qm,) and k_idx (S * Km,) their padded rows; real: the
    positions in S * Qm of the real queries, rows: their query rows; mask (S, 1, 1, Qm, Km) bool or None."""

    q_idx: np.ndarray
    k_idx: np.ndarray
    blocks: int
    real: np.ndarray
    rows: np.ndarray
    mask: np.ndarray | None


_NO_BLOCKS = tuple(np.zeros(0, np.int64) for _ in range(4))


def _sequence_blocks(q_seq_sorted, k_seq_sorted) -> tuple:
    """The blocks of rows sorted by sequence: up to Q_BLOCK queries of one sequence against all its keys, for every
    sequence with both. (q_start, q_len, k_start, k_len), four (blocks,) int64 arrays, starts in the sorted rows."""
    q_ids, q_first, q_count = np.unique(q_seq_sorted, return_index=True, return_counts=True)
    k_ids, k_first, k_count = np.unique(k_seq_sorted, return_index=True, return_counts=True)
    both, in_q, in_k = np.intersect1d(q_ids, k_ids, assume_unique=True, return_indices=True)
    pieces = -(-q_count[in_q] // Q_BLOCK)  # blocks of each sequence
    seq_of = np.repeat(np.arange(len(both)), pieces)
    piece = np.arange(len(seq_of)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    q_start = q_first[in_q][seq_of] + piece * Q_BLOCK
    q_len = np.minimum(q_count[in_q][seq_of] - piece * Q_BLOCK, Q_BLOCK)
    return (q_start.astype(np.int64), q_len.astype(np.int64), k_first[in_k][seq_of].astype(np.int64),
            k_count[in_k][seq_of].astype(np.int64))


def _pack_blocks(q_len, k_len) -> list:
    """Blocks (their query and key counts, (blocks,)) in packs, as index arrays: sorted by key count then query
    count, each pack grown while what padding adds stays under a call's own cost (PACK_CALL_COST, in score
    elements) and its scores under PACK_SCORES."""
    order = np.lexsort((q_len, k_len))[::-1]  # by key count, then query count, largest first
    packs, pack, n_q, n_k = [], [], 0, 0
    for block, nq, nk in zip(order.tolist(), q_len[order].tolist(), k_len[order].tolist()):
        grown_q, grown_k = max(n_q, nq), max(n_k, nk)
        padded = (len(pack) + 1) * grown_q * grown_k
        if pack and (padded > PACK_SCORES or padded - len(pack) * n_q * n_k > nq * nk + PACK_CALL_COST):
            packs.append(np.array(pack))
            pack, grown_q, grown_k = [], nq, nk
        pack.append(block)
        n_q, n_k = grown_q, grown_k
    return packs + ([np.array(pack)] if pack else [])


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


def _heads_first(x, n_kv: int, blocks: int):
    """Rows (blocks * n, H, D) of `blocks` equal blocks -> (blocks, Hkv, H / Hkv, n, D) float32, a view of the rows:
    NumPy's matmul reads each (n, D) matrix with its row stride of H * D at BLAS speed, as it would a contiguous
    copy (and to the same bits), so none is made."""
    rows, n_heads, head_dim = x.shape
    x = np.asarray(x, dtype=np.float32).reshape(blocks, rows // blocks, n_kv, n_heads // n_kv, head_dim)
    return x.transpose(0, 2, 3, 1, 4)


def _keys_transposed(x, n_kv: int, blocks: int):
    """Key rows (blocks * n, Hkv, D) -> (blocks, Hkv, 1, D, n): from KEYS_LAST_MIN keys a block a contiguous copy,
    the keys as the columns of q kᵀ's right side (the transposed view, unit stride across rows, is not BLAS's
    layout: NumPy's own loop took 2.2x as long at 43 x 32 x 43); below it that view."""
    k_t = _heads_first(x, n_kv, blocks).transpose(0, 1, 2, 4, 3)
    return np.ascontiguousarray(k_t) if k_t.shape[-1] >= KEYS_LAST_MIN else k_t


def _row_max(scores):
    """The maximum of each row of a contiguous (..., n) array, as (..., 1): one reduceat over the flat array, which
    NumPy runs 2x as fast as a reduction along a short last axis (a row of 43: 27 -> 13 us for 516 rows). A maximum
    is exact, in any order."""
    width = scores.shape[-1]
    flat = scores.reshape(-1)
    return np.maximum.reduceat(flat, np.arange(0, flat.size, width)).reshape(scores.shape[:-1] + (1,))


def _block(q_p, k_t, v_p, mask, scale):
    """A pack's blocks: q_p (S, Hkv, G, Qm, D) against k_t (S, Hkv, 1, D, Km) and v_p (S, Hkv, 1, Km, D). mask:
    (S, 1, 1, Qm, Km) bool, or None where every key is visible (a pack's blocks all have keys: _sequence_blocks).
    The score array is worked on in place (it is the pack's one large temporary). Returns o (S * Qm, Hq, D) and
    lse (S * Qm, Hq), float32."""
    blocks, n_kv, group, n_q, head_dim = q_p.shape
    scores = q_p @ k_t  # (S, Hkv, G, Qm, Km)
    scores *= np.float32(scale)
    if mask is None:  # every row sees a key: the same values as below, in fewer (small, per-block) operations
        shift = _row_max(scores)  # (S, Hkv, G, Qm, 1)
        scores -= shift
        probs = np.exp(scores, out=scores)
        denom = probs.sum(axis=-1, keepdims=True)
        out = probs @ v_p
        out /= denom  # (S, Hkv, G, Qm, D)
        lse = np.log(denom, out=denom)
        lse += shift
        lse = lse[..., 0]  # (S, Hkv, G, Qm)
    else:
        np.copyto(scores, -np.inf, where=~mask)
        row_max = _row_max(scores)  # (S, Hkv, G, Qm, 1)
        any_key = np.isfinite(row_max)
        shift = np.where(any_key, row_max, 0.0).astype(np.float32)
        scores -= shift
        probs = np.exp(scores, out=scores)  # masked entries: exp(-inf) = 0
        denom = probs.sum(axis=-1, keepdims=True)
        out = (probs @ v_p) / np.where(any_key, denom, 1.0)  # (S, Hkv, G, Qm, D)
        lse = np.where(any_key, shift + np.log(np.where(any_key, denom, 1.0)), -np.inf)[..., 0]  # (S, Hkv, G, Qm)
    out = out.transpose(0, 3, 1, 2, 4).reshape(blocks * n_q, n_kv * group, head_dim)  # (S * Qm, Hq, D)
    lse = lse.transpose(0, 3, 1, 2).reshape(blocks * n_q, n_kv * group)
    return out.astype(np.float32, copy=False), lse.astype(np.float32, copy=False)


def merge_partials(o_parts, lse_parts):
    """Exact merge over the first axis. o_parts: (P, n, H, D); lse_parts: (P, n, H).

    L = logsumexp_p(lse_p), o = Σ_p exp(lse_p − L) o_p. All-(−inf) rows give (0, −inf).
    Returns o: (n, H, D) float32, lse: (n, H) float32.
    """
    if xp_of(o_parts) is not np:
        from rshard_hpc.ops import attention_cuda

        return attention_cuda.merge_partials(o_parts, lse_parts)
    lse_parts = np.asarray(lse_parts, dtype=np.float32)
    top = lse_parts.max(axis=0)  # (n, H)
    any_part = np.isfinite(top)
    shift = np.where(any_part, top, np.float32(0))
    weights = np.exp(lse_parts - shift[None])  # (P, n, H); -inf partials weigh 0
    total = weights.sum(axis=0)  # (n, H)
    safe_total = np.where(any_part, total, np.float32(1))
    o = _weighted_sum(o_parts, weights)  # (n, H, D)
    o /= safe_total[..., None]
    if not any_part.all():
        o[~any_part] = 0
    lse = np.where(any_part, shift + np.log(safe_total), np.float32(-np.inf))
    return o.astype(np.float32, copy=False), lse.astype(np.float32, copy=False)


def _weighted_sum(o_parts, weights):
    """Σ_p weights[p] o_parts[p] in o_parts' type (float32 on the wire), added in p's order as a sum over the first
    axis adds them: (n, H, D), one product a part in a reused buffer, not a (P, n, H, D) temporary."""
    o = o_parts[0] * weights[0, ..., None]
    term = np.empty_like(o)
    for part in range(1, len(o_parts)):
        o += np.multiply(o_parts[part], weights[part, ..., None], out=term)
    return o
