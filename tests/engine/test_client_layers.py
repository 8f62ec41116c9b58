"""--client-layers K: the client runs the first K layers on whole prompts and CompNodes receive the layer-K hidden
rows of their positions; exact against the unsharded model for embed and generate, prefill and decode."""
import json
import sys

import h5py
import numpy as np
import pytest
from conftest import REPO, mpiexec, require_gpu, rshard
from test_generate import SCRIPT as GENERATE_SCRIPT
from test_generate import greedy_reference, save_reference

from rshard_hpc.errors import InputError
from rshard_hpc.models import build_model, comp_tensor_keys, load_model, read_model_tensors, weights
from rshard_hpc.models.client_layers import (
    check_client_layers,
    client_config,
    client_tensor_keys,
    load_client_layers,
)
from rshard_hpc.models.reference import reference_forward

EQUIVALENCE = REPO / "tests" / "mpi" / "equivalence.py"
SMALL_LAYOUTS = [(1, 1, 1, 1), (2, 2, 1, 1)]  # (alpha, beta, c, c_a): 3 and 7 ranks


@pytest.fixture(scope="module")
def bert3(tmp_path_factory):
    """A tiny random BERT of 3 layers (K = 2 leaves one to the servers)."""
    from rshard_hpc.models.random_init import tiny_config, write_random_model

    path = tmp_path_factory.mktemp("models") / "bert3.h5"
    write_random_model(path, tiny_config("bert", n_layers=3), seed=5)
    return path


@pytest.mark.parametrize("model", ["bert3", "tiny_llama"])
@pytest.mark.parametrize("k", [1, 2])
def test_comp_nodes_read_only_the_layers_they_run(request, model, k):
    """With K client layers a CompNode reads layers K … L-1 and no embedding table, and its passes on those layers
    are the full model's, bit for bit; asking it to embed fails (it has nothing to embed with)."""
    path = request.getfixturevalue(model)
    cfg = weights.read_config(path)
    keys = comp_tensor_keys(cfg, k)
    assert set(keys) == {key for key in comp_tensor_keys(cfg) if (weights.layer_of(key) or -1) >= k}
    assert keys and not any(key.startswith("embed/") for key in keys)
    full, part = load_model(path), build_model(cfg, read_model_tensors(path, cfg, k))
    rng = np.random.default_rng()
    h = rng.standard_normal((7, cfg.hidden)).astype(np.float32)
    pos = np.arange(7)
    o = rng.standard_normal((7, cfg.n_heads, cfg.head_dim)).astype(np.float32)
    for layer in range(k, cfg.n_layers):
        for a, b in zip(full.pre(layer, h, pos), part.pre(layer, h, pos)):
            assert np.array_equal(a, b)
        assert np.array_equal(full.post(layer, h, o), part.post(layer, h, o))
    with pytest.raises(KeyError):
        part.embed(np.zeros(2, np.int64), np.arange(2))


@pytest.fixture(scope="module")
def llama3_reference(tiny_llama, tmp_path_factory):
    """Greedy decoding of the unsharded tiny Llama (3 layers) by full recomputation: 5 prompts x 10 tokens."""
    from rshard_hpc.models.llama import load_head

    model = load_model(tiny_llama)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, model.cfg.vocab_size, n) for n in (1, 9, 40, 3, 17)]
    ref = tmp_path_factory.mktemp("ref") / "tiny_k.npz"
    save_reference(ref, prompts, *greedy_reference(model, load_head(tiny_llama, model.cfg), prompts, 10))
    return ref


# ------------------------------------------------------------------------------------------ no MPI
@pytest.mark.parametrize("model_fixture", ["bert3", "tiny_llama"])
@pytest.mark.parametrize("k", [1, 2])
def test_client_layers_equal_the_cut_model(request, model_fixture, k):
    """ClientLayers over a prefill, then (decoders) one position a step with its KV cache, equals the reference
    forward of the model cut to its first K layers over the whole sequences; it reads only those K layers."""
    path = request.getfixturevalue(model_fixture)
    cfg = weights.read_config(path)
    layers = load_client_layers(path, cfg, k)
    keys = client_tensor_keys(cfg, k)
    assert not any(key.startswith(f"layers/{k:03d}/") for key in keys) and f"layers/{k - 1:03d}/wq" in keys
    assert layers.weight_bytes == sum(weights.read_tensors(path, keys)[key].nbytes for key in keys)
    cut = build_model(client_config(cfg, k), weights.read_tensors(path, keys))
    rng = np.random.default_rng(k)
    seqs = [rng.integers(3, cfg.vocab_size, n) for n in (7, 1, 30)]
    want = reference_forward(cut, seqs)
    # an encoder's one step; a decoder's prefill of all but the last 3 positions, then one position a step
    cuts = [max(1, len(s) - 3) if cfg.causal else len(s) for s in seqs]
    steps = [[(0, c) for c in cuts]] + [[(min(c + t, len(s)), min(c + t + 1, len(s))) for c, s in zip(cuts, seqs)]
                                        for t in range(3 if cfg.causal else 0)]
    got = {}  # (seq, pos) -> layer-K row
    for ranges in steps:
        where = [(b, p) for b, (a, e) in enumerate(ranges) for p in range(a, e)]
        got.update(zip(where, _forward(layers, seqs, ranges)))
    for b, s in enumerate(seqs):
        np.testing.assert_allclose(np.stack([got[(b, p)] for p in range(len(s))]), want[b], atol=1e-5)


