"""The audit's per-node results and the table `rshard audit` prints."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class NodeResult:
    node: str
    fraction_seen: float = 0.0
    min_gap: float = float("inf")
    seen: int = 0
    recovered: int = 0
    first_seen: int = 0
    first_recovered: int = 0
    interior_seen: int = 0
    interior_recovered: int = 0
    nearest_ok: int = 0
    unseen: int = 0
    unseen_recovered: int = 0
    false_matches: int = 0
    passes: int = 0
    rank_passes: int = 0
    seconds: float = 0.0
    given: bool = False  # CompNode: token ids received outright

    def add(self, st: dict, given: bool = False) -> None:
        rec = np.array(st["recovered"], dtype=bool)
        first = np.array(st["first_run"], dtype=bool)
        self.seen += len(rec)
        self.recovered += int(rec.sum())
        self.first_seen += int(first.sum())
        self.first_recovered += int((rec & first).sum())
        self.interior_seen += int((~first).sum())
        self.interior_recovered += int((rec & ~first).sum())
        self.nearest_ok += int(np.sum(st["nearest_ok"]))
        self.unseen += st["unseen"]
        self.unseen_recovered += st["unseen_recovered"]
        self.false_matches += st["false_matches"]
        self.passes += st["passes"]
        self.rank_passes += st["rank_passes"]


HEADER = ("| node | seen frac | min gap | seen | recovered | first run | interior runs | nearest ok "
          "| unseen recovered | passes | s |\n|---|---|---|---|---|---|---|---|---|---|---|")


def _frac(a, b):
    return f"{a}/{b}" if b else "-"


def _row(r: NodeResult) -> str:
    gap = "∞" if r.min_gap == float("inf") else f"{int(r.min_gap)}"
    rec = f"{r.recovered}/{r.seen} (given)" if r.given else _frac(r.recovered, r.seen)
    return (f"| {r.node} | {r.fraction_seen:.2f} | {gap} | {r.seen} | {rec} | "
            f"{_frac(r.first_recovered, r.first_seen)} | {_frac(r.interior_recovered, r.interior_seen)} | "
            f"{_frac(r.nearest_ok, r.seen)} | {_frac(r.unseen_recovered, r.unseen)} | {r.passes} | {r.seconds:.1f} |")


def format_report(rep: dict) -> str:
    p = rep["plan"]
    delta = rep["delta"]
    head = (f"plan {p['scheme']} α={p['alpha']} β={p['beta']} c={p['c']} c_a={p['c_a']} δ={delta:g}, "
            f"layer {rep['layer']}, top-k {rep['top_k']}, budget {rep['budget']}/group, beam {rep['beam']}"
            f"{', layer-0 assist' if rep['assist_layer0'] else ''}; {rep['prompts']} prompts, {rep['tokens']} tokens")
    lines = [head, "", HEADER]
    for d in rep["nodes"].values():
        lines.append(_row(NodeResult(**d)))
    ctl = rep["nodes"].get("control")
    if ctl and ctl["seen"]:
        frac = ctl["recovered"] / ctl["seen"]
        lines.append("")
        lines.append(f"control: {frac:.1%} recovered" + ("" if frac >= 0.95 else
                                                           "  <-- below 95%: the attack is broken or under-budgeted"))
    return "\n".join(lines)
