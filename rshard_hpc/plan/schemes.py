"""Sharding plans (architecture.md §3). A plan for a sequence of N positions is two int32 arrays:
  comp[p]  in [0, alpha): the CompNode that owns position p;
  group[p] in [0, beta):  p's index group (q goes to AttnNode row group[p], k/v to column group[p]).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from rshard_hpc.errors import InputError

SCHEMES = ("strided", "random", "explicit")


DEFAULT_DELTA = 2  # the δ `rshard run` requires unless told otherwise (docs/privacy.md says why)


@dataclass(frozen=True)
class PlanSpec:
    scheme: str = "strided"
    alpha: int = 1
    beta: int = 1
    c: int = 1  # CompNode chunk length
    c_a: int = 1  # index-group chunk length
    seed: int = 0  # for scheme "random"
    explicit: dict = field(default=None, compare=False, hash=False)  # {"comp": [...], "group": [...]}
    target_delta: int = DEFAULT_DELTA  # scheme "random": the CompNode gap its choices keep (architecture.md §4)

    def check(self) -> None:
        if self.scheme not in SCHEMES:
            raise InputError(f"unknown plan scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.alpha < 1 or self.beta < 1:
            raise InputError(f"--alpha and --beta must be >= 1 (got alpha={self.alpha}, beta={self.beta})")
        if self.c < 1 or self.c_a < 1:
            raise InputError(f"chunk lengths must be >= 1 (got c={self.c}, c_a={self.c_a})")
        if self.scheme == "explicit" and not self.explicit:
            raise InputError("plan scheme 'explicit' needs a plan file (--plan-file)")
        if self.scheme != "explicit" and self.explicit is not None:
            raise InputError(f"a plan file is for --scheme explicit only (the scheme is {self.scheme!r})")
        if self.scheme == "explicit":
            check_explicit(self.explicit, self.alpha, self.beta)

    def params(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "explicit"}
        return out


def make_plan(spec: PlanSpec, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(comp, group), each int32 of shape (n,), for a sequence of n positions."""
    p = np.arange(n, dtype=np.int64)
    if spec.scheme == "strided":
        comp = (p // spec.c) % spec.alpha
        group = (p // spec.c_a) % spec.beta
    elif spec.scheme == "random":
        rng = np.random.default_rng([spec.seed, n])
        # CompNode k's next chunk comes at least ceil(δ/c) chunks after its last one (when alpha allows it)
        comp_window = min(spec.alpha - 1, max(1, -(-spec.target_delta // spec.c)))
        comp = _random_chunks(rng, n, spec.c, spec.alpha, comp_window)
        group = _random_chunks(rng, n, spec.c_a, spec.beta, 1, third_distinct=True)
    else:
        comp, group = _explicit(spec, n)
    return comp.astype(np.int32), group.astype(np.int32)


def batch_plans(spec: PlanSpec, lens) -> list[tuple[np.ndarray, np.ndarray]]:
    """make_plan for every sequence of a batch: a plan is a function of (spec, n), so sequences of one length
    share one (read-only) plan."""
    by_length = {n: make_plan(spec, n) for n in set(lens)}
    return [by_length[n] for n in lens]


def _random_chunks(rng, n: int, chunk: int, parts: int, window: int, third_distinct: bool = False) -> np.ndarray:
    """Chunks of `chunk` positions; each chunk's part is drawn uniformly among the parts not used by the
    `window` chunks before it (so a part's chunks are >= window * chunk positions apart). With
    `third_distinct` the third chunk also avoids the first two parts (3 parts in the first 3 chunks: no
    pair of index groups covers a sequence longer than 2 chunks)."""
    n_chunks = -(-n // chunk) if n else 0
    labels = np.zeros(n_chunks, dtype=np.int64)
    draws = rng.random(n_chunks)
    for t in range(n_chunks):
        allowed = list(range(parts))
        for back in range(2 if (third_distinct and t == 2) else window, 0, -1):  # widest window that leaves a part
            recent = set(labels[max(0, t - back):t].tolist())
            if len(recent) < parts:
                allowed = [x for x in range(parts) if x not in recent]
                break
        labels[t] = allowed[int(draws[t] * len(allowed))]
    return np.repeat(labels, chunk)[:n]


def check_explicit(plan, alpha: int, beta: int, where: str = "explicit plan") -> None:
    """An explicit plan is {"comp": [...], "group": [...]}: two lists of equal length of integers in [0, alpha)
    and [0, beta). Anything else (a list, a missing key, strings, floats such as 1.5 or 1.0, negative values) is
    an InputError naming `where` and what is wrong."""
    if not isinstance(plan, dict):
        raise InputError(f"{where} must be an object {{\"comp\": [...], \"group\": [...]}}, not a "
                         f"{type(plan).__name__}")
    for key, parts, flag in (("comp", alpha, "--alpha"), ("group", beta, "--beta")):
        values = plan.get(key)
        if values is None:
            raise InputError(f"{where} lacks \"{key}\" (a list of integers in [0, {parts}))")
        if not isinstance(values, list):
            raise InputError(f"{where}: \"{key}\" must be a list of integers, not a {type(values).__name__}")
        for p, v in enumerate(values):
            if type(v) is not int or not 0 <= v < parts:
                raise InputError(f"{where}: \"{key}\"[{p}] is {json.dumps(v)}; values must be integers in "
                                 f"[0, {parts}) ({flag} {parts})")
    if len(plan["comp"]) != len(plan["group"]):
        raise InputError(f"{where}: \"comp\" has {len(plan['comp'])} positions, \"group\" {len(plan['group'])}; "
                         f"they must be equally long")


def _explicit(spec: PlanSpec, n: int) -> tuple[np.ndarray, np.ndarray]:
    comp = np.asarray(spec.explicit["comp"], dtype=np.int64)
    group = np.asarray(spec.explicit["group"], dtype=np.int64)
    if comp.shape != group.shape or comp.ndim != 1:
        raise InputError("explicit plan: 'comp' and 'group' must be lists of equal length")
    if len(comp) < n:
        raise InputError(f"explicit plan covers {len(comp)} positions, a sequence needs {n}")
    if comp.min(initial=0) < 0 or comp.max(initial=0) >= spec.alpha:
        raise InputError(f"explicit plan: 'comp' values must lie in [0, {spec.alpha})")
    if group.min(initial=0) < 0 or group.max(initial=0) >= spec.beta:
        raise InputError(f"explicit plan: 'group' values must lie in [0, {spec.beta})")
    return comp[:n], group[:n]
