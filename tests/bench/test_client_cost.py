"""`rshard bench client`: the FLOPs and bytes estimate of --client-layers K, and its measurement on a tiny model."""
import pytest
from click.testing import CliRunner

from rshard_hpc.bench.client_cost import (
    client_estimate,
    estimate_table,
    layer_flops,
    measure,
)
from rshard_hpc.bench.common import bench_config
from rshard_hpc.cli import main as cli_main


@pytest.mark.parametrize("shape,params", [("smollm2", 134.5e6), ("llama-1b", 1.236e9), ("llama-8b", 8.03e9)])
def test_shapes_have_their_models_parameter_counts(shape, params):
    cfg = bench_config(shape, 128)
    embed = cfg.vocab_size * cfg.hidden * (1 if cfg.tie_embeddings else 2)
    total = cfg.n_layers * (cfg.layer_matrix_params + 2 * cfg.hidden) + embed + cfg.hidden
    assert total == pytest.approx(params, rel=0.01)


def test_flops_of_a_prefill_equal_its_decode_steps():
    """A prompt of n tokens costs what n one-token steps against the growing cache cost (causal attention)."""
    cfg = bench_config("smollm2", 64)
    assert layer_flops(cfg, 64) == pytest.approx(sum(layer_flops(cfg, 1, p) for p in range(64)))
    e1, e2 = client_estimate(cfg, 1, 64), client_estimate(cfg, 2, 64)
    assert e2["prefill_gflop"] == pytest.approx(2 * e1["prefill_gflop"]) and e2["layers_mb"] == 2 * e1["layers_mb"]
    assert "| llama-8b | 2 of 32 |" in estimate_table([1, 2], 128)


def test_measure_on_a_tiny_model(tiny_llama, tmp_path):
    row = measure(tiny_llama, 2, 16, repeat=1)
    assert row["k"] == 2 and row["prefill_s"] > 0 and row["decode_ms"] > 0
    assert row["kv_cache_mb"] == pytest.approx(2 * 2 * (16 + 8) * 2 * 16 * 4 / 1e6)  # K, k+v, tokens, Hkv, D, fp32
    out = tmp_path / "client.md"
    result = CliRunner().invoke(cli_main, ["bench", "client", "--model", str(tiny_llama), "--k", "1", "--tokens", "8",
                                           "--repeat", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "measured client cost" in out.read_text() and "| llama-1b | 1 of 16 |" in result.output
