"""Where one layer's time goes: the pieces a CompNode and an AttnNode run per layer, timed one at a time in one
process (no MPI), beside torch's whole decoder layer on the same device, shape and precision.

    rshard bench passes --device gpu --shape smollm2 --tokens 8192 --dtype bfloat16 --out bench_passes.md

The layout timed is α = 1, β = 1: one CompNode holds every token, one AttnNode pair sees them all (causal).
host_ms is the time the host spends issuing a piece, device_ms the time the device spends on it (on a GPU from
CUDA events: cupyx.profiler.benchmark; on a CPU both are the wall time). A piece whose host_ms is close to its
device_ms is bound by launches, not by arithmetic: fusing it with its neighbours is what would help.
On a GPU the pieces run the fused kernels of kernels/passes.cu (what the engine runs); the rows named
"chain: ..." time the same steps as the chains of CuPy operations those kernels replaced, for comparison. At a
decode step's few tokens (ops/small_rows_cuda.MAX_ROWS) the whole passes take kernels/small_rows.cu; the rows
"…, cuBLAS products" time them as before it.
"""
from __future__ import annotations

import time

import numpy as np

from rshard_hpc.bench.common import append_table, bench_config
from rshard_hpc.models.common import chained, fused, linear, rms_norm, rms_norm_input, silu, silu_mul_input
from rshard_hpc.models.llama import Llama, apply_rope, few_rows, rope_cos_sin, rope_qk, rope_tables
from rshard_hpc.models.random_init import random_tensors
from rshard_hpc.ops.arrays import array_module
from rshard_hpc.ops import small_rows_cuda
from rshard_hpc.ops.attention import merge_partials, prepare_attention
from rshard_hpc.ops.precision import gemm_input, pack_partial, partial_slots, to_bf16_bits, unpack_partial, wire_dtype
from rshard_hpc.ops.wire import WireRoutes

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
    if xp is not np and opts.get("chain", True):
        for name, fn in layer.chain():
            timer(name, _chained(fn), part=False)
    if opts.get("torch", True):
        torch_ms = _torch_layer_ms(cfg, opts)
        if torch_ms is not None:
            timer.rows.append({"piece": "torch LlamaDecoderLayer (SDPA)", "host_ms": torch_ms[0],
                               "device_ms": torch_ms[1], "part": False})
    return timer.rows


