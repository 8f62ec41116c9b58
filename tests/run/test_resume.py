"""--resume skips finished ids and gives the same results as an uninterrupted run."""
import json

import h5py
import numpy as np
from conftest import rshard


def test_resume_completes_a_partial_run(tmp_path, tiny_bert):
    rng = np.random.default_rng(0)
    lines = [json.dumps({"id": f"p{i}", "text": " ".join(f"t{x}" for x in rng.integers(0, 90, rng.integers(1, 40)))})
             for i in range(9)]
    full = tmp_path / "full.jsonl"
    full.write_text("\n".join(lines) + "\n")
    half = tmp_path / "half.jsonl"
    half.write_text("\n".join(lines[:4]) + "\n")
    base = ["run", "--model", tiny_bert, "--alpha", 2, "--beta", 1, "--batch-tokens", 50, "--quiet",
            "--allow-weak-plan"]  # beta = 1: not private, small and fast
    assert rshard(4, base + ["--prompts", full, "--out", tmp_path / "a.h5"]).returncode == 0
    assert rshard(4, base + ["--prompts", half, "--out", tmp_path / "b.h5"]).returncode == 0
    resumed = rshard(4, base + ["--prompts", full, "--out", tmp_path / "b.h5", "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "4 prompts already" in resumed.stderr
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        assert list(a["ids"][()]) == list(b["ids"][()]) == [f"p{i}".encode() for i in range(9)]
        np.testing.assert_allclose(a["embeddings"][()], b["embeddings"][()], atol=1e-6)
