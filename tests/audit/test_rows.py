"""The extended audit's row attacks (rshard_hpc/audit/rows.py, sweep.py) on a tiny random Llama: every attack reads
the unsharded control at K = 0, the inverters learn rows of a deeper layer, the scores and the fill behave."""
from __future__ import annotations

import numpy as np
import pytest

from rshard_hpc.plan.schemes import PlanSpec, make_plan

torch = pytest.importorskip("torch", reason="the audit's attacks run on PyTorch (CPU)")

from rshard_hpc.audit import rows as R
from rshard_hpc.audit.sweep import run_sweep
from rshard_hpc.audit.sweep_report import format_sweep
from rshard_hpc.audit.torch_llama import TorchLlama


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a small shared CPU machine, intra-op threads fight for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from rshard_hpc.models.random_init import tiny_config, write_random_model

    path = tmp_path_factory.mktemp("rows") / "tiny_llama.h5"
    write_random_model(path, tiny_config("llama"), seed=3)
    return path


@pytest.fixture(scope="module")
def tm(tiny):
    return TorchLlama.from_file(tiny)


def _texts(tm, count, length, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, tm.cfg.vocab_size, length).tolist() for _ in range(count)]


def test_sequence_rows_are_the_engine_rows(tiny, tm):
    from rshard_hpc.audit.attack import observed_rows
    from rshard_hpc.models import load_model

    ids = np.array([5, 17, 3, 88, 41, 9])
    got = tm.sequence_rows(ids, [0, 1])
    for layer in (0, 1):
        want = observed_rows(load_model(tiny), ids, layer)
        for part in ("h", "q", "k", "v"):
            assert np.allclose(got[layer][part].numpy(), want[part], atol=1e-4), (layer, part)


def test_node_rows_follow_the_routing():
    comp, group = make_plan(PlanSpec(alpha=3, beta=3, c=1, c_a=2), 12)
    assert list(R.node_rows("comp1", comp, group, 0)) == ["ids"]  # K = 0: its token ids, outright
    assert list(R.node_rows("comp1", comp, group, 0)["ids"]) == [1, 4, 7, 10]
    assert list(R.node_rows("comp1", comp, group, 2)["h"]) == [1, 4, 7, 10]
    v = R.node_rows("attn0_1", comp, group, 1)
    assert set(v) == {"q", "kv"} and all(group[v["q"]] == 0) and all(group[v["kv"]] == 1)
    assert set(R.node_rows("attn2_2", comp, group, 1)) == {"qkv"}
    assert len(R.node_rows("control_qkv", comp, group, 1)["qkv"]) == 12


def test_every_attack_reads_the_unsharded_control_at_k0(tiny):
    """Control: each attack recovers >= 95% of the unsharded rows at K = 0 (the layer-0 rows are context-free)."""
    probe = TorchLlama.from_file(tiny)
    rep = run_sweep(str(tiny), PlanSpec(alpha=3, beta=3, c=1, c_a=2), client_layers=(0,),
                    prompts=_texts(probe, 2, 16, 1), seeds=_texts(probe, 12, 24, 2), new_tokens=0,
                    match_nodes=(), fill=False)
    res = rep["results"][0]
    for ctl in ("control_h", "control_qkv"):
        for attack in ("nn", "linear", "mlp"):
            t = res[ctl][attack]
            assert t["seen"] == 32 and t["seen_recovered"] >= 0.95 * t["seen"], (ctl, attack, t)
    node = res["attn0_1"]["nn"]  # a sharded AttnNode reads every row it sees at K = 0, and only those
    assert node["seen_recovered"] == node["seen"] < 32
    assert res["comp0"]["nn"]["seen_recovered"] == res["comp0"]["nn"]["seen"]  # its token ids
    assert "| control_qkv | nn |" in format_sweep(rep)


def test_inverters_learn_deeper_rows(tm):
    """Trained on rows of one set of random texts, the inverters read layer-1 hidden rows of other texts far
    above chance (1/V), tokens never seen in training included."""
    train, held = _texts(tm, 40, 24, 3), _texts(tm, 6, 24, 4)

    def rows(texts):
        x = [R._flat(R.features(tm, tm.sequence_rows(t, [1])[1], "h", np.arange(len(t)))) for t in texts]
        return torch.cat(x), torch.as_tensor(np.concatenate(texts))

    x, y = rows(train)
    xh, yh = rows(held)
    for cls in (R.LinearInverter, R.MlpInverter):
        inv = cls("h", tm.embed).fit(x, y)
        assert inv.accuracy(xh, yh) > 0.8, cls.__name__
    unseen = ~torch.isin(yh, y)
    if unseen.any():  # decoding through the embedding table names tokens absent from training
        inv = R.LinearInverter("h", tm.embed).fit(x, y)
        assert (inv.decode(xh[unseen]) == yh[unseen]).float().mean() > 0.5


def test_head_scores_are_the_attention_logits(tm):
    ids = [5, 17, 3, 88, 41, 9, 60, 22]
    rows = tm.sequence_rows(ids, [1])[1]
    qpos, kpos = np.array([1, 4, 7]), np.array([0, 3, 4, 6])
    s = R.head_scores(tm, rows, qpos, kpos)
    assert s.shape == (tm.cfg.n_heads, 3, 4)
    assert torch.isinf(s[:, 0, 1:]).all() and torch.isfinite(s[:, 2]).all()  # causal: keys after a query masked
    q = rows["q"][4].reshape(tm.cfg.n_heads, -1)[0]
    k = rows["k"][3].reshape(tm.cfg.n_kv_heads, -1)[0]
    assert float(s[0, 1, 1]) == pytest.approx(float(q @ k) * tm.scale, rel=1e-5)
    f, pairs = R.pair_features(s, qpos, kpos)
    assert pairs.tolist() == [[1, 0], [4, 0], [4, 3], [7, 0], [7, 3], [7, 4], [7, 6]]
    assert f.shape == (7, 2 * tm.cfg.n_heads + 1)


def test_lm_fill_keeps_known_and_fills_unknown(tm):
    start = R.prior_start(tm, [5, 6])
    hyps = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    known = torch.tensor([[True, False, True, False], [True, True, True, True]])
    out = R.lm_fill(tm, start, hyps, known)
    assert out[1].tolist() == hyps[1].tolist() and out[0, 0] == 10 and out[0, 2] == 12
    with torch.no_grad():
        logits, _ = tm.extend(start[0], out[:1, :1], 2)
    assert int(out[0, 1]) == int(torch.argmax(logits[0, -1]))  # the model's own guess after the hypothesis


@pytest.mark.parametrize("args,message", [(["--client-layers", "1,x"], "comma-separated list"),
                                          (["--client-layers", ","], "at least one layer count"),
                                          (["--client-layers", "0", "--match-prompts", "-1"], "must be >= 0"),
                                          ([], "--prompts is required")])
def test_cli_audit_option_errors(tiny, args, message):
    from click.testing import CliRunner

    from rshard_hpc.cli import main

    res = CliRunner().invoke(main, ["audit", "--model", str(tiny), *args])
    assert res.exit_code != 0 and message in res.output, res.output


def test_cli_audit_client_layers_range(tiny, tmp_path):
    from click.testing import CliRunner

    from rshard_hpc.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("t5 t17 t3 t88 t41 t9\n")
    res = CliRunner().invoke(main, ["audit", "--model", str(tiny), "--prompts", str(prompts), "--seeds",
                                    str(prompts), "--new-tokens", "0", "--client-layers", "0,9"])
    assert res.exit_code != 0 and "--client-layers must lie in [0, 2)" in res.output, res.output
