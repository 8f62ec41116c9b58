"""Benchmarks. `bench_kernel`: the partial-attention kernel against torch scaled_dot_product_attention.

    rshard bench kernel --out docs/bench_kernel_h200.md

Shapes: one sequence of N tokens (N = 1k … 32k); head dim 64 with 9 query / 3 KV heads (SmolLM2) and
head dim 128 with 32 / 8; causal and bidirectional; bf16 and fp32. torch gets the KV heads expanded
(its fastest path) and picks its backend from cuDNN and flash (bf16) or memory-efficient (fp32); the
backend is named in the table. "block" rows time what one AttnNode of a beta = 2, c_a = 1 plan does:
queries of the even positions against keys of the odd ones (causal), torch with an explicit mask.
FLOPs count visible (query, key) pairs only: 4 · D · Hq per pair, for both.
Two kernel columns: "kernel" is a prepared plan's call (attention_cuda.CudaAttentionPlan: for bf16 the K/V
gather into sorted per-head blocks and the tensor-core kernel; for fp32 the CUDA-core kernel); "call" is the
one-shot attention_cuda.partial_attention (sorting rows, tile summaries, then the same).
`bench_variants` times tensor-core kernel configurations (attention_cuda.MmaConfig) and returns the best per
head dim, which bench_kernel takes as `mma_configs`.
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
SHAPES = {64: (9, 3), 128: (32, 8)}  # head dim -> (query heads, KV heads)


def _time_ms(fn, min_reps=3, max_reps=50, budget_s=0.3):
    """Median milliseconds of fn() timed with CUDA events on the current (null) stream, after a warm-up."""
    import cupy

    fn()
    cupy.cuda.Device().synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    t0 = time.perf_counter()
    fn()
    cupy.cuda.Device().synchronize()
    once = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max_reps, max(min_reps, budget_s / once)))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def _visible_pairs(q_pos, k_pos, causal: bool) -> int:
    if not causal:
        return len(q_pos) * len(k_pos)
    ks = np.sort(np.asarray(k_pos))
    return int(np.searchsorted(ks, np.asarray(q_pos), side="right").sum())


def _sdpa_runner(torch, qt, kt, vt, mask, causal, scale, dtype_name):
    """(callable, backend name) for the fastest torch SDPA backend that accepts the problem."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    names = (["CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"] if dtype_name == "bf16"
             else ["EFFICIENT_ATTENTION", "MATH"])
    if mask is not None:
        names = [n for n in names if n != "FLASH_ATTENTION"]
    for name in names:
        backend = getattr(SDPBackend, name)

        def run(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask,
                                                      is_causal=causal and mask is None, scale=scale)
        try:
            run()
            torch.cuda.synchronize()
        except Exception:  # backend refuses this shape/dtype/mask
            continue
        return run, name.split("_")[0].lower()
    return None


