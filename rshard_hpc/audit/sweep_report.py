"""What `rshard audit --client-layers` reports (audit/sweep.py runs it): the attacks and node kinds by name, one
line a node while the sweep runs (format_k), and the markdown tables of the whole sweep (format_sweep)."""
from __future__ import annotations

ROW_ATTACKS = ("nn", "linear", "mlp")
ATTACKS = ("match",) + ROW_ATTACKS
KIND_ORDER = ("CompNode", "AttnNode i=j", "AttnNode i≠j", "control_h", "control_qkv")


def node_kind(name: str) -> str:
    if name.startswith("comp"):
        return "CompNode"
    if name.startswith("control"):
        return name
    i, j = name[4:].split("_")
    return "AttnNode i=j" if i == j else "AttnNode i≠j"


def _recovered(t: dict) -> float:
    """The fraction of the prompt's tokens an attack's tally recovered, seen and unseen together."""
    return (t["seen_recovered"] + t["unseen_recovered"]) / t["tokens"]


def _best_attack(attacks: dict) -> str:
    """The attack of one node that recovered most of the prompt."""
    return max(attacks, key=lambda a: _recovered(attacks[a]))


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.0f}%" if b else "-"


def _cell(t: dict | None) -> str:
    """seen / unseen / whole prompt, recovered."""
    if not t:
        return "·"
    prompt = _recovered(t)
    unseen = _pct(t["unseen_recovered"], t["unseen"]) if t["filled"] or t["unseen_recovered"] else "0"
    return f"{_pct(t['seen_recovered'], t['seen'])} / {unseen} / **{100 * prompt:.0f}%**"


def by_kind(res_k: dict) -> dict:
    """{kind: {attack: the worst node's tally (most of a prompt recovered) and its name}} for one K."""
    out = {}
    for name, attacks in res_k.items():
        kind = node_kind(name)
        for a, t in attacks.items():
            prompt = _recovered(t)
            cur = out.setdefault(kind, {}).get(a)
            if cur is None or prompt > cur[2]:
                out[kind][a] = (name, t, prompt)
    return out


def format_k(K: int, res_k: dict, seconds: float) -> str:
    lines = [f"K={K} ({seconds:.0f} s): best attack per node, recovered seen / unseen / prompt"]
    for name, attacks in res_k.items():
        a = _best_attack(attacks)
        lines.append(f"  {name}: {a} {_cell(attacks[a])}")
    return "\n".join(lines)


def format_sweep(rep: dict) -> str:
    """The node kind × attack × K table (each cell: the worst node of the kind), the scores, the per-node best."""
    p = rep["plan"]
    m = rep["match"]
    head = (f"plan {p['scheme']} α={p['alpha']} β={p['beta']} c={p['c']} c_a={p['c_a']} δ={rep['delta']:g}; "
            f"{rep['prompts']} held-apart prompts, {rep['tokens']} tokens; training text {rep['train_tokens']} "
            f"tokens; match: " + (f"{', '.join(m['nodes'])} on {m['prompts']} prompts, budget {m['budget']}, "
                                  f"top-k {m['top_k']}, beam {m['beam']}" if m["nodes"] else "not run")
            + f"; {rep['seconds']:.0f} s")
    lines = [head, "", ("Recovered tokens, seen / unseen / whole prompt (cell: the worst node of the kind; "
                        "unseen '0': not attempted by that attack):"), ""]
    lines.append("| node kind | attack | " + " | ".join(f"K={k}" for k in rep["client_layers"]) + " |")
    lines.append("|---|---|" + "---|" * len(rep["client_layers"]))
    kinds = {k: by_kind(rep["results"][k]) for k in rep["client_layers"]}
    for kind in KIND_ORDER:
        for a in ATTACKS:
            cells = [kinds[k].get(kind, {}).get(a) for k in rep["client_layers"]]
            if not any(cells):
                continue
            lines.append(f"| {kind} | {a} | " + " | ".join(
                f"{_cell(c[1])} ({c[0]})" if c and not kind.startswith("control") else _cell(c[1] if c else None)
                for c in cells) + " |")
    if rep["match_control"]:
        lines.append("| control (k, v of every position) | match | " + " | ".join(
            _cell(rep["match_control"].get(k)) for k in rep["client_layers"]) + " |")
    lines += ["", "Best attack per node (whole prompt recovered):", "",
              "| node | seen frac | " + " | ".join(f"K={k}" for k in rep["client_layers"]) + " |",
              "|---|---|" + "---|" * len(rep["client_layers"])]
    for name in rep["results"][rep["client_layers"][0]]:
        cells = []
        for k in rep["client_layers"]:
            attacks = rep["results"][k][name]
            a = _best_attack(attacks)
            cells.append(f"{100 * _recovered(attacks[a]):.0f}% ({a})")
        frac = rep["fraction_seen"].get(name, 1.0)
        lines.append(f"| {name} | {frac:.2f} | " + " | ".join(cells) + " |")
    lines += ["", ("AttnNode scores (q·kᵀ): same-token pairs flagged (correct/flagged, of all same-token pairs), "
                   "adjacency (previous-token head's argmax right):"), "",
              "| K | same-token pairs | adjacency |", "|---|---|---|"]
    for k in rep["client_layers"]:
        tot = {}
        for v in rep["scores"][k].values():
            for key, x in v.items():
                tot[key] = tot.get(key, 0) + x
        if tot:
            lines.append(f"| {k} | {tot['flagged_same']}/{tot['flagged']} correct, {tot['flagged_same']}/"
                         f"{tot['same']} found | {tot['adjacent_found']}/{tot['adjacent']} |")
    return "\n".join(lines)
