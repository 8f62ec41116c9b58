"""The rows of `rshard bench suite` (suite.py runs them): each workload's sharded job against its anchor, as the
table's rows. A row function takes the suite (a bench.suite.Suite: its jobs, anchors, sizes, notes) and a
bench.suite.Setting (layout, device, MPS) and returns its rows; ROWS maps the row names to them. (Not imported
here: suite.py imports this module.)"""
from __future__ import annotations

from pathlib import Path
import numpy as np

from rshard_hpc.bench.anchors import ST_BATCH
from rshard_hpc.bench.generate_row import generate_file
from rshard_hpc.bench.job_outputs import bench_row, max_abs
from rshard_hpc.bench.prompts import token_prompts, word_prompts, write_prompts
from rshard_hpc.bench.suite_rows import Row, RowFailed

LINE_WORDS = (6, 16)  # cpu-lines: words a prompt (the 2,000 one-line prompts: 14 tokens each on average)


def embed_file(suite, setting) -> list:
    n = suite.sizes.embed_prompts
    texts = suite.anchors.kept(("embed-file texts", n), lambda: word_prompts(n, seed=0))
    prompts = suite.anchors.kept(("embed-file file", n), lambda: write_prompts(suite._work / "embed_file.jsonl",
                                                                               texts))
    anchor = suite.anchors.kept(("st", n), lambda: suite.anchors.st_encode(texts))
    wall = suite.anchors.kept(("st wall", n), lambda: suite.anchors.st_wall(prompts, suite.opts.timeout_s))
    # the median of `repeats` jobs: one job's time moves by up to 2x on a GPU that 13 ranks share (1.33-2.79 s)
    job_s, wall_s, tokens, diff, times = _median_jobs(suite, setting, prompts, "embed_file", anchor)
    ratio = anchor["seconds"] / job_s
    workload = f"embedding {n} prompts of 12-200 words ({tokens:,} tokens)"
    return [Row(workload, setting.label(), f"{job_s:.2f} s in the job{_aside(_spread(times, 1.0, 2))}",
                f"{anchor['seconds']:.2f} s "
                f"(sentence-transformers fp32, batch {ST_BATCH})", ratio, ">= 0.5x job time", ratio >= 0.5, diff),
            Row("same job: wall, and time outside the job", setting.label(),
                f"wall {wall_s:.1f} s ({wall_s - job_s:.1f} s outside the job)",
                f"wall {wall['wall_s']:.1f} s ({wall['wall_s'] - wall['encode_s']:.1f} s outside encode)",
                wall["wall_s"] / wall_s, "wall <= 2x the anchor's", wall_s <= 2 * wall["wall_s"], diff)]


def embed_small(suite, setting) -> list:
    n = suite.sizes.small_prompts
    texts = word_prompts(n, seed=1)
    prompts = suite.anchors.kept(("small file", n), lambda: write_prompts(suite._work / "embed_small.jsonl", texts))
    anchor = suite.anchors.kept(("st", "small", n), lambda: suite.anchors.st_encode(texts))
    wall = suite.anchors.kept(("st wall", "small", n), lambda: suite.anchors.st_wall(prompts, suite.opts.timeout_s))
    job = suite.embed_job(setting, prompts, "embed_small")
    where = "" if job["backend"] == setting.device else f", on the {job['backend'].upper()}s: a small job"
    return [Row(f"a {n}-prompt embedding job", setting.label(),
                f"{job['wall_s']:.2f} s wall ({job['job_s']:.2f} s in the job{where})",
                f"{wall['wall_s']:.2f} s wall (sentence-transformers, fresh process)", wall["wall_s"] / job["wall_s"],
                "<= 3 s wall", job["wall_s"] <= 3.0, f"{max_abs(job['embeddings'], anchor['embeddings']):.1e}")]


def decode(suite, setting) -> list:
    s = suite.sizes
    row = bench_row(suite.bench_table(setting, "float32"), s.decode_tokens)
    plain = suite.anchors.kept(("decode", s.shape, s.decode_tokens, s.decode_steps),
                               lambda: suite.anchors.decode_ms(s.shape, s.decode_tokens, s.layers, s.decode_steps, 0))
    ours = float(row["decode_ms"])
    if row.get("decode_split", "-") != "-":
        suite.notes.append(f"decode step at {setting.label()}, ms per phase on the slowest rank (GPU: device/host): "
                           f"{row['decode_split']}")
    return [Row(f"decode step, {s.shape} shape, {s.decode_tokens} prompt, fp32", setting.label(),
                f"{ours:.1f} ms/step (median of {s.decode_steps})", f"{plain:.1f} ms/token (transformers generate "
                f"fp32)", plain / ours, "<= plaintext", ours <= plain, row.get("decode_logit_diff", "-"))]


def prefill(length_field: str, targets: dict):
    def rows(suite, setting) -> list:
        n = getattr(suite.sizes, length_field)
        out = []
        for dtype, (target, floor) in targets.items():
            try:
                row = bench_row(suite.bench_table(setting, dtype), n)
            except RowFailed as exc:
                out.append(Row(f"prefill {n} tokens, {dtype}", setting.label(), "", target=target, failed=str(exc)))
                continue
            ratio = float(row["ratio"])
            out.append(Row(f"prefill {n} tokens, {dtype}, {suite.sizes.shape} shape", setting.label(),
                           f"{row['sharded_tok_s']} tokens/s", f"{row['plain_tok_s']} tokens/s (transformers "
                           f"{dtype})", ratio, target, ratio >= floor, row.get("logit_diff", "-")))
        return out
    return rows


