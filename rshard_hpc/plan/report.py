"""The plan report of `rshard plan` and of /privacy: a document per plan and its text rendering."""
from __future__ import annotations

import math

import numpy as np

from rshard_hpc.dist.topology import node_label, rank_layout, world_size_for
from rshard_hpc.errors import InputError
from rshard_hpc.plan.check import SEARCH_MAX, describe_layout, plan_report, smallest_layout
from rshard_hpc.plan.collude import check_collude, render_collude, worst_coalition
from rshard_hpc.plan.schemes import DEFAULT_DELTA, PlanSpec, make_plan
from rshard_hpc.plan.views import DEFAULT_VOCAB, INF, blocks_of, format_blocks, plan_views


def tokenizer_public_prefix(codec, wrap=None) -> int:
    """Leading positions every prompt shares and anyone can know: the tokens the tokenizer adds in front
    (BERT's [CLS], a BOS) and, with `wrap` (a chat template), the template's text before the user's.

    Read from the token offsets of one wrapped text: a leading token counts when it is an added special
    token or ends before the first character where two different user texts differ."""
    wrap = wrap or (lambda text: text)
    texts = [wrap("x1"), wrap("y2")]
    start = 0
    while start < min(map(len, texts)) and texts[0][start] == texts[1][start]:
        start += 1
    enc = codec.tok.encode(texts[0], add_special_tokens=getattr(codec, "add_special", True))
    if list(enc.ids) != list(codec.encode(texts[0])):  # the codec adds tokens its own way: compare two texts
        a, b = codec.encode(texts[0]), codec.encode(texts[1])
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n] and n < len(a) - 1:
            n += 1
        return n
    n = 0
    for (_, end), special in zip(enc.offsets, enc.special_tokens_mask):
        if not (special or end <= start) or (special and n == len(enc.ids) - 1):
            break
        n += 1
    return n


