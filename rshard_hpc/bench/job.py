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
    from rshard_hpc.engine.attn_worker import AttnWorker
    from rshard_hpc.engine.workers import CompWorker
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


def bench_prompt(cfg: ModelConfig, n_tokens: int, seed: int) -> np.ndarray:
    """The benchmark's prompt of n_tokens ids (seeded by the length: every length its own prompt)."""
    return np.random.default_rng(seed + n_tokens).integers(3, cfg.vocab_size, n_tokens)


def _client_round(topo, client, prompt, decode_steps, head_fn):
    """One batch of one sequence: prefill, then greedy decode steps. Returns (prefill s, step times, stats,
    the prefill's last logits, the last decode step's logits or None, the tokens the decode steps fed)."""
    n_tokens = len(prompt)
    collectives.bcast(topo.world, True)
    client.begin_batch([n_tokens + max(decode_steps, 1)])
    t0 = time.perf_counter()
    last = client.step([(0, n_tokens)], [prompt], "last")
    prefill_s = time.perf_counter() - t0
    logits = head_fn(last)
    token, steps, fed, step_logits = int(np.argmax(logits[0])), [], [], None
    for step in range(decode_steps):
        t0 = time.perf_counter()
        out = client.step([(n_tokens + step, n_tokens + step + 1)], [[token]], "last")
        steps.append(time.perf_counter() - t0)
        fed.append(token)
        step_logits = head_fn(out)[0]
        token = int(np.argmax(step_logits))
    client.end_batch()
    client.stop()
    stats = collectives.gather_objects(topo.world, rank_stats(topo, {}, client.transport))[1:]
    return prefill_s, steps, stats, logits[0], step_logits, fed


def _client_one(topo, client, cfg, head, head_logits, n_tokens, opts, tensors) -> dict:
    prompt = bench_prompt(cfg, n_tokens, opts["seed"])
    head_fn = lambda rows: head_logits(cfg, head, rows)  # noqa: E731
    # round 1 warms up (kernel compilation, buffers) and times the decode steps
    _, steps, stats_both, _, step_logits, fed = _client_round(topo, client, prompt, opts["decode_steps"], head_fn)
    # then PLAIN_REPEATS rounds time the prefill alone; the median round is reported (its phase split too)
    timed = sorted((_client_round(topo, client, prompt, 0, head_fn) for _ in range(PLAIN_REPEATS)),
                   key=lambda r: r[0])
    prefill_s, _, stats, logits = timed[len(timed) // 2][:4]
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
        if fed:  # the last decode step's logits against the plaintext model on the prompt and the fed tokens
            plain_step = plain_last_logits(plain["model"], np.concatenate([prompt, fed]))
            row["decode_logit_diff"] = float(np.abs(plain_step - step_logits).max())
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


def hf_model(cfg: ModelConfig, tensors: dict, device: str, dtype: str):
    """The same weights as a transformers LlamaForCausalLM (SDPA) on one device ("gpu": cuda where torch sees
    one), in `dtype` (float32 or bfloat16), in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch_device = "cuda" if device == "gpu" and torch.cuda.is_available() else "cpu"
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    hf_cfg = LlamaConfig(hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_hidden_layers=cfg.n_layers,
                         num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                         vocab_size=cfg.vocab_size, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
                         max_position_embeddings=cfg.max_positions, tie_word_embeddings=cfg.tie_embeddings)
    hf_cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf_cfg)
    model.load_state_dict(_hf_state_dict(cfg, tensors), strict=False)
    return model.to(device=torch_device, dtype=torch_dtype).eval()


def plain_last_logits(model, ids: np.ndarray) -> np.ndarray:
    """The transformers model's float32 logits at the last of `ids` (one sequence)."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor(ids[None], device=model.device), logits_to_keep=1)
    return out.logits[0, -1].float().cpu().numpy()


def plain_decode_ms(model, prompt: np.ndarray, steps: int) -> float:
    """transformers `generate` (greedy, KV cache) after `prompt`: milliseconds per new token, the median time
    between successive decode steps (a logits processor notes when each step's logits are ready) over
    PLAIN_REPEATS calls after a warm-up; the prefill (the first token) is not counted."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    cuda = model.device.type == "cuda"

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return scores

    ids = torch.tensor(prompt[None], device=model.device)
    intervals = []
    with torch.no_grad():
        for run in range(PLAIN_REPEATS + 1):  # run 0 warms up
            clock = StepClock()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1,
                           min_new_tokens=steps + 1, do_sample=False, use_cache=True, pad_token_id=0,
                           logits_processor=LogitsProcessorList([clock]))
            intervals += list(np.diff(clock.times)) if run else []
    return 1e3 * float(np.median(intervals))


def _plaintext(cfg: ModelConfig, tensors: dict, prompt: np.ndarray, opts: dict) -> dict:
    """The same weights as a transformers LlamaForCausalLM on one device (GPU if asked), same precision."""
    import torch

    model = hf_model(cfg, tensors, opts["device"], opts["dtype"])
    device = model.device.type
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
    return {"seconds": seconds, "logits": logits[0].float().cpu().numpy(), "model": model}


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
           ("logit_diff", "{:.1e}"), ("logit_rel", "{:.1e}"), ("decode_logit_diff", "{:.1e}"), ("decode_split", "{}")]


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
              "that over the largest plaintext logit, decode_logit_diff that of the last decode step's logits; both tokens/s are the median of 3 prefills after a same-length "
              "warm-up."]
    text = "\n".join(lines)
    print(text, flush=True)
    append_table(opts.get("out"), text)
