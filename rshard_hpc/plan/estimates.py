"""Audit-based privacy estimates for a results file's /privacy: the share of a prompt the best attack of
`rshard audit --client-layers` recovered from one node, per node kind, at the default layout (docs/privacy.md,
"What a node reads from its rows"). A measurement on one model and one text set, not a bound.
"""
from __future__ import annotations

from rshard_hpc.errors import InputError

# Made by (SmolLM2-135M-Instruct, the audit's 8 held-apart prompts, 237 tokens; training text 1,647 tokens; CPU,
# 2026-12-02; K = 0, 1 / 2, 4 / 8, 16 ran as three commands with the same settings, each K is independent):
#   rshard audit --client-layers 0,1,2,4 --match-prompts 1 --alpha 3 --beta 3 --c-a 2 --json --out audit.json
#   rshard audit --client-layers 8,16 --match-nodes "" --no-fill --alpha 3 --beta 3 --c-a 2 --json
# Per K and node kind: the largest fraction of the prompt tokens (seen and unseen, over all prompts) that the best
# attack recovered from one node of that kind (docs/privacy.md has the full table).
AUDIT_COMMAND = "rshard audit --client-layers 0,1,2,4 --match-prompts 1 --alpha 3 --beta 3 --c-a 2"
AUDIT_LAYOUT = {"scheme": "strided", "alpha": 3, "beta": 3, "c": 1, "c_a": 2}
AUDIT_MODEL = "SmolLM2-135M-Instruct"
AUDIT_BEST = {  # K -> node kind -> (best attack, recovered fraction of a prompt)
    0: {"CompNode": ("ids", 0.380), "AttnNode i=j": ("nn", 0.392), "AttnNode i≠j": ("nn", 0.734)},
    1: {"CompNode": ("linear", 0.346), "AttnNode i=j": ("linear", 0.359), "AttnNode i≠j": ("linear", 0.671)},
    2: {"CompNode": ("linear", 0.346), "AttnNode i=j": ("linear", 0.333), "AttnNode i≠j": ("linear", 0.595)},
    4: {"CompNode": ("linear", 0.287), "AttnNode i=j": ("linear", 0.270), "AttnNode i≠j": ("linear", 0.477)},
    8: {"CompNode": ("linear", 0.236), "AttnNode i=j": ("linear", 0.207), "AttnNode i≠j": ("mlp", 0.409)},
    16: {"CompNode": ("mlp", 0.211), "AttnNode i=j": ("linear", 0.198), "AttnNode i≠j": ("mlp", 0.350)},
}
RECOMMENDED_CLIENT_LAYERS = 4  # the knee of the table above (docs/privacy.md, "Decision")
GOAL = 0.10  # issue 15: at most 10% of a prompt's tokens from any single node


def default_client_layers(n_layers: int) -> int:
    """`rshard run`'s K when --client-layers is not given: the audit's knee (RECOMMENDED_CLIENT_LAYERS, on a
    30-layer model) at most, and no more than a quarter of the model's layers, so the client's share of the work
    stays small: SmolLM2 (30 layers) 4, all-MiniLM-L6-v2 (6) 1 (its layer-0 rows, context-free, are the ones a
    vocabulary match reads whole), a model of 3 layers or fewer 0."""
    return min(RECOMMENDED_CLIENT_LAYERS, n_layers // 4)


def audit_estimate(client_layers: int) -> dict:
    """The audit's measured best-attack recovery per node kind for `client_layers` layers on the client.

    For a K the audit did not measure, the largest measured K below it stands in (more client layers are not
    expected to make rows easier to read; "measured_at" says which K the numbers are from)."""
    if client_layers < 0:
        raise InputError(f"client layers must be >= 0 (got {client_layers})")
    measured = max(k for k in AUDIT_BEST if k <= client_layers)
    kinds = AUDIT_BEST[measured]
    worst = max(frac for _, frac in kinds.values())
    return {"client_layers": client_layers, "measured_at": measured, "model": AUDIT_MODEL, "layout": AUDIT_LAYOUT,
            "command": AUDIT_COMMAND,
            "best_attack": {kind: {"attack": a, "recovered_fraction": frac} for kind, (a, frac) in kinds.items()},
            "worst_node_fraction": worst, "goal": GOAL, "meets_goal": worst <= GOAL}
