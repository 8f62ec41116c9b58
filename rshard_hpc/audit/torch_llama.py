"""A small PyTorch (CPU) re-implementation of the Llama math, read from the same weight file: candidate rows
for thousands of guesses at once against a shared prefix K/V cache (the attack's forward passes).
"""
from __future__ import annotations

import numpy as np

from rshard_hpc.errors import InputError


class TorchLlama:
    """The Llama of rshard_hpc.models.llama in PyTorch fp32 on CPU, with a prefix cache shared by a batch."""

    def __init__(self, cfg, tensors: dict):
        import torch

        from rshard_hpc.models import weights
        from rshard_hpc.models.llama import LAYER_KEYS, rope_inv_freq

        if cfg.arch != "llama":
            raise InputError(f"rshard audit attacks causal Llama models; {cfg.name!r} is {cfg.arch!r} "
                             "(encoders: see docs/audit.md)")
        self.torch = torch
        self.cfg = cfg
        t = lambda key: torch.from_numpy(np.ascontiguousarray(tensors[key], dtype=np.float32))
        self.embed = t("embed/word")
        self.layers = [{name: t(weights.layer_key(i, name)) for name in LAYER_KEYS} for i in range(cfg.n_layers)]
        self.final_norm = t("final_norm/w")
        self.lm_head = self.embed if cfg.tie_embeddings else t("lm_head/w")
        self.inv_freq = torch.from_numpy(rope_inv_freq(cfg))
        self.scale = 1.0 / float(np.sqrt(cfg.head_dim))
        self._qkv0 = None  # (V, (H + 2 Hkv) D): layer-0 projections before RoPE, context-free

    @classmethod
    def from_file(cls, path):
        from rshard_hpc.models import weights
        from rshard_hpc.models.llama import Llama

        cfg = weights.read_config(path)
        keys = list(Llama.tensor_keys(cfg)) if cfg.arch == "llama" else []
        keys += [k for k in (Llama.head_keys(cfg) if cfg.arch == "llama" else []) if k not in keys]
        if cfg.arch != "llama":
            raise InputError(f"rshard audit attacks causal Llama models; {cfg.name!r} is {cfg.arch!r} "
                             "(encoders: see docs/audit.md)")
        return cls(cfg, weights.read_tensors(path, keys))

    # -- pieces
    def _rms(self, x, w):
        torch = self.torch
        return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + self.cfg.norm_eps) * w

    def _rope(self, x, pos):
        """x: (..., m, heads, D); pos: (m,) long."""
        torch = self.torch
        ang = pos.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat([ang, ang], dim=-1)
        cos, sin = torch.cos(emb)[:, None, :], torch.sin(emb)[:, None, :]
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def _proj(self, layer, h, tokens=None):
        """(…, d) -> q (…, H, D), k, v (…, Hkv, D) before RoPE; layer 0 of known tokens from a table."""
        c = self.cfg
        if layer == 0 and tokens is not None and self._qkv0 is not None:
            qkv = self._qkv0[tokens]
        else:
            w = self.layers[layer]
            x = self._rms(h, w["attn_norm_w"])
            qkv = x @ self._wqkv(layer).T
        hq, hk = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        shape = qkv.shape[:-1]
        q = qkv[..., :hq].reshape(*shape, c.n_heads, c.head_dim)
        k = qkv[..., hq:hq + hk].reshape(*shape, c.n_kv_heads, c.head_dim)
        v = qkv[..., hq + hk:].reshape(*shape, c.n_kv_heads, c.head_dim)
        return q, k, v

    def _wqkv(self, layer):
        w = self.layers[layer]
        if "_wqkv" not in w:
            w["_wqkv"] = self.torch.cat([w["wq"], w["wk"], w["wv"]], dim=0)
        return w["_wqkv"]

    def build_layer0_table(self):
        """Every token's layer-0 q, k, v before RoPE: a layer-0 row needs only its token and position."""
        if self._qkv0 is None:
            with self.torch.no_grad():
                x = self._rms(self.embed, self.layers[0]["attn_norm_w"])
                self._qkv0 = x @ self._wqkv(0).T
        return self._qkv0

    def empty_cache(self):
        torch = self.torch
        c = self.cfg
        z = torch.zeros(0, c.n_kv_heads, c.head_dim)
        return [(z, z) for _ in range(c.n_layers)]

    def extend(self, cache, tokens, start: int, upto=None):
        """Run B candidate continuations against one shared prefix cache.

        cache: per layer (K, V), each (n, Hkv, D), positions 0..n-1 (n == start), shared by the batch.
        tokens: (B, m) long at positions start .. start+m-1.
        upto=None: every layer; returns (logits (B, m, V), new per-layer (K, V) of shape (B, m, Hkv, D)).
        upto=L: layers 0..L-1 in full, then returns the layer-L rows of the last position (q, k, v after RoPE,
        each (B, heads*D), and h (B, d), the residual stream entering layer L) and the new (K, V) of layers < L.
        """
        torch = self.torch
        c = self.cfg
        B, m = tokens.shape
        pos = torch.arange(start, start + m)
        h = self.embed[tokens]  # (B, m, d)
        n_run = c.n_layers if upto is None else upto
        new = []
        causal = torch.ones(m, m, dtype=torch.bool).tril()
        for layer in range(n_run):
            q, k, v = self._proj(layer, h, tokens if layer == 0 else None)
            q, k = self._rope(q, pos), self._rope(k, pos)
            new.append((k, v))
            h = self._block(layer, h, q, k, v, cache[layer], causal)
        if upto is None:
            logits = self._rms(h, self.final_norm) @ self.lm_head.T
            return logits, new
        last = h[:, -1]
        q, k, v = self._proj(upto, last, tokens[:, -1] if upto == 0 else None)
        lp = pos[-1:]
        q, k = self._rope(q[:, None], lp)[:, 0], self._rope(k[:, None], lp)[:, 0]
        return (q.reshape(B, -1), k.reshape(B, -1), v.reshape(B, -1), last), new

    def _block(self, layer, h, q, k, v, kv_cache, causal):
        """One layer after its projections: attention of q (B, m, H, D) over the cached (n, Hkv, D) and new
        k, v (B, m, Hkv, D) under the (m, m) mask `causal`, then O-proj and MLP -> the next h (B, m, d)."""
        torch = self.torch
        c = self.cfg
        B, m = h.shape[:2]
        g = c.n_heads // c.n_kv_heads
        kc, vc = kv_cache  # (n, Hkv, D) shared by the batch, or (B, n, Hkv, D) one per sequence
        shared = kc.dim() == 3
        qh = q.reshape(B, m, c.n_kv_heads, g, c.head_dim)
        s_c = torch.einsum("bmkgd,nkd->bkgmn" if shared else "bmkgd,bnkd->bkgmn", qh, kc) * self.scale
        s_n = torch.einsum("bmkgd,bjkd->bkgmj", qh, k) * self.scale
        s_n = s_n.masked_fill(~causal, float("-inf"))
        p = torch.softmax(torch.cat([s_c, s_n], dim=-1), dim=-1)
        n = kc.shape[-3]
        o = torch.einsum("bkgmn,nkd->bmkgd" if shared else "bkgmn,bnkd->bmkgd", p[..., :n], vc) \
            + torch.einsum("bkgmj,bjkd->bmkgd", p[..., n:], v)
        w = self.layers[layer]
        h = h + o.reshape(B, m, c.n_heads * c.head_dim) @ w["wo"].T
        x = self._rms(h, w["mlp_norm_w"])
        return h + (torch.nn.functional.silu(x @ w["w_gate"].T) * (x @ w["w_up"].T)) @ w["w_down"].T

    # -- whole sequences (the audit's row attacks)
    def sequence_rows(self, ids, layers) -> dict:
        """One sequence at positions 0..n-1, every layer in `layers`: {L: {"h": (n, d) the residual stream
        entering layer L (what a CompNode receives when the client runs layers < L), "q": (n, H*D), "k", "v":
        (n, Hkv*D), q and k after RoPE}}."""
        torch = self.torch
        toks = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]
        n = toks.shape[1]
        pos = torch.arange(n)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        h = self.embed[toks]  # (1, n, d)
        out = {}
        with torch.no_grad():
            for layer in range(max(layers) + 1):
                q, k, v = self._proj(layer, h)
                q, k = self._rope(q, pos), self._rope(k, pos)
                if layer in layers:
                    out[layer] = {"h": h[0], "q": q[0].reshape(n, -1), "k": k[0].reshape(n, -1),
                                  "v": v[0].reshape(n, -1)}
                if layer < max(layers):
                    h = self._block(layer, h, q, k, v, self.empty_cache()[layer], causal)
        return out

    def derotate(self, rows, pos):
        """q or k rows (n, heads*D) rotated at positions pos (n,) -> the rows before RoPE (a node knows the
        positions: the plan is public)."""
        n = rows.shape[0]
        x = rows.reshape(n, -1, self.cfg.head_dim)
        return self._rope(x, -self.torch.as_tensor(pos)).reshape(n, -1)

    def token_projections(self, layer: int) -> dict:
        """Every vocabulary token's layer-`layer` q, k, v before RoPE as if its embedding were the residual
        stream (exact at layer 0, a context-free approximation above): {"q": (V, H*D), "k", "v"}."""
        c = self.cfg
        with self.torch.no_grad():
            qkv = self._rms(self.embed, self.layers[layer]["attn_norm_w"]) @ self._wqkv(layer).T
        hq, hk = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        return {"q": qkv[:, :hq], "k": qkv[:, hq:hq + hk], "v": qkv[:, hq + hk:]}

    def greedy(self, prompts, new_tokens: int, prior=()):
        """The model's own greedy continuations of equal-length prompts (B, m) after the shared public context
        `prior`, decoded together: (B, new_tokens) long (the caller cuts at an end-of-sequence token)."""
        torch = self.torch
        prompts = torch.as_tensor(np.asarray(prompts, dtype=np.int64))
        B = prompts.shape[0]
        with torch.no_grad():
            cache = self.empty_cache()
            if len(prior):
                _, new = self.extend(cache, torch.as_tensor([list(prior)]), 0)
                cache = cat_cache(cache, new)
            cache = [(k.expand(B, *k.shape), v.expand(B, *v.shape)) for k, v in cache]  # one per sequence
            toks, start, out = prompts, len(prior), []
            for _ in range(new_tokens):
                logits, new = self.extend(cache, toks, start)
                cache = [(torch.cat([kc, k], 1), torch.cat([vc, v], 1)) for (kc, vc), (k, v) in zip(cache, new)]
                start += toks.shape[1]
                toks = torch.argmax(logits[:, -1], dim=1)[:, None]  # (B, 1)
                out.append(toks)
        return torch.cat(out, dim=1) if out else torch.zeros(B, 0, dtype=torch.long)


def cat_cache(cache, new, b: int = 0, upto=None):
    """The shared prefix cache extended by candidate b's new rows (layers < upto, or all)."""
    import torch

    n_layers = len(new) if upto is None else min(upto, len(new))
    out = []
    for layer in range(len(cache)):
        if layer < n_layers:
            k, v = new[layer]
            out.append((torch.cat([cache[layer][0], k[b]]), torch.cat([cache[layer][1], v[b]])))
        else:
            out.append(cache[layer])
    return out
