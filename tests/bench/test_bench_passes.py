"""`rshard bench passes`: one layer's pieces timed one by one (CPU here; the GPU case skips without a GPU)."""
import importlib.util

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require_gpu

from rshard_hpc.cli import main

PIECES = ["pre: rms_norm + round", "pre: q/k/v GEMM", "pre: RoPE on q and k", "pre: q, k, v to wire + pack",
          "attn: partial attention (prepared)", "attn: pack partial", "post: unpack + merge partials",
          "post: O GEMM", "post: residual + rms_norm + round", "post: gate/up GEMM", "post: silu(gate) * up",
          "post: down GEMM + residual", "step: RoPE tables (once a step)", "whole: model.pre", "whole: model.post",
          "sum of the pieces"]
CHAIN = ["chain: rms_norm + round", "chain: RoPE angles + RoPE on q and k", "chain: q, k, v to wire + pack",
         "chain: unpack + merge partials", "chain: residual + rms_norm + round", "chain: silu(gate) * up",
         "chain: whole model.pre", "chain: whole model.post"]  # GPU only: the CuPy chains the fused kernels replaced


def _table_rows(text):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "piece":
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_passes_cpu_table(tmp_path, dtype):
    out = tmp_path / "passes.md"
    args = ["bench", "passes", "--shape", "tiny", "--tokens", "48", "--repeat", "2", "--dtype", dtype,
            "--out", str(out)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    rows = _table_rows(first.output)
    for piece in PIECES:
        assert piece in rows, f"{piece!r} missing from\n{first.output}"
        host, device, _ = rows[piece]
        assert float(host) >= 0 and float(device) > 0
    shares = [int(r[2].rstrip("%")) for name, r in rows.items() if r[2].endswith("%") and name != "sum of the pieces"]
    assert 95 <= sum(shares) <= 105  # rounded shares of the pieces' total
    if _has_transformers():
        assert "torch LlamaDecoderLayer (SDPA)" in rows
    assert f"device cpu, {dtype}" in out.read_text()
    second = CliRunner().invoke(main, args + ["--no-torch"])
    assert second.exit_code == 0, second.output
    assert out.read_text().count("one layer's pieces") == 2  # appended, not overwritten
    assert "torch LlamaDecoderLayer" not in second.output
    assert not any(piece in rows for piece in CHAIN)  # on a CPU the chain is the code the pieces run


def _has_transformers():
    return importlib.util.find_spec("transformers") is not None


def test_bench_passes_pieces_follow_the_post_pass():
    """The post-pass pieces chained by hand give Llama.post's output, and the pre-pass pieces Llama.pre's: the
    pieces time what the model runs."""
    from rshard_hpc.bench.common import bench_config
    from rshard_hpc.bench.passes import _LayerPieces
    from rshard_hpc.models.llama import Llama
    from rshard_hpc.models.random_init import random_tensors

    cfg = bench_config("tiny", 40, layers=1)
    model = Llama(cfg, random_tensors(cfg, seed=1), np, dtype="float32")
    layer = _LayerPieces(model, 40, "float32", seed=2)
    pieces = dict(layer.pieces())
    want = model.post(0, layer.h, layer.merged)
    np.testing.assert_array_equal(pieces["post: down GEMM + residual"](), want)
    for got, want in zip((layer.q, layer.k, layer.v), model.pre(0, layer.h, layer.pos)):
        np.testing.assert_array_equal(got, want)


def test_bench_passes_rejects_bad_arguments():
    result = CliRunner().invoke(main, ["bench", "passes", "--tokens", "0"])
    assert result.exit_code != 0 and "--tokens and --repeat must be >= 1" in result.output


def test_bench_passes_gpu(tmp_path):
    require_gpu()
    out = tmp_path / "passes.md"
    result = CliRunner().invoke(main, ["bench", "passes", "--device", "gpu", "--shape", "tiny", "--tokens", "64",
                                       "--repeat", "3", "--dtype", "bfloat16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = _table_rows(result.output)
    assert all(piece in rows for piece in PIECES + CHAIN), result.output
    assert "device gpu, bfloat16" in out.read_text()
