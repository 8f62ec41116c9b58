"""`rshard bench job`: the sharded job against plaintext single-device inference of the same model.

Run under mpiexec (1 + alpha + beta^2 ranks). Every rank builds the same random-weight Llama of a named
shape (seeded), the client times a long-prompt prefill and some decode steps through the engine, then
runs the same weights as a plain transformers model on its own device, and prints a table (and writes it).
"""
from __future__ import annotations

import time

import numpy as np

from rshard_hpc.bench.common import append_table, bench_config
from rshard_hpc.dist import collectives
from rshard_hpc.engine.stats import rank_stats
from rshard_hpc.models.config import ModelConfig
from rshard_hpc.models.random_init import random_tensors

PLAIN_REPEATS = 3  # timed prefills (either side) after a same-length warm-up; the median is reported


def expected_bytes_per_layer(cfg: ModelConfig, n_tokens: int, beta: int, dtype: str = "float32") -> int:
    """What the routing implies: q to beta AttnNodes, k and v to beta AttnNodes, beta (o, lse) partials back,
    in the wire's element type (float32, or bf16 with each lse as two 2-byte halves)."""
    from rshard_hpc.ops.precision import partial_slots, wire_dtype

    wire = wire_dtype(dtype)
    out = cfg.n_heads * cfg.head_dim + 2 * cfg.n_kv_heads * cfg.head_dim
    back = cfg.n_heads * partial_slots(cfg.head_dim, wire)
    return beta * n_tokens * np.dtype(wire).itemsize * (out + back)


def run_bench(topo, opts: dict) -> None:
    from rshard_hpc.dist.devices import connect_workers, rank_backend
    from rshard_hpc.engine.client import Client
    from rshard_hpc.engine.workers import AttnWorker, CompWorker
    from rshard_hpc.models.llama import Llama, head_logits
    from rshard_hpc.plan.schemes import PlanSpec

    cfg = bench_config(opts["shape"], max(opts["tokens"]), opts.get("layers"))
    spec = PlanSpec("strided", topo.alpha, topo.beta, opts["c"], opts["c_a"])
    xp, transport = rank_backend(topo, opts["device"])
    connect_workers(topo, transport, opts.get("transport", "auto"))
    tensors = random_tensors(cfg, seed=opts["seed"]) if topo.role != "attn" else None
    if topo.role == "comp":
        worker = CompWorker(topo, spec, Llama(cfg, tensors, xp, dtype=opts["dtype"]), transport, xp=xp,
                            dtype=opts["dtype"])
    elif topo.role == "attn":
        worker = AttnWorker(topo, spec, cfg, transport, xp=xp, dtype=opts["dtype"])
    if topo.role != "client":
        while True:
            more = collectives.bcast(topo.world, None)
            if not more:
                break
            worker.timer.seconds.clear()
            transport.reset_stats()
            worker.serve()
            collectives.gather_objects(topo.world, rank_stats(topo, worker.timer.seconds, transport))
        return
    head = {k: tensors[k] for k in Llama.head_keys(cfg)}
    client = Client(topo, spec, cfg, transport)
    rows = []
    for n_tokens in opts["tokens"]:
        rows.append(_client_one(topo, client, cfg, head, head_logits, n_tokens, opts, tensors))
    collectives.bcast(topo.world, False)
    _report(rows, cfg, topo, opts)


def _client_round(topo, client, prompt, decode_steps, head_fn):
    """One batch of one sequence: prefill, then greedy decode steps. Returns (prefill s, step times, stats)."""
    n_tokens = len(prompt)
    collectives.bcast(topo.world, True)
    client.begin_batch([n_tokens + max(decode_steps, 1)])
    t0 = time.perf_counter()
    last = client.step([(0, n_tokens)], [prompt], "last")
    prefill_s = time.perf_counter() - t0
    logits = head_fn(last)
    token, steps = int(np.argmax(logits[0])), []
    for step in range(decode_steps):
        t0 = time.perf_counter()
        out = client.step([(n_tokens + step, n_tokens + step + 1)], [[token]], "last")
        steps.append(time.perf_counter() - t0)
        token = int(np.argmax(head_fn(out)[0]))
    client.end_batch()
    client.stop()
    stats = collectives.gather_objects(topo.world, rank_stats(topo, {}, client.transport))[1:]
    return prefill_s, steps, stats, logits[0]


