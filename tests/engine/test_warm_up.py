"""The set-up warm-up (run/job.py: worker.warm_up on GPU ranks, forced on CPUs with RSHARD_WARM_UP=1) leaves no
trace in the results: the same job with and without it writes identical embeddings and generated tokens, with
client layers and without, and β = 2 (query groups with no rows)."""
import os

import h5py
import numpy as np
import pytest

from conftest import rshard


def _job(tmp_path, name, warm: str, args):
    out = tmp_path / name
    env = {**os.environ, "RSHARD_WARM_UP": warm}
    result = rshard(7, ["run", "--out", out, "--alpha", 2, "--beta", 2, "--quiet", "--allow-weak-plan"] + args,
                    env=env)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("client_layers", [0, 1])
def test_warm_up_changes_no_embedding(tmp_path, tiny_bert, client_layers):
    prompts = tmp_path / "p.txt"
    prompts.write_text("t1 t2 t3 t4 t5 t6 t7 t8 t9\nt3\nt4 t5 t6\n")
    args = ["--model", tiny_bert, "--prompts", prompts, "--client-layers", client_layers]
    got = []
    for warm in ("1", "0"):
        with h5py.File(_job(tmp_path, f"e{warm}.h5", warm, args)) as f:
            got.append(f["embeddings"][()])
    assert got[0].shape == (3, got[0].shape[1]) and np.array_equal(got[0], got[1])


def test_warm_up_changes_no_generated_token(tmp_path, tiny_llama):
    prompts = tmp_path / "p.txt"
    prompts.write_text("t5 t6 t7\nt8\nt9 t10 t11 t12 t13\n")
    args = ["--task", "generate", "--model", tiny_llama, "--prompts", prompts, "--max-new-tokens", 6,
            "--client-layers", 1]
    got = []
    for warm in ("1", "0"):
        with h5py.File(_job(tmp_path, f"g{warm}.h5", warm, args)) as f:
            got.append([list(x) for x in f["generated/token_ids"][()]])
    assert got[0] == got[1] and all(len(x) == 6 for x in got[0])
