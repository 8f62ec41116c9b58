"""The suite's batched-generation row (issue 13): `rshard run --task generate` on a prompt file, every prompt in one
batch, against transformers `generate` on the same device with the same weights (the bundled SmolLM2, loaded by
transformers from the same GGUF file) and the same token ids, batched with left padding, greedy. Reported:
generated tokens/s of each side (prefill included, each sequence counted up to and including its end-of-sequence
token), and how many prompts' generated tokens are identical.
"""
from __future__ import annotations

import time

from rshard_hpc.bench.job_outputs import read_generated
from rshard_hpc.bench.prompts import word_prompts, write_prompts
from rshard_hpc.bench.suite_rows import Row, RowFailed

TARGET = "report (tokens/s)"  # the issue asks for the number, with no threshold


def generate_file(suite, setting) -> list:
    s = suite.sizes
    texts = word_prompts(s.gen_prompts, min_words=8, max_words=40, seed=4)
    prompts = write_prompts(suite._work / "generate.jsonl", texts)
    job = _generate_job(suite, setting, prompts)
    anchor = suite.anchors.kept(("generate-file", s.gen_prompts, s.gen_new_tokens),
                                lambda: hf_generate(texts, s.gen_new_tokens, suite.opts.device))
    if len(job["token_ids"]) != len(anchor["token_ids"]):
        raise RowFailed(f"the job generated for {len(job['token_ids'])} prompts, the anchor for "
                        f"{len(anchor['token_ids'])}")
    same = sum(a == b for a, b in zip(job["token_ids"], anchor["token_ids"]))
    ours, plain = job["generated"] / job["job_s"], anchor["generated"] / anchor["seconds"]
    return [Row(f"generation, {s.gen_prompts} prompts of 8-40 words in one batch, {s.gen_new_tokens} new tokens, "
                f"SmolLM2 fp32 greedy", setting.label(), f"{ours:,.0f} tokens/s ({job['generated']} tokens in "
                f"{job['job_s']:.2f} s in the job)", f"{plain:,.0f} tokens/s (transformers generate, batched)",
                ours / plain, TARGET, None, f"{same}/{len(texts)} prompts token-identical")]


def _generate_job(suite, setting, prompts) -> dict:
    import re

    from rshard_hpc.models.registry import DEFAULT_DECODER

    out = suite._work / "generate.h5"
    args = ["run", "--task", "generate", "--model", DEFAULT_DECODER, "--prompts", prompts, "--out", out,
            "--overwrite", "--quiet", "--allow-weak-plan", "--max-new-tokens", suite.sizes.gen_new_tokens,
            "--batch-tokens", 1 << 20, "--device", setting.device] + setting.layout.args()
    done = suite.job(setting, args)
    summary = re.search(r"(\d+) tokens generated in ([0-9.]+) s", done.stderr)
    if summary is None:
        raise RowFailed(f"no `done:` line in the job's output: {done.tail()}")
    return {"generated": int(summary[1]), "job_s": float(summary[2]), "token_ids": read_generated(out)}


def hf_generate(texts: list, new_tokens: int, device: str) -> dict:
    """transformers `generate` of every prompt in one left-padded batch, greedy, fp32, on this device, from rshard's
    own token ids of each prompt: seconds (after a warm-up call), generated tokens and the ids per prompt (each up
    to and including its first end-of-sequence token)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rshard_hpc.bench.anchors import _free_gpu_memory, torch_device
    from rshard_hpc.models import weights
    from rshard_hpc.models.registry import DEFAULT_DECODER, bundled_source, resolve_model
    from rshard_hpc.models.tokenizer import TextCodec

    gguf, path = bundled_source(DEFAULT_DECODER), resolve_model(DEFAULT_DECODER)
    cfg = weights.read_config(path)
    codec = TextCodec(path, cfg)
    prompts = [list(codec.encode(t)) for t in texts]
    dev = torch_device(device)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).to(dev).eval()
    eos = sorted(cfg.eos_token_ids)
    pad = eos[0] if eos else 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)

    def run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=eos or None, pad_token_id=pad)

    run()  # warm-up
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = run()
    if dev == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    token_ids = [_until_eos(row[width:].tolist(), eos) for row in out]
    model = None  # the weights go before the next job's ranks need the memory
    _free_gpu_memory()
    return {"seconds": seconds, "generated": int(sum(len(t) for t in token_ids)), "token_ids": token_ids}


def _until_eos(tokens: list, eos: list) -> list:
    """tokens up to and including the first end-of-sequence token (all of them if there is none)."""
    ends = [i for i, t in enumerate(tokens) if t in eos]
    return tokens[:ends[0] + 1] if ends else tokens