def jsonable(obj):
    """A report with inf as "inf", NumPy scalars as Python numbers and int keys as strings (plain JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    return obj


# ------------------------------------------------------------------------------------------ `rshard plan`
REPORT_LIMIT = 1 << 22  # positions × nodes `rshard plan` reports one by one (a few seconds on a slow machine)
SEARCH_MAX_LIMIT = 32  # the largest --search-max (1 + 32 + 32² = 1057 ranks)


def check_request(n: int, public_prefix=None, vocab=None, delta: float = DEFAULT_DELTA,
                  search_max: int = SEARCH_MAX) -> None:
    """Refuse, before any work, values `rshard plan` cannot answer for: an InputError naming the option and the
    value (public_prefix and vocab may be None: the model's, or the default)."""
    if n < 1:
        raise InputError(f"--length must be >= 1 (got {n})")
    if vocab is not None and vocab < 2:
        raise InputError(f"--vocab must be >= 2, a vocabulary to guess from (got {vocab})")
    if public_prefix is not None and public_prefix < 0:
        raise InputError(f"--public-prefix must be >= 0 (got {public_prefix})")
    if not delta >= 0:
        raise InputError(f"--delta must be >= 0 (got {delta})")
    if not 1 <= search_max <= SEARCH_MAX_LIMIT:
        raise InputError(f"--search-max must lie in [1, {SEARCH_MAX_LIMIT}] (got {search_max}); "
                         f"{SEARCH_MAX_LIMIT} already means {world_size_for(SEARCH_MAX_LIMIT, SEARCH_MAX_LIMIT)} ranks")


def check_size(spec: PlanSpec, n: int) -> None:
    """Refuse a report over REPORT_LIMIT positions × nodes (it is made position by position), saying what to do."""
    nodes = spec.alpha + spec.beta ** 2
    if n * nodes <= REPORT_LIMIT:
        return
    periodic = (f"; a strided plan repeats every alpha*c = {spec.alpha * spec.c} (CompNodes) and beta*c_a = "
                f"{spec.beta * spec.c_a} (AttnNodes) positions, so a few periods show every gap it has"
                if spec.scheme == "strided" else "")
    if nodes > REPORT_LIMIT:
        raise InputError(f"alpha={spec.alpha} beta={spec.beta} has {nodes} nodes, more than rshard plan reports "
                         f"({REPORT_LIMIT} positions over all nodes)")
    raise InputError(f"--length {n} is too long for the node-by-node report of alpha={spec.alpha} beta={spec.beta} "
                     f"({nodes} nodes): at most {REPORT_LIMIT // nodes} positions ({REPORT_LIMIT} over all nodes)"
                     f"{periodic}")


def plan_document(spec: PlanSpec, n: int, public_prefix: int = 0, vocab: int = DEFAULT_VOCAB, causal: bool = True,
                  delta: float = DEFAULT_DELTA, search_max: int = SEARCH_MAX, collude: int | None = None) -> dict:
    """What `rshard plan` shows (and prints with --json): layout, every node's view, δ, the smallest layout
    reaching `delta` at this length, and with `collude` the union view of the worst that many colluding nodes.
    What check_request or check_size refuses is an InputError first."""
    check_request(n, public_prefix, vocab, delta, search_max)
    if collude is not None:
        check_collude(collude, spec.alpha + spec.beta ** 2)
    check_size(spec, n)
    report = plan_report(spec, n, public_prefix, vocab, causal)
    found = smallest_layout(spec, [n], delta, public_prefix, search_max)
    return {"plan": spec.params(), "length": n, "public_prefix": public_prefix, "vocab": vocab, "causal": causal,
            "world_size": world_size_for(spec.alpha, spec.beta), "layout": rank_layout(spec.alpha, spec.beta),
            "delta": report["delta"], "required_delta": delta, "meets": report["delta"] >= delta,
            "seen_whole_by": report["seen_whole_by"], "suggestion": found,
            "suggestion_text": describe_layout(found, spec, delta, search_max), "nodes": report["nodes"],
            **({"collude": worst_coalition(plan_views(*make_plan(spec, n), spec.alpha, spec.beta), n, collude,
                                           public_prefix)} if collude is not None else {})}


def render_plan(doc: dict) -> str:
    """`rshard plan`'s text output."""
    p = doc["plan"]
    lines = [f"plan {p['scheme']}: alpha={p['alpha']} beta={p['beta']} c={p['c']} c_a={p['c_a']}"
             + (f" seed={p['seed']}" if p["scheme"] == "random" else "")
             + f", length {doc['length']}, public prefix {doc['public_prefix']}, V={doc['vocab']}, "
             + f"{'causal' if doc['causal'] else 'bidirectional'} ({doc['world_size']} ranks)",
             f"delta = {doc['delta']:g} (smallest gap before a later run, over all nodes"
             + (f"; {', '.join(node_label(x) for x in doc['seen_whole_by'])} see every position" if doc["seen_whole_by"] else "")
             + f"): {'meets' if doc['meets'] else 'BELOW'} --delta {doc['required_delta']:g}",
             doc["suggestion_text"][0].upper() + doc["suggestion_text"][1:] + "."]
    lines += [doc["layout_chosen"]] if doc.get("layout_chosen") else []
    if doc.get("defaults_from"):
        lines.append(f"vocabulary, mask and public prefix from {doc['defaults_from']}")
    lines += ["", "rank layout:"]
    lines += [f"  rank {row['rank']:>3}  {row['label']}" for row in doc["layout"]]
    lines += ["", "views (runs: start positions; gap = unseen positions before the run; cost = log10 V^(gap+1)):"]
    n, past = doc["length"], "; past the public prefix" if doc["public_prefix"] else ""
    for name, r in doc["nodes"].items():
        lines.append(f"{node_label(name)}: sees {r['seen']}/{n} ({100 * r['fraction_seen']:.1f}%){past}: "
                     f"{r['positions']}"
                     + ("  [SEES EVERY POSITION]" if r["sees_all"] else ""))
        first = r["first_run"]
        if first:
            lines.append(f"  first-run exposure: {first['length']} position{'s' if first['length'] > 1 else ''} "
                         f"from {first['start']} (gap {first['gap']}, cost {first['cost_log10']:.2f})")
        for g in r["runs"]:
            starts = blocks_of([g["start"] + t * g["period"] for t in range(g["count"])])
            lines.append(f"  runs at {format_blocks(starts)}: length {g['length']}, gap {g['gap']}, "
                         f"cost {g['cost_log10']:.2f}")
        later = "none (one run)" if r["min_gap"] == INF else f"{r['min_gap']:g} (cost {r['min_cost_log10']:.2f})"
        lines.append(f"  smallest gap before a later run: {later}")
        if "partials" in r:
            q = r["partials"]
            lines.append(f"  partials received: {q['partials']}; over < 2 keys: {q['under_two_keys']} "
                         f"({q['empty']} empty, {q['single_key']} single-key); with one foreign key: "
                         f"{q['one_foreign_key']}")
    if doc.get("collude"):
        lines += [""] + render_collude(doc["collude"], n)
    return "\n".join(lines)


def plan_defaults(model, public_prefix=None, vocab=None, causal=None) -> dict:
    """The public prefix, vocabulary size and mask `rshard plan` reports with: those given, the others from --model,
    else from `rshard run`'s default model (DEFAULT_MODEL) where its package is installed, so that the plan and a
    job's /privacy agree; else 0, DEFAULT_VOCAB and causal. "from" says where the others came from (None: all given)."""
    from rshard_hpc.models.registry import DEFAULT_MODEL, bundled_source

    given = {"public_prefix": public_prefix, "vocab": vocab, "causal": causal}
    facts, where = {}, None
    if None in given.values():
        try:
            if not model:
                bundled_source(DEFAULT_MODEL)  # an InputError where its package is not installed
            facts = model_facts(model or DEFAULT_MODEL)
            where = f"model {model}" if model else f"{DEFAULT_MODEL} (rshard run's default model; --model to change)"
        except InputError:
            if model:
                raise
            facts, where = {"public_prefix": 0, "vocab": DEFAULT_VOCAB, "causal": True}, (
                f"no model: {DEFAULT_MODEL}, rshard run's default, is not installed")
    out = {k: facts[k] if v is None else v for k, v in given.items()}
    return {**out, "from": where}


def model_facts(model: str) -> dict:
    """Vocabulary size, mask and public prefix of a weight file or bundled model (for `rshard plan`)."""
    from rshard_hpc.models import weights
    from rshard_hpc.models.registry import resolve_model
    from rshard_hpc.models.tokenizer import TextCodec

    path = resolve_model(model)
    cfg = weights.read_config(path)
    return {"vocab": cfg.vocab_size, "causal": cfg.causal, "public_prefix": tokenizer_public_prefix(TextCodec(path, cfg))}