class _LayerPieces:
    """Inputs for one layer at n tokens and the pieces of model.pre / the AttnNode / model.post as callables.
    The pieces call the functions Llama.pre, the CompWorker's wire (ops/wire.py) and Llama.post call, in the
    same order, on the same shapes: on a GPU the fused kernels of kernels/passes.cu (models/common.py's switch).
    `chain()` are the same steps as the chains of CuPy operations they replaced (GPU only: on a CPU they are
    the same code)."""

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
        # alpha = beta = 1: every row in group 0
        self.routes = WireRoutes([np.arange(n)], n, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, self.wire, xp)
        self._inputs()

    def w(self, name):
        return self.model._w(0, name)

    def to_wire(self, x):
        return to_bf16_bits(x) if self.wire == np.uint16 else x.astype(self.xp.float32, copy=False)

    def _inputs(self):
        """Each piece's inputs, made once by running the layer through the same functions."""
        xp, c, n, w = self.xp, self.cfg, self.n, self.w
        H, Hkv = c.n_heads, c.n_kv_heads
        _, self.x = rms_norm_input(self.h, w("attn_norm_w"), c.norm_eps, w("wqkv"))
        qkv = linear(self.x, w("wqkv")).reshape(n, H + 2 * Hkv, c.head_dim)
        self.q0, self.k0, self.v = qkv[:, :H], qkv[:, H:H + Hkv], qkv[:, H + Hkv:]  # views, as Llama.pre's
        self.tables = rope_tables(self.model.inv_freq, self.pos, xp, fused(self.q0))
        self.q, self.k = rope_qk(self.q0, self.k0, self.tables, self.model.inv_freq)
        self.qkv_wire = [self.to_wire(a) for a in (self.q, self.k, self.v)]
        self.o, self.lse = self.plan(*self.qkv_wire)
        self.recv = pack_partial(self.o, self.lse, self.wire).ravel()
        self.merged = self.routes.merge(self.recv)  # (n, H, D): the attention the post-pass pieces start from
        self.attn_out = linear(self.merged.reshape(n, -1), w("wo"))
        self.h2, self.xm = rms_norm_input(self.h, w("mlp_norm_w"), c.norm_eps, w("w_gate_up"), residual=self.attn_out)
        gate_up = linear(self.xm, w("w_gate_up"))
        f = gate_up.shape[1] // 2
        self.gate, self.up = gate_up[:, :f], gate_up[:, f:]  # views, as Llama.post's
        self.act = silu_mul_input(self.gate, self.up, w("w_down"))

    def pieces(self):
        """(name, callable) in the order a layer runs them."""
        c, n, w, model = self.cfg, self.n, self.w, self.model
        return [
            ("pre: rms_norm + round", lambda: rms_norm_input(self.h, w("attn_norm_w"), c.norm_eps, w("wqkv"))),
            ("pre: q/k/v GEMM", lambda: linear(self.x, w("wqkv"))),
            ("pre: RoPE on q and k", lambda: rope_qk(self.q0, self.k0, self.tables, model.inv_freq)),
            ("pre: q, k, v to wire + pack", lambda: self.routes.pack(self.q, self.k, self.v)),
            ("attn: partial attention (prepared)", lambda: self.plan(*self.qkv_wire)),
            ("attn: pack partial", lambda: pack_partial(self.o, self.lse, self.wire)),
            ("post: unpack + merge partials", lambda: self.routes.merge(self.recv)),
            ("post: O GEMM", lambda: linear(self.merged.reshape(n, -1), w("wo"))),
            ("post: residual + rms_norm + round",
             lambda: rms_norm_input(self.h, w("mlp_norm_w"), c.norm_eps, w("w_gate_up"), residual=self.attn_out)),
            ("post: gate/up GEMM", lambda: linear(self.xm, w("w_gate_up"))),
            ("post: silu(gate) * up", lambda: silu_mul_input(self.gate, self.up, w("w_down"))),
            ("post: down GEMM + residual", lambda: self.h2 + linear(self.act, w("w_down"))),
        ]

    def whole(self):
        o = self.xp.zeros((self.n, self.cfg.n_heads, self.cfg.head_dim), dtype=self.xp.float32)  # (n, H, D)
        rows = [("step: RoPE tables (once a step)",
                 lambda: rope_tables(self.model.inv_freq, self.pos, self.xp, fused(self.q0))),
                ("whole: model.pre", lambda: self.model.pre(0, self.h, self.pos)),
                ("whole: model.post", lambda: self.model.post(0, self.h, o))]
        if few_rows(self.h):  # the wholes above ran kernels/small_rows.cu
            rows += [(f"{name}, cuBLAS products (before small_rows.cu)", _small_rows_off(fn))
                     for name, fn in rows[1:]]
        return rows

    def chain(self):
        """The replaced CuPy chains of the fused pieces, and the whole passes on them (run under chained())."""
        xp, c, n, w = self.xp, self.cfg, self.n, self.w
        slots = partial_slots(c.head_dim, self.wire)

        def rope():
            cos, sin = rope_cos_sin(self.model.inv_freq, self.pos, xp)
            return apply_rope(self.q0, cos, sin), apply_rope(self.k0, cos, sin)

        def merge():
            o_parts, lse_parts = unpack_partial(self.recv.reshape(1, n, c.n_heads, slots), self.wire)
            return merge_partials(o_parts, lse_parts)

        o = xp.zeros((n, c.n_heads, c.head_dim), dtype=xp.float32)  # (n, H, D)
        return [
            ("chain: rms_norm + round", lambda: gemm_input(rms_norm(self.h, w("attn_norm_w"), c.norm_eps), w("wqkv"))),
            ("chain: RoPE angles + RoPE on q and k", rope),
            ("chain: q, k, v to wire + pack", lambda: xp.concatenate([self.to_wire(a).ravel() for a in
                                                                      (self.q, self.k, self.v)])),
            ("chain: unpack + merge partials", merge),
            ("chain: residual + rms_norm + round",
             lambda: gemm_input(rms_norm(self.h + self.attn_out, w("mlp_norm_w"), c.norm_eps), w("w_gate_up"))),
            ("chain: silu(gate) * up", lambda: gemm_input(silu(self.gate) * self.up, w("w_down"))),
            ("chain: whole model.pre", lambda: self.model.pre(0, self.h, self.pos)),
            ("chain: whole model.post", lambda: self.model.post(0, self.h, o)),
        ]


def _small_rows_off(fn):
    """fn run with the small-step kernels of kernels/small_rows.cu off (cuBLAS products, passes.cu's kernels)."""
    def run():
        with small_rows_cuda.off():
            return fn()
    return run


def _chained(fn):
    """fn run on the CuPy chains (models.common.chained) instead of the fused kernels."""
    def run():
        with chained():
            return fn()
    return run


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
