"""Where one layer's time goes: the pieces a CompNode and an AttnNode run per layer, timed one at a time in one
process (no MPI), beside torch's whole decoder layer on the same device, shape and precision.

    rshard bench passes --device gpu --shape smollm2 --tokens 8192 --dtype bfloat16 --out bench_passes.md

The layout timed is α = 1, β = 1: one CompNode holds every token, one AttnNode pair sees them all (causal).
host_ms is the time the host spends issuing a piece, device_ms the time the device spends on it (on a GPU from
CUDA events: cupyx.profiler.benchmark; on a CPU both are the wall time). A piece whose host_ms is close to its
device_ms is bound by launches, not by arithmetic: fusing it with its neighbours is what would help.
"""
from __future__ import annotations

import time

import numpy as np

from rshard_hpc.bench.common import append_table, bench_config
from rshard_hpc.models.common import linear, rms_norm, silu
from rshard_hpc.models.llama import Llama, apply_rope, rope_cos_sin
from rshard_hpc.models.random_init import random_tensors
from rshard_hpc.ops.arrays import array_module
from rshard_hpc.ops.attention import merge_partials, prepare_attention
from rshard_hpc.ops.precision import gemm_input, pack_partial, partial_slots, to_bf16_bits, unpack_partial, wire_dtype

COLUMNS = ("piece", "host_ms", "device_ms", "share")


def run_passes(opts: dict) -> list[dict]:
    """Rows {piece, host_ms, device_ms}: the pieces of layer 0, then the whole passes, then torch's layer."""
    xp = array_module(opts["device"])  # a clear error without CuPy or a GPU
    cfg = bench_config(opts["shape"], opts["tokens"], layers=1)
    model = Llama(cfg, random_tensors(cfg, seed=opts["seed"]), xp, dtype=opts["dtype"])
    timer = _Timer(xp, opts["repeat"])
    layer = _LayerPieces(model, opts["tokens"], opts["dtype"], opts["seed"])
    for name, fn in layer.pieces():
        timer(name, fn)
    for name, fn in layer.whole():
        timer(name, fn, part=False)
    if opts.get("torch", True):
        torch_ms = _torch_layer_ms(cfg, opts)
        if torch_ms is not None:
            timer.rows.append({"piece": "torch LlamaDecoderLayer (SDPA)", "host_ms": torch_ms[0],
                               "device_ms": torch_ms[1], "part": False})
    return timer.rows


class _LayerPieces:
    """Inputs for one layer at n tokens and the pieces of model.pre / the AttnNode / model.post as callables.
    The pieces call the functions Llama.pre and Llama.post call, in the same order, on the same shapes."""

    def __init__(self, model: Llama, n: int, dtype: str, seed: int):
        xp, cfg = model.xp, model.cfg
        self.model, self.xp, self.cfg, self.n = model, xp, cfg, n
        self.wire = wire_dtype(dtype)
        rng = np.random.default_rng(seed)
        self.h = xp.asarray(rng.standard_normal((n, cfg.hidden), dtype=np.float32))  # (n, d)
        self.pos = xp.arange(n, dtype=xp.int64)
        self.seq = xp.zeros(n, dtype=xp.int64)
        self.scale = 1.0 / np.sqrt(cfg.head_dim)
        self.plan = prepare_attention(self.pos, self.seq, self.pos, self.seq, causal=cfg.causal, scale=self.scale)

    def w(self, name):
        return self.model._w(0, name)

    def to_wire(self, x):
        return to_bf16_bits(x) if self.wire == np.uint16 else x.astype(self.xp.float32, copy=False)

    def pieces(self):
        """(name, callable) in the order a layer runs them; each callable's inputs are made beforehand."""
        xp, c, n, w = self.xp, self.cfg, self.n, self.w
        normed = rms_norm(self.h, w("attn_norm_w"), c.norm_eps)
        x = gemm_input(normed, w("wq"))
        q, k, v = self.model.pre(0, self.h, self.pos)  # (n, H, D), (n, Hkv, D) x 2
        cos, sin = rope_cos_sin(self.model.inv_freq, self.pos, xp)
        qw, kw, vw = (self.to_wire(a) for a in (q, k, v))
        o, lse = self.plan(qw, kw, vw)
        packed = pack_partial(o, lse, self.wire).reshape(1, n, c.n_heads, partial_slots(c.head_dim, self.wire))
        o_parts, lse_parts = unpack_partial(packed, self.wire)
        merged, _ = merge_partials(o_parts, lse_parts)
        self.merged = merged  # (n, H, D): the attention the post-pass pieces start from
        h2 = self.h + linear(merged.reshape(n, -1), w("wo"))
        xm = gemm_input(rms_norm(h2, w("mlp_norm_w"), c.norm_eps), w("w_gate"))
        gate, up = linear(xm, w("w_gate")), linear(xm, w("w_up"))
        act = silu(gate) * up
        return [
            ("pre: rms_norm", lambda: rms_norm(self.h, w("attn_norm_w"), c.norm_eps)),
            ("pre: round to bf16 (gemm_input)", lambda: gemm_input(normed, w("wq"))),
            ("pre: q, k, v GEMMs", lambda: [linear(x, w(key)) for key in ("wq", "wk", "wv")]),
            ("pre: RoPE angles", lambda: rope_cos_sin(self.model.inv_freq, self.pos, xp)),
            ("pre: RoPE on q and k", lambda: (apply_rope(q, cos, sin), apply_rope(k, cos, sin))),
            ("pre: q, k, v to wire + pack", lambda: xp.concatenate([self.to_wire(a).ravel() for a in (q, k, v)])),
            ("attn: partial attention (prepared)",
             lambda: self.plan(qw, kw, vw)),
            ("attn: pack partial", lambda: pack_partial(o, lse, self.wire)),
            ("post: unpack partials", lambda: unpack_partial(packed, self.wire)),
            ("post: merge partials", lambda: merge_partials(o_parts, lse_parts)),
            ("post: O GEMM + residual", lambda: self.h + linear(merged.reshape(n, -1), w("wo"))),
            ("post: rms_norm + round", lambda: gemm_input(rms_norm(h2, w("mlp_norm_w"), c.norm_eps), w("w_gate"))),
            ("post: gate, up GEMMs", lambda: (linear(xm, w("w_gate")), linear(xm, w("w_up")))),
            ("post: silu(gate) * up", lambda: silu(gate) * up),
            ("post: down GEMM + residual", lambda: h2 + linear(act, w("w_down"))),
        ]

    def whole(self):
        o = self.xp.zeros((self.n, self.cfg.n_heads, self.cfg.head_dim), dtype=self.xp.float32)  # (n, H, D)
        return [("whole: model.pre", lambda: self.model.pre(0, self.h, self.pos)),
                ("whole: model.post", lambda: self.model.post(0, self.h, o))]


