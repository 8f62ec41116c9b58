"""The real all-MiniLM-L6-v2: the reference forward and the sharded CLI job against sentence-transformers."""
import json
import os

import h5py
import numpy as np
import pytest
from conftest import REPO, rshard

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LONG = " ".join(["Token-sharded inference spreads every prompt over many ranks."] * 40)  # > 256 tokens
TEXTS = [json.loads(line)["text"] for line in (REPO / "inputs" / "sample.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def st_model():
    st = pytest.importorskip("sentence_transformers", reason="needs sentence-transformers (pip install .[test])")
    from rshard_hpc.models.registry import bundled_source

    return st.SentenceTransformer(str(bundled_source("all-MiniLM-L6-v2")), device="cpu")


def cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def test_reference_forward_matches_sentence_transformers(minilm, st_model):
    from rshard_hpc.models import load_model, weights
    from rshard_hpc.models.reference import reference_forward
    from rshard_hpc.models.tokenizer import TextCodec

    codec = TextCodec(minilm, weights.read_config(minilm))
    rows = reference_forward(load_model(minilm), [np.array(codec.encode(t)) for t in TEXTS])
    ours = np.stack([r.mean(0) for r in rows])
    assert cosines(ours, st_model.encode(TEXTS)).min() >= 0.99999


@pytest.mark.parametrize("alpha,beta,extra", [(2, 2, []), (3, 2, ["--c", "2", "--c-a", "3"])])
def test_sharded_cli_matches_sentence_transformers(minilm, st_model, tmp_path, alpha, beta, extra):
    prompts = tmp_path / "p.jsonl"
    texts = TEXTS + [LONG]
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "out.h5"
    result = rshard(1 + alpha + beta * beta,
                    ["run", "--task", "embed", "--model", minilm, "--prompts", prompts, "--out", out,
                     "--alpha", alpha, "--beta", beta, "--truncate", "--batch-tokens", 300, "--allow-weak-plan"] + extra)
    assert result.returncode == 0, result.stderr
    assert "results:" in result.stderr and "tokens/s" in result.stderr
    with h5py.File(out) as f:
        ids = [x.decode() for x in f["ids"][()]]
        emb = f["embeddings"][()]
        assert f.attrs["alpha"] == alpha and f.attrs["beta"] == beta and f.attrs["task"] == "embed"
        assert f.attrs["world_size"] == 1 + alpha + beta * beta
        assert "json" in f["privacy"] and "mpi_s" in f["stats"]
        assert len(f["stats"]["rank"]) == 1 + alpha + beta * beta
    assert ids == [f"q{i}" for i in range(len(texts))]
    ref = st_model.encode(texts)  # sentence-transformers truncates at 256 tokens, as --truncate does
    cos = cosines(emb, ref)
    print("min cosine", cos.min(), "max abs", np.abs(emb - ref).max())
    assert cos.min() >= 0.99999, cos
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_sharded_cli_bf16_matches_sentence_transformers(minilm, st_model, tmp_path):
    """--dtype bfloat16 (CPU emulation of the GPU's bf16 path) stays close to sentence-transformers in fp32,
    moves fewer bytes than float32, and records its precision."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    emb, moved = {}, {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.h5"
        result = rshard(7, ["run", "--model", minilm, "--prompts", prompts, "--out", out, "--alpha", 2, "--beta", 2,
                            "--allow-weak-plan", "--dtype", dtype])
        assert result.returncode == 0, result.stderr
        with h5py.File(out) as f:
            assert f.attrs["precision"] == dtype
            emb[dtype] = f["embeddings"][()]
            moved[dtype] = int(f["stats"]["bytes_sent"][()].sum())
    cos = cosines(emb["bfloat16"], st_model.encode(TEXTS))
    print("bf16 min cosine", cos.min(), "bytes", moved)
    assert 0.999 <= cos.min() < 0.9999999  # close, and not float32 in disguise
    assert moved["bfloat16"] < 0.55 * moved["float32"]  # q, k, v and partial o travel as 2-byte bf16
