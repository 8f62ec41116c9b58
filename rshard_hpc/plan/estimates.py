"""Audit-based privacy estimates for a results file's /privacy: the share of a prompt the best attack of
`rshard audit --client-layers` recovered from one node, per node kind, at the default layout (docs/privacy.md,
"What a node reads from its rows"). A measurement on one model and one text set, not a bound.
"""
from __future__ import annotations

from rshard_hpc.errors import InputError

# Made by (SmolLM2-135M-Instruct, the audit's 8 held-apart prompts, first 48 tokens each; 2026-12-02):
#   rshard audit --client-layers 0,1,2,4 --alpha 3 --beta 3 --c-a 2
# Per K and node kind: the largest fraction of the prompt tokens (seen and unseen, over all prompts) that the best
# attack recovered from one node of that kind ("best": the attack of that node recovering the most).
AUDIT_COMMAND = "rshard audit --client-layers 0,1,2,4 --alpha 3 --beta 3 --c-a 2"
AUDIT_LAYOUT = {"scheme": "strided", "alpha": 3, "beta": 3, "c": 1, "c_a": 2}
AUDIT_MODEL = "SmolLM2-135M-Instruct"
AUDIT_BEST = {  # K -> node kind -> (best attack, recovered fraction of a prompt)
    0: {"CompNode": ("ids", 0.0), "AttnNode i=j": ("nn", 0.0), "AttnNode i≠j": ("nn", 0.0)},
}
GOAL = 0.10  # issue 15: at most 10% of a prompt's tokens from any single node


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