def cpu_one(suite, setting) -> list:
    return _cpu_rows(suite, setting, 1)


def cpu_batch(suite, setting) -> list:
    return _cpu_rows(suite, setting, suite.sizes.cpu_batch)


def _median_jobs(suite, setting, prompts: Path, tag: str, anchor: dict) -> tuple:
    """`repeats` embedding jobs of one prompt file: (median in-job s, median wall s, tokens, the largest output
    difference to the anchor's embeddings, formatted, every job's in-job s)."""
    jobs = [suite.embed_job(setting, prompts, tag) for _ in range(suite.sizes.repeats)]
    job_s, wall_s = float(np.median([j["job_s"] for j in jobs])), float(np.median([j["wall_s"] for j in jobs]))
    diff = f"{max(max_abs(j['embeddings'], anchor['embeddings']) for j in jobs):.1e}"
    return job_s, wall_s, jobs[0]["tokens"], diff, [j["job_s"] for j in jobs]


def _spread(times: list, scale: float, digits: int) -> str:
    """"lo-hi over n jobs" of the jobs' in-job times times `scale` (the median beside it says no more where the
    machine's speed moves between jobs), or "" for a single job."""
    if len(times) < 2:
        return ""
    lo, hi = (scale * t for t in (min(times), max(times)))
    return f"{lo:.{digits}f}-{hi:.{digits}f} over {len(times)} jobs"


def _aside(*parts: str) -> str:
    """" (a; b)" of the non-empty parts, or "" when all are empty."""
    kept = [part for part in parts if part]
    return f" ({'; '.join(kept)})" if kept else ""


def _cpu_rows(suite, setting, count: int) -> list:
    """MiniLM on `count` inputs of cpu_tokens tokens: median of `repeats` jobs against the NumPy forward."""
    from rshard_hpc.models import weights
    from rshard_hpc.models.registry import resolve_model
    from rshard_hpc.models.tokenizer import TextCodec

    s, path = suite.sizes, resolve_model(suite.opts.model)
    texts = suite.anchors.kept(("cpu texts", count), lambda: token_prompts(
        TextCodec(path, weights.read_config(path)), count, s.cpu_tokens, seed=2 + count))
    prompts = write_prompts(suite._work / f"cpu_{count}.jsonl", texts)
    anchor = suite.anchors.kept(("numpy", count), lambda: suite.anchors.numpy_forward(path, texts, batch=count > 1))
    job_s, wall_s, _, diff, times = _median_jobs(suite, setting, prompts, f"cpu_{count}", anchor)
    ratio = anchor["seconds"] / job_s
    if count == 1:
        return [Row(f"CPU: one {s.cpu_tokens}-token input (MiniLM)", setting.label(),
                    f"{job_s:.3f} s in the job{_aside(_spread(times, 1.0, 3), f'{wall_s:.1f} s wall')}",
                    f"{1e3 * anchor['seconds']:.0f} ms "
                    f"(NumPy single-process forward)", ratio, "<= 0.36 s in the job", job_s <= 0.36, diff)]
    per, plain_per = 1e3 * job_s / count, 1e3 * anchor["seconds"] / count
    return [Row(f"CPU: {count} inputs of {s.cpu_tokens} tokens in one job (MiniLM)", setting.label(),
                f"{per:.1f} ms/prompt in the job{_aside(_spread(times, 1e3 / count, 1), f'{wall_s:.1f} s wall')}",
                f"{plain_per:.1f} ms/prompt (NumPy "
                f"single-process forward, one batch)", ratio, "<= 36 ms/prompt and >= 0.5x", per <= 36 and ratio >= 0.5,
                diff)]


def cpu_lines(suite, setting) -> list:
    """The issue's many short prompts: line_prompts one-line prompts in one job (median of `repeats`), per prompt and
    tokens/s, against the NumPy forward of the same prompts in one batch."""
    from rshard_hpc.models.registry import resolve_model

    s, path = suite.sizes, resolve_model(suite.opts.model)
    n = s.line_prompts
    texts = word_prompts(n, *LINE_WORDS, seed=5)
    prompts = suite.anchors.kept(("lines file", n), lambda: write_prompts(suite._work / "cpu_lines.jsonl", texts))
    anchor = suite.anchors.kept(("numpy lines", n), lambda: suite.anchors.numpy_forward(path, texts, batch=True))
    job_s, wall_s, tokens, diff, times = _median_jobs(suite, setting, prompts, "cpu_lines", anchor)
    ratio = anchor["seconds"] / job_s
    return [Row(f"CPU: {n} one-line prompts ({LINE_WORDS[0]}-{LINE_WORDS[1]} words, MiniLM)", setting.label(),
                f"{1e3 * job_s / n:.1f} ms/prompt, {tokens / job_s:,.0f} tokens/s in the job"
                f"{_aside(_spread(times, 1e3 / n, 1), f'{wall_s:.1f} s wall')}",
                f"{1e3 * anchor['seconds'] / n:.1f} ms/prompt (NumPy single-process "
                f"forward, one batch)", ratio, ">= 0.5x", ratio >= 0.5, diff)]


ROWS = {"embed-file": embed_file, "embed-small": embed_small, "decode": decode, "generate-file": generate_file,
        "prefill-512": prefill("prefill_short", {"float32": (">= 0.5x", 0.5), "bfloat16": (">= 0.5x", 0.5)}),
        "prefill-8k": prefill("prefill_long", {"float32": (">= 1x (stay)", 1.0), "bfloat16": (">= 0.5x", 0.5)}),
        "cpu-one": cpu_one, "cpu-batch": cpu_batch, "cpu-lines": cpu_lines}
