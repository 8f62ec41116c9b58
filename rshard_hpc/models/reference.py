"""The plain single-process forward, built from the same per-token passes and partial attention."""
from __future__ import annotations

import numpy as np

from rshard_hpc.ops.attention import partial_attention
from rshard_hpc.ops.precision import to_bf16_bits


def reference_forward(model, sequences):
    """sequences: list of (n_b,) token-id arrays -> list of final hidden rows (n_b, d).

    A bfloat16 model's q, k, v are rounded to bf16 as the engine's wire rounds them, so the sharded job
    and this forward compute the same function in either precision."""
    xp = model.xp
    cfg = model.cfg
    lens = [len(s) for s in sequences]
    ids = xp.asarray(np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]))
    pos_host = np.concatenate([np.arange(n) for n in lens]).astype(np.int32)
    seq_host = np.repeat(np.arange(len(lens)), lens).astype(np.int32)
    pos, seq = xp.asarray(pos_host), xp.asarray(seq_host)
    h = model.embed(ids, pos)
    scale = 1.0 / np.sqrt(cfg.head_dim)
    for layer in range(cfg.n_layers):
        q, k, v = model.pre(layer, h, pos)
        if getattr(model, "dtype", None) == "bfloat16":
            q, k, v = (to_bf16_bits(a) for a in (q, k, v))
        o, _ = partial_attention(q, pos, seq, k, v, pos, seq, cfg.causal, scale)
        h = model.post(layer, h, o)
    rows = model.final_rows(h)
    bounds = np.cumsum([0] + lens)
    return [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