def _forward(layers, seqs, ranges):
    ids = np.concatenate([s[a:b] for s, (a, b) in zip(seqs, ranges)])
    pos = np.concatenate([np.arange(a, b) for a, b in ranges])
    seq = np.concatenate([np.full(b - a, i) for i, (a, b) in enumerate(ranges)])
    return layers.forward(ids, pos, seq)


def test_bad_client_layers_are_refused():
    check_client_layers(0, 3)
    check_client_layers(2, 3)
    with pytest.raises(InputError, match="--client-layers must be >= 0"):
        check_client_layers(-1)
    with pytest.raises(InputError, match="--client-layers 3 leaves no layer to the servers: .* has 3 layers"):
        check_client_layers(3, 3)


def test_resume_fingerprint_records_client_layers(bert3):
    from rshard_hpc.engine.generate import GenerateSettings
    from rshard_hpc.run.fingerprint import check_same, job_fingerprint
    from rshard_hpc.run.options import RunOptions

    opts = RunOptions(alpha=2, beta=2)
    cfg = weights.read_config(bert3)
    fps = [job_fingerprint(RunOptions(alpha=2, beta=2, client_layers=k), cfg, "w", GenerateSettings(),
                           opts.plan_spec()) for k in (0, 1, 2)]
    assert len({json.dumps(fp, sort_keys=True) for fp in fps}) == 3
    with pytest.raises(InputError, match="client_layers: file 1, this run 0"):
        check_same("o.h5", fps[1], fps[0])


# ------------------------------------------------------------------------------------------ mpiexec, engine
@pytest.mark.parametrize("alpha,beta,c,c_a", SMALL_LAYOUTS)
@pytest.mark.parametrize("k", [0, 1, 2])
def test_embed_client_layers_equal_reference(bert3, k, alpha, beta, c, c_a):
    """Ragged batch (1 to 237 tokens), two batches: max abs diff to the unsharded forward <= 1e-5 (collective)."""
    result = mpiexec(1 + alpha + beta * beta, [sys.executable, EQUIVALENCE, bert3, alpha, beta, c, c_a, 3, "float32", k])
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"K={k}: max abs diff" in result.stdout


def test_bf16_client_layers(tiny_llama):
    """--dtype bfloat16: the client's layers round q, k, v as the wire does; within 2e-2 relative of float32."""
    result = mpiexec(7, [sys.executable, EQUIVALENCE, tiny_llama, 2, 2, 1, 1, 5, "bfloat16", 1])
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "K=1: max relative error to float32" in result.stdout


@pytest.mark.parametrize("k", [1, 2])
def test_minilm_client_layers_equal_reference(minilm, k):
    result = mpiexec(7, [sys.executable, EQUIVALENCE, minilm, 2, 2, 1, 1, 3, "float32", k])
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("alpha,beta,c,c_a", SMALL_LAYOUTS)
@pytest.mark.parametrize("k", [0, 1, 2])
def test_tiny_llama_generation_with_client_layers_is_exact(tiny_llama, llama3_reference, k, alpha, beta, c, c_a):
    """Prefill logits within 1e-3 and 10 greedy tokens identical to the unsharded model (decode steps run their
    first K layers on the client, against its own KV cache)."""
    result = mpiexec(1 + alpha + beta * beta,
                     [sys.executable, GENERATE_SCRIPT, tiny_llama, llama3_reference, alpha, beta, c, c_a, "cpu", k])
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"K={k}:" in result.stdout