def _problem(n, head_dim, causal, dtype_name, block: bool, rng_seed=0, with_sdpa=True, mma_config=None):
    """(kernel, call, sdpa, flops, err) for one shape; mma_config: the tensor-core kernel's (default if None)."""
    import cupy
    import torch

    from rshard_hpc.ops import attention_cuda

    n_heads, n_kv = SHAPES[head_dim]
    if block:
        q_pos = np.arange(0, n, 2, dtype=np.int32)
        k_pos = np.arange(1, n, 2, dtype=np.int32)
    else:
        q_pos = k_pos = np.arange(n, dtype=np.int32)
    nq, nk = len(q_pos), len(k_pos)
    gen = torch.Generator(device="cuda").manual_seed(rng_seed)
    tdtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    q = torch.randn(nq, n_heads, head_dim, device="cuda", generator=gen).to(tdtype)
    k = torch.randn(nk, n_kv, head_dim, device="cuda", generator=gen).to(tdtype)
    v = torch.randn(nk, n_kv, head_dim, device="cuda", generator=gen).to(tdtype)
    scale = 1.0 / np.sqrt(head_dim)

    def as_cupy(t):
        if t.dtype == torch.bfloat16:
            return cupy.from_dlpack(t.view(torch.int16)).view(cupy.uint16)
        return cupy.from_dlpack(t)

    cq, ck, cv = as_cupy(q), as_cupy(k), as_cupy(v)
    qp, qs = cupy.asarray(q_pos), cupy.zeros(nq, cupy.int32)
    kp, ks = cupy.asarray(k_pos), cupy.zeros(nk, cupy.int32)
    plan = attention_cuda.prepare_attention(qp, qs, kp, ks, causal=causal, scale=scale, mma_config=mma_config)
    kernel = lambda: plan(cq, ck, cv)  # noqa: E731

    def call():
        return attention_cuda.prepare_attention(qp, qs, kp, ks, causal=causal, scale=scale,
                                               mma_config=mma_config)(cq, ck, cv)

    group = n_heads // n_kv
    qt = q.transpose(0, 1).unsqueeze(0)  # (1, H, n, D)
    kt = k.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
    vt = v.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
    qt = qt.contiguous()
    mask = None
    if block:
        mask = torch.from_dlpack(cupy.asarray(k_pos[None, :] <= q_pos[:, None])) if causal else None
    sdpa = _sdpa_runner(torch, qt, kt, vt, mask, causal, scale, dtype_name) if with_sdpa else None
    flops = 4.0 * head_dim * n_heads * _visible_pairs(q_pos, k_pos, causal)

    # a correctness spot check against torch on the first 256 query rows (all heads)
    err = float("nan")
    if sdpa is not None:
        o_ref = sdpa[0]()[0].transpose(0, 1)[1:257].float()  # (rows, H, D); row 0 of a block sees no key
        o_k, _ = kernel()
        o_k = torch.from_dlpack(o_k[1:257])
        err = float((o_k - o_ref).norm() / o_ref.norm())
    return kernel, call, sdpa, flops, err


def bench_kernel(out_path=None, lengths=LENGTHS, head_dims=(64, 128), causal_modes=(True, False),
                 dtypes=("bf16", "fp32"), block_lengths=(4096, 8192, 16384), file=sys.stdout, mma_configs=None):
    """Time the kernel and torch SDPA; print a markdown table and write it (with the GPU's name) to out_path.

    mma_configs: {head_dim: MmaConfig} for the tensor-core kernel (e.g. bench_variants' result); the
    defaults (attention_cuda.MMA_CONFIG) for head dims it does not name."""
    import cupy
    import torch

    gpu = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    gpu = gpu.decode() if isinstance(gpu, bytes) else gpu
    header = ("| dtype | D | heads q/kv | causal | tokens | kernel TFLOP/s | call TFLOP/s | SDPA TFLOP/s "
              "| SDPA backend | kernel/SDPA | rel err vs SDPA |")
    from rshard_hpc.ops import attention_cuda

    mma_configs = {d: attention_cuda.MmaConfig(*(mma_configs or {}).get(d, attention_cuda.default_mma_config(d)))
                   for d in head_dims}
    config = ", ".join(f"D={d}: {tuple(c)}" for d, c in mma_configs.items())
    lines = [f"GPU: {gpu}; torch {torch.__version__}; CuPy {cupy.__version__}; tensor-core kernel "
             f"(slabs per warp, Q in registers, warps, keys per tile, stages, min blocks): {config}", "",
             header, "|" + "---|" * 11]
    print("\n".join(lines), file=file, flush=True)

    def save():
        if out_path:
            with open(out_path, "w") as f:
                f.write("\n".join(lines) + "\n")
    cases = [(d, hd, c, n, False) for d in dtypes for hd in head_dims for c in causal_modes for n in lengths]
    cases += [("bf16", 64, True, n, True) for n in block_lengths]
    for dtype_name, head_dim, causal, n, block in cases:
        try:
            kernel, call, sdpa, flops, err = _problem(n, head_dim, causal, dtype_name, block,
                                                      mma_config=mma_configs[head_dim])
            t_kernel = _time_ms(kernel)
            t_call = _time_ms(call)
            t_sdpa = _time_ms(sdpa[0]) if sdpa else float("nan")
            name = sdpa[1] if sdpa else "none"
        except Exception as exc:  # report and go on: one shape must not sink the table
            row = f"| {dtype_name} | {head_dim} | | {causal} | {n} | error: {type(exc).__name__}: {exc} |"
            print(row, file=file, flush=True)
            lines.append(row)
            save()
            continue
        tf = lambda ms: flops / (ms * 1e-3) / 1e12  # noqa: E731
        heads = "%d/%d" % SHAPES[head_dim]
        label = f"{n} block" if block else f"{n}"
        row = (f"| {dtype_name} | {head_dim} | {heads} | {causal} | {label} | {tf(t_kernel):.1f} | {tf(t_call):.1f} "
               f"| {tf(t_sdpa):.1f} | {name} | {t_sdpa / t_kernel:.2f} | {err:.1e} |")
        print(row, file=file, flush=True)
        lines.append(row)
        save()
        del kernel, call, sdpa
        torch.cuda.empty_cache()
        cupy.get_default_memory_pool().free_all_blocks()
    save()
    return lines


