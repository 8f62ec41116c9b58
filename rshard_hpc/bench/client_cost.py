"""What `--client-layers K` costs the client (docs/privacy.md): measured on a real model, and estimated by FLOPs
and bytes for the benchmark Llama shapes (bench/common.py's SHAPES). One process, no MPI.

    rshard bench client --model SmolLM2-135M-Instruct --k 1,2 --tokens 128 --out bench_client.md

Measured: reading the K layers, a prompt of N tokens through them (the prefill; median of --repeat), one decode
step after it (one new position against the N cached, median of 8), the weights the client holds for them (as
held: float32, or bf16 matrices under --dtype bfloat16) and the K layers' KV cache at N tokens. Estimated:
2 FLOPs a multiply-add over the K layers' matrices and their attention (causal: position p attends p + 1 keys),
beside what the client computes anyway when generating (the LM head, K = 0).
"""
from __future__ import annotations

import time

import numpy as np

from rshard_hpc.bench.common import append_table, bench_config
from rshard_hpc.models.config import ModelConfig

ESTIMATE_SHAPES = ("smollm2", "llama-1b", "llama-8b")  # of bench/common.py's SHAPES


# ------------------------------------------------------------------------------------------ estimates
def layer_flops(cfg: ModelConfig, n_new: int, n_past: int = 0) -> float:
    """FLOPs of one layer for n_new positions after n_past cached ones (causal: position p attends p + 1 keys)."""
    keys = n_new * n_past + n_new * (n_new + 1) / 2  # Σ over the new positions of the keys each attends
    return 2.0 * cfg.layer_matrix_params * n_new + 4.0 * cfg.n_heads * cfg.head_dim * keys


def client_estimate(cfg: ModelConfig, k: int, n_tokens: int, bytes_per_weight: int = 2) -> dict:
    """The client's extra work and memory for K layers at a prompt of n_tokens (weights in bf16 by default)."""
    layer_weights = cfg.layer_matrix_params + 2 * cfg.hidden  # + the two norms
    embed = cfg.vocab_size * cfg.hidden  # the token embeddings (a tied head's matrix: held at K = 0 already)
    return {
        "shape": cfg.name, "k": k, "n_layers": cfg.n_layers, "tokens": n_tokens,
        "prefill_gflop": k * layer_flops(cfg, n_tokens) / 1e9,
        "decode_mflop": k * layer_flops(cfg, 1, n_tokens) / 1e6,
        "head_mflop": 2.0 * cfg.hidden * cfg.vocab_size / 1e6,  # per generated token, already the client's at K = 0
        "share_of_layers": k / cfg.n_layers,
        "layers_mb": k * layer_weights * bytes_per_weight / 1e6,
        "embed_mb": embed * bytes_per_weight / 1e6,
        "kv_cache_mb": k * 2 * n_tokens * cfg.n_kv_heads * cfg.head_dim * bytes_per_weight / 1e6,
    }