class _Timer:
    """Median host and device milliseconds per call after warm-up calls."""

    def __init__(self, xp, repeat: int):
        self.xp, self.repeat, self.rows = xp, repeat, []

    def __call__(self, name: str, fn, part: bool = True) -> None:
        if self.xp is np:
            fn()
            times = []
            for _ in range(self.repeat):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            host = device = float(np.median(times))
        else:
            from cupyx.profiler import benchmark

            result = benchmark(fn, n_repeat=self.repeat, n_warmup=3)
            host, device = float(np.median(result.cpu_times)), float(np.median(result.gpu_times[0]))
        self.rows.append({"piece": name, "host_ms": 1e3 * host, "device_ms": 1e3 * device, "part": part})


def _torch_layer_ms(cfg, opts):
    """(host ms, device ms) of one transformers LlamaDecoderLayer forward at the same shape, or None."""
    try:
        import torch
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    except ImportError:
        return None
    device = "cuda" if opts["device"] == "gpu" else "cpu"
    dtype = torch.bfloat16 if opts["dtype"] == "bfloat16" else torch.float32
    hf = LlamaConfig(hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_hidden_layers=1,
                     num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                     vocab_size=cfg.vocab_size, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
                     max_position_embeddings=opts["tokens"] + 16)
    hf._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(hf, 0).to(device=device, dtype=dtype).eval()
    x = torch.randn(1, opts["tokens"], cfg.hidden, generator=torch.Generator().manual_seed(opts["seed"])).to(
        device=device, dtype=dtype)
    pos = torch.arange(opts["tokens"], device=device)[None]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        rope = LlamaRotaryEmbedding(hf).to(device)(x, pos)
        host, wall = [], []
        for rep in range(opts["repeat"] + 3):  # the first 3 are warm-up (cuDNN plans per shape)
            sync()
            t0 = time.perf_counter()
            layer(x, position_embeddings=rope, position_ids=pos, attention_mask=None)  # causal under SDPA
            t1 = time.perf_counter()
            sync()
            if rep >= 3:
                host.append(t1 - t0)
                wall.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(host)), 1e3 * float(np.median(wall))


def report(rows: list[dict], opts: dict) -> str:
    """The table (markdown) with each piece's share of the pieces' device time; printed and appended to --out."""
    total = sum(r["device_ms"] for r in rows if r["part"]) or 1.0
    lines = [f"one layer's pieces: {opts['shape']}-shaped Llama, {opts['tokens']} tokens, device {opts['device']}, "
             f"{opts['dtype']}, alpha=1 beta=1 (one process, no MPI; median of {opts['repeat']})", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        share = f"{r['device_ms'] / total:.0%}" if r["part"] else "-"
        lines.append(f"| {r['piece']} | {r['host_ms']:.3f} | {r['device_ms']:.3f} | {share} |")
    lines.append(f"| sum of the pieces | {sum(r['host_ms'] for r in rows if r['part']):.3f} | {total:.3f} | 100% |")
    text = "\n".join(lines)
    append_table(opts.get("out"), text)
    return text