def _client_one(topo, client, cfg, head, head_logits, n_tokens, opts, tensors) -> dict:
    rng = np.random.default_rng(opts["seed"] + n_tokens)
    prompt = rng.integers(3, cfg.vocab_size, n_tokens)
    head_fn = lambda rows: head_logits(cfg, head, rows)  # noqa: E731
    # round 1 warms up (kernel compilation, buffers) and times the decode steps
    _, steps, stats_both, _ = _client_round(topo, client, prompt, opts["decode_steps"], head_fn)
    # then PLAIN_REPEATS rounds time the prefill alone; the median round is reported (its phase split too)
    timed = sorted((_client_round(topo, client, prompt, 0, head_fn) for _ in range(PLAIN_REPEATS)),
                   key=lambda r: r[0])
    prefill_s, _, stats, logits = timed[len(timed) // 2]
    sent = sum(s["bytes_sent"] for s in stats)
    decode_bytes = (sum(s["bytes_sent"] for s in stats_both) - sent) / max(opts["decode_steps"], 1)
    row = {"tokens": n_tokens, "prefill_s": prefill_s, "sharded_tok_s": n_tokens / prefill_s,
           "decode_ms": 1e3 * float(np.median(steps)) if steps else float("nan"),
           "decode_step_bytes": decode_bytes,
           "layer_bytes": sent / cfg.n_layers,
           "expected_layer_bytes": expected_bytes_per_layer(cfg, n_tokens, topo.beta, opts["dtype"])}
    for key in ("prepass_s", "attention_s", "postpass_s", "mpi_s", "staging_s"):
        row[key] = max(s[key] for s in stats)  # the slowest rank bounds the phase
    row["transport"] = ", ".join(sorted({s["transport"] for s in stats}))
    if opts["decode_steps"]:
        row["decode_split"] = _decode_split(stats_both, stats, opts["decode_steps"])
    if opts["plaintext"]:
        plain = _plaintext(cfg, tensors, prompt, opts)
        row["plain_tok_s"] = n_tokens / plain["seconds"]
        row["ratio"] = row["sharded_tok_s"] / row["plain_tok_s"]
        row["logit_diff"] = float(np.abs(plain["logits"] - logits).max())
        row["logit_rel"] = row["logit_diff"] / max(float(np.abs(plain["logits"]).max()), 1e-30)
    return row


DECODE_SPLIT = (("pre", "prepass"), ("attn", "attention"), ("post", "postpass"), ("mpi", "mpi"),
                ("copy", "staging"))


def _decode_split(with_decode: list, prefill_only: list, steps: int) -> str:
    """Where a decode step's time goes, ms per step: the round with decode steps less the prefill-only round,
    per rank, the slowest rank per phase. GPU phases give device/host ms (kernels / the host's launches)."""
    cells = []
    for label, key in DECODE_SPLIT:
        parts = []
        for suffix in ("_s", "_host_s"):
            per_rank = [(a.get(key + suffix, 0.0) - b.get(key + suffix, 0.0)) for a, b in zip(with_decode, prefill_only)
                        if key + suffix in a]
            if per_rank:
                parts.append(f"{1e3 * max(per_rank) / steps:.2f}")
        cells.append(f"{label} {'/'.join(parts)}")
    return ", ".join(cells)


def _plaintext(cfg: ModelConfig, tensors: dict, prompt: np.ndarray, opts: dict) -> dict:
    """The same weights as a transformers LlamaForCausalLM on one device (GPU if asked), same precision."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if opts["device"] == "gpu" and torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if opts["dtype"] == "bfloat16" else torch.float32
    hf_cfg = LlamaConfig(hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_hidden_layers=cfg.n_layers,
                         num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                         vocab_size=cfg.vocab_size, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
                         max_position_embeddings=cfg.max_positions, tie_word_embeddings=cfg.tie_embeddings)
    hf_cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf_cfg)
    model.load_state_dict(_hf_state_dict(cfg, tensors), strict=False)
    model = model.to(device=device, dtype=dtype).eval()
    ids = torch.tensor(prompt[None], device=device)

    def prefill():
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.model(ids)  # hidden states only: the LM head is timed on neither side
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    with torch.no_grad():
        prefill()  # warm-up at the same length (cuDNN builds its plan per shape), as the sharded side's round 1
        runs = [prefill() for _ in range(PLAIN_REPEATS)]
        seconds = float(np.median([t for t, _ in runs]))
        logits = model.lm_head(runs[-1][1].last_hidden_state[:, -1])  # last_hidden_state is already normed
    return {"seconds": seconds, "logits": logits[0].float().cpu().numpy()}


def _hf_state_dict(cfg: ModelConfig, tensors: dict) -> dict:
    import torch

    names = {"attn_norm_w": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
             "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
             "mlp_norm_w": "post_attention_layernorm.weight", "w_gate": "mlp.gate_proj.weight",
             "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight"}
    state = {"model.embed_tokens.weight": tensors["embed/word"], "model.norm.weight": tensors["final_norm/w"]}
    state["lm_head.weight"] = tensors["embed/word"] if cfg.tie_embeddings else tensors["lm_head/w"]
    for i in range(cfg.n_layers):
        for ours, theirs in names.items():
            state[f"model.layers.{i}.{theirs}"] = tensors[f"layers/{i:03d}/{ours}"]
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


COLUMNS = [("tokens", "{:d}"), ("sharded_tok_s", "{:,.0f}"), ("plain_tok_s", "{:,.0f}"), ("ratio", "{:.2f}"),
           ("prefill_s", "{:.3f}"), ("prepass_s", "{:.3f}"), ("attention_s", "{:.3f}"), ("postpass_s", "{:.3f}"),
           ("mpi_s", "{:.3f}"), ("staging_s", "{:.3f}"), ("layer_bytes", "{:,.0f}"),
           ("expected_layer_bytes", "{:,.0f}"), ("decode_ms", "{:.1f}"), ("decode_step_bytes", "{:,.0f}"),
           ("logit_diff", "{:.1e}"), ("logit_rel", "{:.1e}"), ("decode_split", "{}")]


def _report(rows, cfg, topo, opts) -> None:
    header = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    lines = [f"sharded job vs plaintext: {cfg.name} ({cfg.n_layers} layers), alpha={topo.alpha} beta={topo.beta} "
             f"({topo.world.Get_size()} ranks), device {opts['device']}, {opts['dtype']}, "
             f"workers' transport: {rows[0].get('transport', '-') if rows else '-'}, "
             f"decode steps {opts['decode_steps']}", "", header, "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [fmt.format(row[name]) if name in row else "-" for name, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "phase times are the slowest rank's seconds for the prefill; layer_bytes = bytes sent by all "
              "ranks per layer in the prefill; expected_layer_bytes is what the routing implies; decode_ms is the "
              "median time of one decode step (one new token) and decode_step_bytes the bytes it moves (all layers); "
              "decode_split is a decode step's ms per phase on the slowest rank (GPU phases: device/host ms); "
              "with cuda-ipc, mpi_s is the small offsets exchange and staging_s the device-to-device copies; "
              "logit_diff is the max abs difference of the last-position logits against the plaintext model, logit_rel "
              "that over the largest plaintext logit; both tokens/s are the median of 3 prefills after a same-length "
              "warm-up."]
    text = "\n".join(lines)
    print(text, flush=True)
    append_table(opts.get("out"), text)