# MmaConfig fields: (slabs per warp, Q in registers, warps, keys per tile, stages, min blocks per SM).
# Timed on the H200 2026-11-30 (docs/bench_kernel_h200.md) and dropped as slower there: D=64 (1, 1, 4, 64, 2, 4),
# (1, 1, 8, 64, 2, 2), (1, 1, 8, 64, 4, 2), (1, 1, 16, 64, 3, 1).
VARIANTS = {
    64: [(1, 1, 4, 64, 2, 1), (1, 1, 4, 64, 3, 1), (1, 1, 8, 64, 3, 2), (2, 1, 4, 64, 3, 1), (1, 1, 4, 128, 2, 2)],
    128: [(2, 0, 4, 64, 2, 1), (1, 0, 8, 64, 3, 1), (1, 1, 8, 64, 2, 1)],
}
VARIANT_CASES = ((16384, False), (16384, True), (8192, True), (8192, False))


def bench_variants(cases=VARIANT_CASES, variants=None, file=sys.stdout):
    """Time each tensor-core kernel configuration (variants: {head_dim: [MmaConfig or tuple]}) on bf16
    problems; returns {head_dim: best MmaConfig} by total time (for bench_kernel's mma_configs)."""
    import cupy

    from rshard_hpc.ops import attention_cuda

    variants = variants or VARIANTS
    best = {}
    for head_dim, configs in variants.items():
        totals = {}
        for cfg in configs:
            cfg = attention_cuda.MmaConfig(*cfg)
            total, cells = 0.0, []
            try:
                for n, causal in cases:
                    kernel, _, _, flops, _ = _problem(n, head_dim, causal, "bf16", False, with_sdpa=False,
                                                      mma_config=cfg)
                    ms = _time_ms(kernel)
                    total += ms
                    cells.append(f"{n}{' causal' if causal else ''}: {flops / ms / 1e9:.1f} TFLOP/s")
                    del kernel
                    cupy.get_default_memory_pool().free_all_blocks()
            except Exception as exc:  # a configuration the device refuses (shared memory, registers)
                print(f"variant D={head_dim} {tuple(cfg)}: error {type(exc).__name__}: {exc}", file=file, flush=True)
                continue
            totals[cfg] = total
            print(f"variant D={head_dim} {tuple(cfg)}: " + "; ".join(cells), file=file, flush=True)
        best[head_dim] = min(totals, key=totals.get)
        print(f"variant D={head_dim}: best {tuple(best[head_dim])} (slabs per warp, Q in registers, warps, "
              "keys per tile, stages, min blocks)", file=file, flush=True)
    return best

