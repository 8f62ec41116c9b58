"""`rshard bench trace DIR`: read the host timelines RSHARD_TRACE=DIR wrote (engine/trace.py) and say where the
time went: each rank's start-up marks, each rank's time between consecutive marks over the chosen steps (per
step and per layer), and one layer of one step laid out across ranks in time order (the critical path).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

START_MARKS = ("exec", "process", "mpi up", "prepared", "device", "device agreed", "transport", "set up")


def load(folder) -> dict:
    """rank -> {"role": str, "events": [(ns, label), ...], "device": [(device ns, label), ...]} for every rank<N>.json
    in folder ("device": the marks a GPU rank also timed on its stream, RSHARD_TRACE_DEVICE=1; else empty)."""
    ranks = {}
    for path in sorted(Path(folder).glob("rank*.json")):
        doc = json.loads(path.read_text())
        events = [(int(e[0]), str(e[1])) for e in doc["events"]]
        device = [(int(e[2]), str(e[1])) for e in doc["events"] if len(e) > 2]
        role = next((label[5:] for _, label in events if label.startswith("role ")), "client" if doc["rank"] == 0
                    else f"rank {doc['rank']}")
        ranks[int(doc["rank"])] = {"role": role, "events": events, "device": device}
    if not ranks:
        raise FileNotFoundError(f"no rank*.json in {folder} (was RSHARD_TRACE={folder} set for the job?)")
    return ranks


def split_steps(events) -> list:
    """The events of each step: from a "step" mark to its "step end" (or to the next step, or the end)."""
    starts = [i for i, (_, label) in enumerate(events) if label == "step"]
    steps = []
    for a, b in zip(starts, starts[1:] + [len(events)]):
        ends = [i for i in range(a, b) if events[i][1] == "step end"]
        steps.append(events[a:ends[0] + 1] if ends else events[a:b])
    return steps


def start_up_table(ranks) -> list[str]:
    """Per rank, the time (s after the earliest process start) of each start-up mark and of its first step."""
    zero = min(t for r in ranks.values() for t, label in r["events"] if label in ("exec", "process"))
    head = ["rank", "role", *START_MARKS, "first step", "last mark"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, r in sorted(ranks.items()):
        first = {}
        for t, label in r["events"]:
            first.setdefault(label, t)
        cells = [f"{(first[m] - zero) / 1e9:.2f}" if m in first else "-" for m in (*START_MARKS, "step")]
        cells.append(f"{(r['events'][-1][0] - zero) / 1e9:.2f}")
        lines.append(f"| {rank} | {r['role']} | " + " | ".join(cells) + " |")
    return lines


def transitions(steps) -> tuple[dict, int]:
    """(prev label -> label): total ns over the steps, and the number of "layer" marks they hold."""
    totals, layers = defaultdict(int), 0
    for events in steps:
        for (t0, a), (t1, b) in zip(events[:-1], events[1:]):
            totals[(a, b)] += t1 - t0
        layers += sum(1 for _, label in events if label == "layer")
    return totals, layers


def transition_table(ranks, chosen: slice, clock: str = "events") -> list[str]:
    """Per rank, the time between consecutive marks summed over the chosen steps: ms a step, us a layer; on the
    host's clock (clock="events") or on the GPU's ("device": when the rank's stream reached each mark)."""
    lines = ["| rank | role | from -> to | ms a step | us a layer |", "|---|---|---|---|---|"]
    for rank, r in sorted(ranks.items()):
        steps = split_steps(r[clock])[chosen]
        if not steps:
            continue
        totals, layers = transitions(steps)
        per_layer = layers / len(steps) or 1
        for (a, b), ns in sorted(totals.items(), key=lambda kv: -kv[1]):
            ms = ns / len(steps) / 1e6
            if ms < 0.05:
                continue
            lines.append(f"| {rank} | {r['role']} | {a} -> {b} | {ms:.2f} | {ms * 1e3 / per_layer:.0f} |")
    return lines


def layer_timeline(ranks, step: int, layer: int) -> list[str]:
    """Every rank's marks from the layer's first "layer" mark to the next layer's, in time order (us)."""
    windows = {}
    for rank, r in ranks.items():
        steps = split_steps(r["events"])
        if not -len(steps) <= step < len(steps):
            continue
        events = steps[step]
        layer_at = [i for i, (_, label) in enumerate(events) if label == "layer"]
        if layer < len(layer_at):
            end = layer_at[layer + 1] if layer + 1 < len(layer_at) else len(events)
            windows[rank] = events[layer_at[layer]:end]
    if not windows:
        return ["(no rank has that step and layer)"]
    zero = min(w[0][0] for w in windows.values())
    merged = sorted((t, rank, label) for rank, w in windows.items() for t, label in w)
    return [f"{(t - zero) / 1e3:9.1f} us  rank {rank:<3} {ranks[rank]['role']:<22} {label}" for t, rank, label in merged]


def report(folder, steps: str = "-8:", layer: int = 10) -> str:
    """The three tables for the steps chosen by a Python slice over the step index ("-8:": the last eight)."""
    ranks = load(folder)
    a, _, b = steps.partition(":")
    chosen = slice(int(a) if a else None, int(b) if b else None)
    last = (chosen.stop - 1) if chosen.stop is not None else -1
    out = [f"# trace of {len(ranks)} ranks in {folder}", "", "## start-up (s after the first process began)", ""]
    out += start_up_table(ranks)
    out += ["", f"## time between marks, steps [{steps}] (host time; a wait for the GPU shows in the mark after it)", ""]
    out += transition_table(ranks, chosen)
    if any(r["device"] for r in ranks.values()):
        out += ["", f"## GPU time between marks, steps [{steps}] (RSHARD_TRACE_DEVICE=1: when each GPU rank's stream "
                    "reached the mark; a wait for peers shows before the mark after it)", ""]
        out += transition_table(ranks, chosen, clock="device")
    out += ["", f"## step {last}, layer {layer}: every rank's marks in time order", "", "```"]
    out += layer_timeline(ranks, last, layer) + ["```"]
    return "\n".join(out) + "\n"