def estimate_table(ks, n_tokens: int) -> str:
    """Markdown: the estimate for each benchmark shape and K."""
    title = (f"estimated client cost of --client-layers K at a prompt of {n_tokens} tokens (bf16 weights and KV "
             f"cache; FLOPs = 2 per multiply-add)")
    header = ("| shape | K of L | prefill GFLOP | decode MFLOP/token | LM head MFLOP/token (K = 0 too) | "
              "K layers' weights MB | embeddings MB | KV cache MB |")
    lines = [title, "", header, "|" + "---|" * 8]
    for shape in ESTIMATE_SHAPES:
        cfg = bench_config(shape, n_tokens)
        for k in ks:
            e = client_estimate(cfg, k, n_tokens)
            lines.append(f"| {shape} | {k} of {e['n_layers']} | {e['prefill_gflop']:.2f} | {e['decode_mflop']:.1f} | "
                         f"{e['head_mflop']:.0f} | {e['layers_mb']:.1f} | {e['embed_mb']:.0f} | "
                         f"{e['kv_cache_mb']:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ measured
def measure(model_path, k: int, n_tokens: int, repeat: int = 3, dtype: str = "float32", xp=None,
            seed: int = 0) -> dict:
    """The client's K layers of a real weight file on this machine: seconds and bytes (see the module's doc)."""
    from rshard_hpc.models import weights
    from rshard_hpc.models.client_layers import load_client_layers

    xp = xp or np
    sync = xp.cuda.get_current_stream().synchronize if xp is not np else (lambda: None)
    cfg = weights.read_config(model_path)
    t0 = time.perf_counter()
    layers = load_client_layers(model_path, cfg, k, dtype=dtype, xp=xp)
    load_s = time.perf_counter() - t0
    ids = np.random.default_rng(seed).integers(3, cfg.vocab_size, n_tokens)
    pos, seq = np.arange(n_tokens), np.zeros(n_tokens, np.int64)
    prefill = []
    for _ in range(max(1, repeat)):
        layers.reset()
        t0 = time.perf_counter()
        layers.forward(ids, pos, seq)
        sync()
        prefill.append(time.perf_counter() - t0)
    decode = []
    for step in range(8 if cfg.causal else 0):  # one new position a step against the cache
        t0 = time.perf_counter()
        layers.forward(ids[step:step + 1], [n_tokens + step], [0])
        sync()
        decode.append(time.perf_counter() - t0)
    kv = sum(int(a.nbytes) for entry in layers.cache.values() for a in entry[:2])
    return {"model": cfg.name, "k": k, "n_layers": cfg.n_layers, "tokens": n_tokens, "load_s": load_s,
            "prefill_s": float(np.median(prefill)), "decode_ms": float(np.median(decode)) * 1e3 if decode else None,
            "layers_mb": _placed_mb(layers.model, True), "embed_mb": _placed_mb(layers.model, False),
            "kv_cache_mb": kv / 1e6,
            "gflop_per_s": k * layer_flops(cfg, n_tokens) / 1e9 / float(np.median(prefill))}


def _placed_mb(model, layers: bool) -> float:
    """MB of the tensors a model holds as placed (float32 arrays, or bf16 matrices: their bits, and on NumPy the
    float32 values it multiplies): its layers' (layers=True) or the rest (the embeddings)."""
    total = 0
    for key, t in model.t.items():
        if key.startswith("layers/") == layers:
            parts = [t] if hasattr(t, "nbytes") else [getattr(t, "bits", None), getattr(t, "values", None)]
            total += sum(int(a.nbytes) for a in parts if a is not None)
    return total / 1e6


def measured_table(rows: list, device: str, dtype: str) -> str:
    title = (f"measured client cost of --client-layers K: {rows[0]['model']} ({rows[0]['n_layers']} layers), "
             f"device {device}, {dtype}, prompt of {rows[0]['tokens']} tokens")
    header = ("| K | read K layers s | prefill s (a prompt) | decode ms (a token) | K layers' weights MB | "
              "embeddings MB | KV cache MB | GFLOP/s |")
    lines = [title, "", header, "|" + "---|" * 8]
    for r in rows:
        decode = f"{r['decode_ms']:.2f}" if r["decode_ms"] is not None else "-"
        lines.append(f"| {r['k']} | {r['load_s']:.2f} | {r['prefill_s']:.3f} | {decode} | {r['layers_mb']:.1f} | "
                     f"{r['embed_mb']:.1f} | {r['kv_cache_mb']:.2f} | {r['gflop_per_s']:.1f} |")
    return "\n".join(lines)


def run_client_cost(opts: dict) -> str:
    """Both tables (measured on opts["model"], estimated for the shapes), printed and appended to opts["out"]."""
    from rshard_hpc.models.registry import resolve_model
    from rshard_hpc.ops.arrays import array_module

    xp = array_module(opts["device"])
    path = resolve_model(opts["model"])
    rows = [measure(path, k, opts["tokens"], opts["repeat"], opts["dtype"], xp) for k in opts["ks"]]
    text = measured_table(rows, opts["device"], opts["dtype"]) + "\n\n" + estimate_table(opts["ks"], opts["tokens"])
    append_table(opts.get("out"), text)
    return text