# ------------------------------------------------------------------------------------------ `rshard run`
def _run(tmp_path, args, world=7):
    exits = tmp_path / "exits"
    exits.mkdir(exist_ok=True)
    for old in exits.glob("*.exit"):
        old.unlink()
    result = rshard(world, ["run", "--alpha", 2, "--beta", 2, "--quiet", "--allow-weak-plan"] + args,
                    env={"RSHARD_EXIT_DIR": str(exits)})
    return result, {p.stem: int(p.read_text()) for p in exits.glob("*.exit")}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    lines = [{"id": "a", "text": " ".join(f"t{i}" for i in range(3, 40))}, {"id": "b", "text": "t5 t6 t7 t8 t9"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_run_embed_with_client_layers(tmp_path, bert3, prompt_file):
    """Embeddings equal K = 0's; /privacy records K and CompNodes' ledgers say hidden@1, never token ids; a resume
    with another K is refused, naming client_layers; `rshard show` says so."""
    from rshard_hpc.plan.ledger import check_ledger
    from rshard_hpc.plan.schemes import PlanSpec

    outs = {}
    for k in (0, 1):
        outs[k] = tmp_path / f"k{k}.h5"
        result, codes = _run(tmp_path, ["--model", bert3, "--prompts", prompt_file, "--out", outs[k],
                                        "--client-layers", k])
        assert result.returncode == 0, result.stderr
    with h5py.File(outs[0]) as f0, h5py.File(outs[1]) as f1:
        np.testing.assert_allclose(f1["embeddings"][()], f0["embeddings"][()], atol=1e-5)
        report = json.loads(f1["privacy/json"][()])
        docs = [json.loads(x) for x in f1["privacy/ledger"].asstr()[()]]
        assert json.loads(f0["privacy/json"][()])["client_layers"] == 0
    assert report["client_layers"] == 1 and report["comp_input"] == "hidden@1" and report["n_layers"] == 3
    assert check_ledger(docs, PlanSpec("strided", 2, 2, 1, 1), causal=False)["consistent"]
    comp_forms = {form for doc in docs for entry in doc["ranks"].values() if entry["node"].startswith("comp")
                  for forms in entry["prompts"].values() for form in forms}
    assert comp_forms == {"hidden@1", "partial"}
    resumed, codes = _run(tmp_path, ["--model", bert3, "--prompts", prompt_file, "--out", outs[1], "--resume"])
    assert resumed.returncode != 0 and "client_layers: file 1, this run 0" in resumed.stderr, resumed.stderr
    assert len(codes) == 7 and all(code != 0 for code in codes.values()), codes
    shown = rshard(1, ["show", outs[1]])
    assert "client:    ran the first 1 layers; CompNodes received hidden@1 rows" in shown.stdout, shown.stdout


def test_run_generate_with_client_layers(tmp_path, tiny_llama, prompt_file):
    """Greedy token ids with --client-layers 2 equal --client-layers 0's (prefill and decode)."""
    ids = {}
    for k in (0, 2):
        out = tmp_path / f"g{k}.h5"
        result, _ = _run(tmp_path, ["--task", "generate", "--model", tiny_llama, "--prompts", prompt_file, "--out", out,
                                    "--max-new-tokens", 8, "--client-layers", k])
        assert result.returncode == 0, result.stderr
        with h5py.File(out) as f:
            ids[k] = [list(x) for x in f["generated/token_ids"][()]]
            assert json.loads(f["privacy/json"][()])["client_layers"] == k
    assert ids[0] == ids[2] and all(len(x) >= 1 for x in ids[0])


@pytest.mark.parametrize("k,message", [(-1, "--client-layers must be >= 0"),
                                       (3, "--client-layers 3 leaves no layer to the servers")])
def test_bad_client_layers_fail_on_every_rank(tmp_path, bert3, prompt_file, k, message):
    out = tmp_path / "o.h5"
    result, codes = _run(tmp_path, ["--model", bert3, "--prompts", prompt_file, "--out", out, "--client-layers", k])
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert result.stderr.count("rshard: error:") == 1, "said once, by rank 0"
    assert sorted(codes) == [f"rank{r}" for r in range(7)] and all(c != 0 for c in codes.values()), codes
    assert not out.exists()


# ------------------------------------------------------------------------------------------ GPU
@pytest.fixture(scope="module")
def gpu():
    return require_gpu()


def test_client_layers_on_gpu_equal_numpy(gpu, tiny_llama):
    cfg = weights.read_config(tiny_llama)
    host, device = load_client_layers(tiny_llama, cfg, 2), load_client_layers(tiny_llama, cfg, 2, xp=gpu)
    seqs = [np.random.default_rng(0).integers(3, cfg.vocab_size, n) for n in (5, 33)]
    ranges = [(0, len(s)) for s in seqs]
    np.testing.assert_allclose(gpu.asnumpy(_forward(device, seqs, ranges)), _forward(host, seqs, ranges), atol=1e-4)


@pytest.mark.parametrize("k", [1, 2])
def test_tiny_llama_gpu_generation_with_client_layers(gpu, tiny_llama, llama3_reference, k):
    """The GPU path: workers and the client's K layers on CuPy (the client on its node's GPU)."""
    result = mpiexec(7, [sys.executable, GENERATE_SCRIPT, tiny_llama, llama3_reference, 2, 2, 1, 1, "gpu", k],
                     timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
