"""The job benchmark runs end to end on CPUs (tiny shape) and its byte counts match the routing."""
import pytest
from conftest import rshard


@pytest.mark.parametrize("dtype,logit_tol", [("float32", 1e-4), ("bfloat16", 0.25)])
def test_bench_job_tiny(tmp_path, dtype, logit_tol):
    """bfloat16: the plaintext side is torch in bf16 (every tensor bf16), ours keeps fp32 norms and
    accumulation, so logits agree to bf16 precision only."""
    pytest.importorskip("transformers", reason="the plaintext side needs transformers")
    out = tmp_path / "bench.md"
    result = rshard(7, ["bench", "job", "--alpha", 2, "--beta", 2, "--shape", "tiny", "--tokens", "64,96",
                        "--decode-steps", 2, "--out", out, "--dtype", dtype])
    assert result.returncode == 0, result.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 64 ") or line.startswith("| 96 ")]
    assert len(rows) == 2
    header = [c.strip() for c in out.read_text().splitlines()[2].strip("|").split("|")]
    for row in rows:
        cells = dict(zip(header, (c.strip() for c in row.strip("|").split("|"))))
        assert cells["layer_bytes"] == cells["expected_layer_bytes"]
        print(dtype, cells["logit_diff"])
        assert float(cells["logit_diff"]) < logit_tol  # the sharded model is the plaintext model
        assert float(cells["decode_logit_diff"]) < logit_tol  # decoding too (the last step's logits)
