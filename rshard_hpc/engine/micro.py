"""Micro-batches (issue 13's overlap lever): a large step cut into lanes, so that a CompNode computes lane m+1's
passes while the AttnNodes attend lane m. No MPI here: the cut and the order of the exchanges, which every rank
derives alike from the step header (the client's requested lane count) and the step's tokens.

A lane is a contiguous range of the step's tokens in global order (by sequence, then position), so each rank's
rows of a lane are a contiguous range of its rows. Without causality a cut falls on a sequence boundary (a
query sees every key of its sequence); with it a cut may split a sequence, its earlier positions going first:
lane m's queries see keys of lanes <= m only, and an AttnNode holds those when it attends lane m (lanes' keys
enter its cache lane by lane, and each lane attends the cache up to its own keys).
"""
from __future__ import annotations

import os

import numpy as np

from rshard_hpc.errors import InputError

ENV_VAR = "RSHARD_MICRO_BATCHES"  # lanes a large step is cut into (1, the default: no cut)
MIN_LANE_TOKENS = 256  # fewest tokens a lane has: smaller steps take fewer lanes (a decode step: one)


def requested() -> int:
    """The lane count RSHARD_MICRO_BATCHES asks for (1 when unset); InputError unless a positive integer."""
    text = os.environ.get(ENV_VAR, "").strip()
    if not text:
        return 1
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise InputError(f"{ENV_VAR} must be a positive integer (lanes a large step is cut into), got {text!r}")
    return count


def lane_ranges(seq: np.ndarray, count: int, causal: bool, min_tokens: int | None = None) -> list:
    """The lanes of a step whose tokens have sequences seq (n,) (ascending): [(a, b), …] ranges of token indices
    covering 0 … n-1 in order, at most `count` of them, each of about min_tokens tokens or more (MIN_LANE_TOKENS by
    default; one range when the step is too small); balanced by token count, cuts on sequence boundaries unless
    causal (so fewer lanes where sequences are too few)."""
    n = len(seq)
    min_tokens = MIN_LANE_TOKENS if min_tokens is None else int(min_tokens)
    count = min(int(count), n // max(min_tokens, 1))
    if count <= 1:
        return [(0, n)]
    cuts = [round(n * m / count) for m in range(1, count)]
    if not causal:
        starts = np.append(np.flatnonzero(np.diff(seq) != 0) + 1, n)  # where each sequence but the first begins
        cuts = [int(starts[np.abs(starts - c).argmin()]) for c in cuts]
    bounds = sorted({0, n, *cuts})
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def schedule(lanes: int, layers) -> list:
    """The order of a step's exchanges on every rank: [("out" | "back", lane, layer), …]. "out": the CompNodes send
    a lane's q, k, v of a layer; "back": the AttnNodes return its partials. Every lane goes out at the first layer,
    then each lane in turn comes back and goes out at the next layer: while lane m comes back and its next layer's
    passes run, the AttnNodes attend lane m+1. One lane: out, back, out, back, … (the step without lanes)."""
    layers = list(layers)
    if not layers:
        return []
    events = [("out", m, layers[0]) for m in range(lanes)]
    for at, layer in enumerate(layers):
        for m in range(lanes):
            events.append(("back", m, layer))
            if at + 1 < len(layers):
                events.append(("out", m, layers[at + 1]))
    return events
