"""`rshard audit`: build each node's observed rows from the plan, run the attack on them, and a control on
unsharded rows (architecture.md §4, docs/audit.md).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict

import numpy as np

from rshard_hpc.audit.attack import DEFAULT_TOL, PARTS, Attack, node_parts, observed_rows
from rshard_hpc.audit.report import NodeResult, _row
from rshard_hpc.audit.torch_llama import TorchLlama
from rshard_hpc.errors import InputError
from rshard_hpc.plan.check import plan_report
from rshard_hpc.plan.schemes import PlanSpec, make_plan
from rshard_hpc.plan.views import plan_views


def load_prompts(path) -> list:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                line = json.loads(line)["text"]
            texts.append(line)
    if not texts:
        raise InputError(f"{path}: no prompts")
    return texts


def rank_context(path, cfg) -> list:
    """Public text a prompt is assumed to follow, for ranking only: the chat template up to the user's
    message (SmolLM2: its default system turn, then "<|im_start|>user\\n"), else the BOS token, else nothing.
    The attacked rows are computed without it, at the prompt's true positions."""
    from rshard_hpc.models.llama import apply_chat_template
    from rshard_hpc.models.tokenizer import TextCodec

    if cfg.chat_template:
        marker = "\x00AUDIT\x00"
        text = apply_chat_template(cfg, [{"role": "user", "content": marker}], add_generation_prompt=False)
        return TextCodec(path, cfg).encode(text.split(marker)[0])
    return [cfg.bos_token_id] if cfg.bos_token_id is not None and cfg.bos_token_id >= 0 else []


def run_audit(model, prompts, spec: PlanSpec, layer: int = 1, top_k: int = 8, budget: int = 4096,
              beam: int = 8, nodes=None, all_nodes: bool = False, max_tokens: int = 32, tol: float = DEFAULT_TOL,
              control: bool = True, assist_layer0: bool = False, rank_with_template: bool = True,
              echo=None) -> dict:
    """The audit over `prompts` (texts or id lists) for one plan; returns a JSON-able report."""
    from rshard_hpc.models import load_model
    from rshard_hpc.models.registry import resolve_model
    from rshard_hpc.models.tokenizer import TextCodec

    spec.check()
    path = resolve_model(model) if isinstance(model, str) else model
    np_model = load_model(path)
    cfg = np_model.cfg
    if cfg.arch != "llama":
        raise InputError(f"rshard audit attacks causal (Llama) models; {cfg.name!r} is an encoder "
                         "(bidirectional attention: see docs/audit.md)")
    tm = TorchLlama.from_file(path)
    codec = None
    seqs = []
    for p in prompts:
        if isinstance(p, str):
            codec = codec or TextCodec(path, cfg)
            ids = codec.encode(p)
        else:
            ids = list(p)
        if len(ids) < 2:
            raise InputError("every audited prompt needs at least 2 tokens")
        seqs.append(np.asarray(ids[:max_tokens], dtype=np.int64))
    prior = tuple(rank_context(path, cfg)) if rank_with_template else ()
    attack = Attack(tm, layer=layer, top_k=top_k, budget=budget, beam=beam, tol=tol, rank_ids=prior)
    # layer-0 candidates are table lookups: the assist always affords the whole vocabulary
    attack0 = Attack(tm, layer=0, top_k=top_k, budget=max(budget, cfg.vocab_size + top_k), beam=beam, tol=tol,
                     rank_ids=prior) \
        if assist_layer0 and layer > 0 else None

    n_max = max(len(s) for s in seqs)
    comp_max, group_max = make_plan(spec, n_max)
    summary = plan_report(spec, n_max)
    names = list(plan_views(comp_max, group_max, spec.alpha, spec.beta))
    if nodes:
        unknown = [x for x in nodes if x not in names]
        if unknown:
            raise InputError(f"unknown node(s) {', '.join(unknown)}; this plan has {', '.join(names)}")
        chosen = list(nodes)
    else:
        chosen = [x for x in names if x.startswith("attn") or all_nodes]
    if control:
        chosen = chosen + ["control"]
    results = {}
    for name in chosen:
        res = NodeResult(node=name)
        if name in summary["nodes"]:
            res.fraction_seen = summary["nodes"][name]["fraction_seen"]
            res.min_gap = summary["nodes"][name]["min_gap"]
        else:
            res.fraction_seen, res.min_gap = 1.0, float("inf")
        t0 = time.perf_counter()
        for ids in seqs:
            n = len(ids)
            comp, group = make_plan(spec, n)
            obs = observed_rows(np_model, ids, layer)
            if name.startswith("comp"):
                k = int(name[4:])
                seen = np.flatnonzero(comp == k)
                parts = {int(p): PARTS for p in seen}  # a CompNode computes q, k, v (and h) of its rows
                given = {int(p): int(ids[p]) for p in seen}
                res.given = True
            else:
                parts = node_parts(name, group, n)
                given = {}
                if attack0 is not None:  # tokens of the view first, from the same node's layer-0 rows
                    obs0 = observed_rows(np_model, ids, 0)
                    st0 = attack0.run(ids, obs0, parts)
                    res.passes += st0["passes"]
                    given = {p: t for p, t, ok in zip(st0["seen"], [st0["hypothesis"][p] for p in st0["seen"]],
                                                      st0["recovered"]) if ok}
            st = attack.run(ids, obs, parts, given)
            res.add(st)
        res.seconds = time.perf_counter() - t0
        results[name] = res
        if echo:
            echo(_row(res))
    return {"model": str(model), "plan": spec.params(), "delta": summary["delta"], "layer": layer,
            "top_k": top_k, "budget": budget, "beam": beam, "tol": tol, "assist_layer0": bool(attack0),
            "prompts": len(seqs), "tokens": int(sum(len(s) for s in seqs)),
            "nodes": {k: asdict(v) for k, v in results.items()}}
