"""`rshard audit --client-layers K,…`: every attack of the audit against every node of a plan, for each K (the
layers run on the client: servers see rows from layer K on), on real text, with controls on unsharded rows
(docs/privacy.md, "What a node reads from its rows").

Per node and K, a node's rows are those of the first layer it receives (layer K: the most readable; deeper rows
mix in more context): a CompNode's hidden rows entering layer K (its token ids when K = 0), an AttnNode's q rows
of its query group and k, v rows of its key group. Attacks (rows.py, attack.py):

  match    today's vocab-matching attack on the node's true view (attack.py), exact matches only (not run at
           K = 0, where a row is context-free and nn is that same exact match, a table lookup);
  nn       nearest neighbour against every token's context-free row at layer K;
  linear   a ridge-regression inverter, and
  mlp      a one-hidden-layer inverter, both trained on rows of the model's own greedy continuations of the
           seed prompts (data/seeds.txt), evaluated on the held-apart prompts (data/eval.txt);
  scores   what an AttnNode's q·kᵀ scores reveal: same-token pairs and adjacency (no tokens by themselves).

Seen positions are read by the attack; unseen ones are guessed by the model's argmax given the attacker's
hypothesis (`fill`, for the best row attack of each node). Everything runs in PyTorch on the CPU.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rshard_hpc.audit import rows as R
from rshard_hpc.audit.sweep_report import ATTACKS, ROW_ATTACKS, format_k, node_kind
from rshard_hpc.errors import InputError

DATA = Path(__file__).parent / "data"
CONTROLS = ("control_h", "control_qkv")
DEFAULT_CLIENT_LAYERS = (0, 1, 2, 4)
DEFAULT_MATCH_NODES = ("comp0", "attn0_0", "attn0_1", "control")


def read_texts(path) -> list:
    """Non-empty lines of a text file, '#' comments skipped."""
    out = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    out = [x for x in out if x and not x.startswith("#")]
    if not out:
        raise InputError(f"{path}: no texts")
    return out


@dataclass
class Tally:
    """Recovered tokens of one node under one attack, summed over the prompts."""
    seen: int = 0
    seen_recovered: int = 0
    unseen: int = 0
    unseen_recovered: int = 0
    tokens: int = 0
    worst_prompt: float = 0.0  # the largest fraction of one prompt's tokens recovered
    filled: bool = False  # unseen positions guessed (else not attempted: unseen_recovered counts 0)

    def add(self, seen_ok: np.ndarray, unseen_ok: np.ndarray, n: int) -> None:
        self.seen += len(seen_ok)
        self.seen_recovered += int(np.sum(seen_ok))
        self.unseen += len(unseen_ok)
        self.unseen_recovered += int(np.sum(unseen_ok))
        self.tokens += n
        self.worst_prompt = max(self.worst_prompt, (np.sum(seen_ok) + np.sum(unseen_ok)) / n)

    @property
    def prompt(self) -> float:
        return (self.seen_recovered + self.unseen_recovered) / self.tokens if self.tokens else 0.0


@dataclass
class Setup:
    tm: object
    np_model: object
    prior: tuple
    eos: set
    train: list = field(default_factory=list)  # token id arrays
    evals: list = field(default_factory=list)


def _setup(model, prompts, seeds, new_tokens: int, max_tokens: int, echo) -> Setup:
    from rshard_hpc.audit.run import rank_context
    from rshard_hpc.audit.torch_llama import TorchLlama
    from rshard_hpc.models import load_model
    from rshard_hpc.models.registry import resolve_model
    from rshard_hpc.models.tokenizer import TextCodec

    path = resolve_model(model) if isinstance(model, str) else model
    np_model = load_model(path)
    cfg = np_model.cfg
    tm = TorchLlama.from_file(path)
    prior = tuple(rank_context(path, cfg))
    eos = {int(t) for t in cfg.eos_token_ids}
    codec = None

    def ids_of(x):
        nonlocal codec
        if isinstance(x, str):
            codec = codec or TextCodec(path, cfg)
            return list(codec.encode(x))
        return [int(t) for t in x]

    st = Setup(tm=tm, np_model=np_model, prior=prior, eos=eos)
    st.evals = [np.asarray(ids_of(p)[:max_tokens], dtype=np.int64) for p in prompts]
    if any(len(s) < 2 for s in st.evals):
        raise InputError("every audited prompt needs at least 2 tokens")
    t0 = time.perf_counter()
    seed_ids = [ids_of(s) for s in seeds]
    m = min(map(len, seed_ids))  # decoded together: every seed cut to the shortest one's length
    more = st.tm.greedy([x[:m] for x in seed_ids], new_tokens, prior).numpy() if new_tokens else \
        np.zeros((len(seed_ids), 0), dtype=np.int64)
    for x, cont in zip(seed_ids, more):
        stop = [i for i, t in enumerate(cont) if int(t) in eos]
        st.train.append(np.asarray(x[:m] + cont[:stop[0] if stop else len(cont)].tolist(), dtype=np.int64))
    if echo:
        echo(f"training text: {len(st.train)} seeds ({m} tokens each) continued greedily, "
             f"{sum(map(len, st.train))} tokens ({time.perf_counter() - t0:.1f} s)")
    return st


def _training_rows(st: Setup, rows_train: list, K: int, kind: str):
    """(rows, tokens) of every position of the training text at layer K for one row kind."""
    import torch

    x = [R._flat(R.features(st.tm, r[K], kind, np.arange(len(ids)))) for r, ids in zip(rows_train, st.train)]
    return torch.cat(x), torch.as_tensor(np.concatenate(st.train))


def _fit(st: Setup, rows_train: list, K: int) -> dict:
    """Per row kind: {"linear": …, "mlp": …} inverters; and the same-token detector ("scores")."""
    import torch

    out = {}
    for kind in R.KIND_PARTS:
        x, y = _training_rows(st, rows_train, K, kind)
        out[kind] = {name: cls(kind, st.tm.embed).fit(x, y) for name, cls in R.INVERTERS.items()}
    feats, same, hits = [], [], 0
    for r, ids in zip(rows_train, st.train):
        pos = np.arange(len(ids))
        s = R.head_scores(st.tm, r[K], pos, pos)
        f, pairs = R.pair_features(s, pos, pos)
        feats.append(f)
        same.append(torch.as_tensor(ids)[pairs[:, 0]] == torch.as_tensor(ids)[pairs[:, 1]])
        hits = hits + R.previous_token_hits(s, pos, pos)[0]
    out["scores"] = R.SameTokenDetector().fit(torch.cat(feats), torch.cat(same), hits)
    return out


def _decode_all(st: Setup, rows: dict, K: int, fitted: dict, refs: dict) -> dict:
    """{kind: {attack: (n,) token read from the row of that kind at every position}} for one sequence: a row
    is the same whichever node receives it, so each is decoded once."""
    n = rows["h"].shape[0]
    out = {}
    for kind in R.KIND_PARTS:
        feats = R.features(st.tm, rows, kind, np.arange(n))
        x = R._flat(feats)
        out[kind] = {"nn": R.nearest(feats, R.references(st.tm, K, kind, refs)).numpy()}
        out[kind].update({name: fitted[kind][name].decode(x).numpy() for name in ("linear", "mlp")})
    return out


def _node_decode(decoded: dict, view: dict, ids) -> dict:
    """{attack: (n,) the node's reading at its seen positions, -1 elsewhere}; a CompNode of K = 0 reads its ids."""
    out = {a: np.full(len(ids), -1, dtype=np.int64) for a in ROW_ATTACKS}
    for kind, pos in view.items():
        for a in ROW_ATTACKS:
            out[a][pos] = ids[pos] if kind == "ids" else decoded[kind][a][pos]
    return out


def _scores_stats(st: Setup, rows: dict, ids, name: str, comp, group, det) -> dict | None:
    """Same-token pairs and adjacency an AttnNode reads from its scores for one sequence (None: not an AttnNode)."""
    import torch

    if not name.startswith("attn"):
        return None
    i, j = (int(x) for x in name[4:].split("_"))
    qpos, kpos = np.flatnonzero(group == i), np.flatnonzero(group == j)
    s = R.head_scores(st.tm, rows, qpos, kpos)
    f, pairs = R.pair_features(s, qpos, kpos)
    same = (torch.as_tensor(ids)[pairs[:, 0]] == torch.as_tensor(ids)[pairs[:, 1]]) if len(pairs) else \
        torch.zeros(0, dtype=torch.bool)
    flagged = det.predict(f) if len(pairs) else torch.zeros(0, dtype=torch.bool)
    hits, queries = R.previous_token_hits(s, qpos, kpos)
    return {"pairs": len(pairs), "same": int(same.sum()), "flagged": int(flagged.sum()),
            "flagged_same": int((flagged & same).sum()),
            "adjacent": queries, "adjacent_found": int(hits[det.prev_head]) if queries else 0}


def _match(st: Setup, name: str, K: int, ids, comp, group, settings: dict) -> tuple[np.ndarray, np.ndarray]:
    """Today's vocab-matching attack (attack.py) on the node's true view at layer K: (seen ok, unseen ok)."""
    from rshard_hpc.audit.attack import Attack, node_parts, observed_rows

    n = len(ids)
    if name.startswith("comp") and K == 0:  # token ids, outright
        mine = np.flatnonzero(comp == int(name[4:]))
        return np.ones(len(mine), dtype=bool), np.zeros(n - len(mine), dtype=bool)
    if name.startswith("comp"):
        parts = {int(p): ("h",) for p in np.flatnonzero(comp == int(name[4:]))}
    else:
        parts = node_parts(name, group, n)
    key = (K, settings["budget"])
    if key not in settings["_attacks"]:
        budget = max(settings["budget"], st.tm.cfg.vocab_size + settings["top_k"]) if K == 0 else settings["budget"]
        settings["_attacks"][key] = Attack(st.tm, layer=K, top_k=settings["top_k"], budget=budget,
                                           beam=settings["beam"], rank_ids=st.prior)
    res = settings["_attacks"][key].run(ids, observed_rows(st.np_model, ids, K), parts)
    seen = np.array(res["seen"], dtype=np.int64)
    unseen_ok = np.zeros(n - len(seen), dtype=bool)
    unseen_ok[:res["unseen_recovered"]] = True  # confirmed gap tokens (layer >= 1)
    return np.array(res["recovered"], dtype=bool), unseen_ok


def sweep_from_options(model, prompts, spec, client_layers: str, seeds=None, new_tokens: int = 40, max_tokens=None,
                       match_nodes: str = ",".join(DEFAULT_MATCH_NODES), match_prompts: int = 2, budget=None,
                       top_k: int = 8, beam=None, fill: bool = True, echo=None, **ignored) -> dict:
    """`rshard audit --client-layers …`: the command's options, checked, to run_sweep."""
    from rshard_hpc.audit.run import load_prompts

    try:
        ks = [int(x) for x in str(client_layers).split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--client-layers takes a comma-separated list of layer counts, e.g. 0,1,2,4 "
                         f"(got {client_layers!r})") from None
    if not ks:
        raise InputError("--client-layers needs at least one layer count, e.g. 0,1,2,4")
    if match_prompts < 0 or new_tokens < 0:
        raise InputError("--match-prompts and --new-tokens must be >= 0")
    return run_sweep(model, spec, ks, prompts=load_prompts(prompts) if prompts else None,
                     seeds=read_texts(seeds) if seeds else None, new_tokens=new_tokens,
                     max_tokens=48 if max_tokens is None else max_tokens,
                     match_nodes=tuple(x for x in match_nodes.split(",") if x), match_prompts=match_prompts,
                     budget=512 if budget is None else budget, top_k=top_k, beam=4 if beam is None else beam,
                     fill=fill, echo=echo)


def run_sweep(model, spec, client_layers=DEFAULT_CLIENT_LAYERS, prompts=None, seeds=None, new_tokens: int = 40,
              max_tokens: int = 48, match_nodes=DEFAULT_MATCH_NODES, match_prompts: int = 2, budget: int = 512,
              top_k: int = 8, beam: int = 4, fill: bool = True, echo=None) -> dict:
    """The extended audit for one plan; returns a JSON-able report (sweep_report.format_sweep renders it)."""
    import torch

    from rshard_hpc.plan.check import plan_report
    from rshard_hpc.plan.schemes import make_plan
    from rshard_hpc.plan.views import plan_views

    spec.check()
    t_start = time.perf_counter()
    prompts = read_texts(DATA / "eval.txt") if prompts is None else prompts
    seeds = read_texts(DATA / "seeds.txt") if seeds is None else seeds
    st = _setup(model, prompts, seeds, new_tokens, max_tokens, echo)
    Ks = sorted({int(k) for k in client_layers})
    if not Ks or Ks[0] < 0 or Ks[-1] >= st.tm.cfg.n_layers:
        raise InputError(f"--client-layers must lie in [0, {st.tm.cfg.n_layers}) (got {client_layers})")
    n_max = max(len(s) for s in st.evals)
    names = list(plan_views(*make_plan(spec, n_max), spec.alpha, spec.beta)) + list(CONTROLS)
    unknown = [x for x in match_nodes if x not in names + ["control"]]
    if unknown:
        raise InputError(f"unknown node(s) {', '.join(unknown)} for the match attack; this plan has {', '.join(names)}")
    summary = plan_report(spec, n_max)
    with torch.no_grad():
        rows_train = [st.tm.sequence_rows(ids, Ks) for ids in st.train]
        rows_eval = [st.tm.sequence_rows(ids, Ks) for ids in st.evals]
    settings = {"budget": budget, "top_k": top_k, "beam": beam, "_attacks": {}}
    results, scores, controls, filled_nodes = {}, {}, {}, {}
    for K in Ks:
        t0 = time.perf_counter()
        fitted = _fit(st, rows_train, K)
        if echo:
            echo(f"K={K}: inverters and the scores detector trained ({time.perf_counter() - t0:.0f} s)")
        refs: dict = {}  # layer -> every token's projections
        tallies = {name: {a: Tally() for a in ATTACKS} for name in names}
        score_tally = {}
        hyps = {name: [] for name in names}  # per prompt: {attack: decoded} for the fill
        for s, ids in enumerate(st.evals):
            comp, group = make_plan(spec, len(ids))
            decoded = _decode_all(st, rows_eval[s][K], K, fitted, refs)
            for name in names:
                view = R.node_rows(name, comp, group, K)
                seen = np.sort(np.concatenate(list(view.values())))
                unseen = np.setdiff1d(np.arange(len(ids)), seen)
                dec = _node_decode(decoded, view, ids)
                hyps[name].append(dec)
                for a in ROW_ATTACKS:
                    tallies[name][a].add(dec[a][seen] == ids[seen], np.zeros(len(unseen), dtype=bool), len(ids))
                if name in match_nodes and s < match_prompts and K > 0:  # K = 0: nn is the exact layer-0 match
                    tallies[name]["match"].add(*_match(st, name, K, ids, comp, group, settings), len(ids))
                got = _scores_stats(st, rows_eval[s][K], ids, name, comp, group, fitted["scores"])
                if got:
                    acc = score_tally.setdefault(name, {k: 0 for k in got})
                    for k, v in got.items():
                        acc[k] += v
        if "control" in match_nodes and K > 0:
            ctl = Tally()
            for s, ids in enumerate(st.evals[:match_prompts]):
                comp, group = make_plan(spec, len(ids))
                ctl.add(*_match(st, "control", K, ids, comp, group, settings), len(ids))
            controls[K] = asdict(ctl)
        filled = _fill(st, spec, names, tallies, hyps) if fill else []
        results[K] = {name: {a: asdict(t) for a, t in tallies[name].items() if t.tokens} for name in names}
        filled_nodes[K] = filled
        scores[K] = score_tally
        if echo:
            echo(format_k(K, results[K], time.perf_counter() - t0))
    return {"model": str(model), "plan": spec.params(), "delta": summary["delta"],
            "fraction_seen": {k: v["fraction_seen"] for k, v in summary["nodes"].items()},
            "client_layers": Ks, "prompts": len(st.evals), "tokens": int(sum(map(len, st.evals))),
            "train_tokens": int(sum(map(len, st.train))), "new_tokens": new_tokens, "max_tokens": max_tokens,
            "match": {"nodes": list(match_nodes), "prompts": min(match_prompts, len(st.evals)), "budget": budget,
                      "top_k": top_k, "beam": beam},
            "fill": fill, "filled_nodes": filled_nodes, "results": results, "scores": scores, "match_control": controls,
            "seconds": time.perf_counter() - t_start}


def _fill(st: Setup, spec, names, tallies, hyps) -> list:
    """For the node of each kind whose best row attack recovers the most seen tokens, guess its unseen positions
    with the model given that attack's decoded hypothesis, and record them in that attack's tally. Returns the
    nodes filled (one a kind: the model's forward passes are the audit's dearest step on a CPU)."""
    import torch

    best, chosen = {}, {}
    for name in names:
        if name.startswith("control"):
            continue
        a = max(ROW_ATTACKS, key=lambda x: tallies[name][x].seen_recovered)
        kind = node_kind(name)
        if kind not in chosen or tallies[name][a].seen_recovered > tallies[chosen[kind]][best[chosen[kind]]].seen_recovered:
            chosen[kind] = name
        best[name] = a
    batch = list(chosen.values())
    for name in batch:
        tallies[name][best[name]] = Tally()
    start = R.prior_start(st.tm, st.prior)
    n_max = max(map(len, st.evals))
    dec = np.zeros((len(batch), len(st.evals), n_max), dtype=np.int64)  # padded at the end
    known = np.ones(dec.shape, dtype=bool)
    for b, name in enumerate(batch):
        for s, ids in enumerate(st.evals):
            got = hyps[name][s][best[name]]
            dec[b, s, :len(ids)] = np.maximum(got, 0)
            known[b, s, :len(ids)] = got >= 0
    filled = R.lm_fill(st.tm, start, torch.as_tensor(dec.reshape(-1, n_max)),
                       torch.as_tensor(known.reshape(-1, n_max))).numpy().reshape(dec.shape)
    for b, name in enumerate(batch):
        for s, ids in enumerate(st.evals):
            ok = filled[b, s, :len(ids)] == ids
            k = known[b, s, :len(ids)]
            tallies[name][best[name]].add(ok[k], ok[~k], len(ids))
        tallies[name][best[name]].filled = True
    return batch
