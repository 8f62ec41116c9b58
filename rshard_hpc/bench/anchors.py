"""The plaintext anchors of the benchmark suite, run in the suite's own process (and one fresh process for
sentence-transformers' wall time): what the sharded jobs are measured against, on the same device."""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from rshard_hpc.bench.launch import job_env, run_command

ST_BATCH = 512  # sentence-transformers' batch size for the anchor (the issue's 0.97 s on an H200)


def torch_device(device: str) -> str:
    import torch

    return "cuda" if device == "gpu" and torch.cuda.is_available() else "cpu"


class Anchors:
    """Each anchor measured once per suite run and kept (every layout and MPS setting compares with it)."""

    def __init__(self, device: str, repeats: int, st_folder: str | None = None):
        self.device, self.repeats = device, repeats
        self._st_folder = st_folder  # sentence-transformers' model folder (None: the bundled package's)
        self._st = None
        self._numpy_model = None
        self._kept = {}

    def kept(self, key, make):
        if key not in self._kept:
            self._kept[key] = make()
        return self._kept[key]

    # ---------------------------------------------------------------- sentence-transformers (embeddings)
    def st_folder(self) -> str:
        if self._st_folder is None:
            from rshard_hpc.models.registry import DEFAULT_MODEL, bundled_source

            self._st_folder = str(bundled_source(DEFAULT_MODEL))
        return self._st_folder

    def st_model(self):
        if self._st is None:
            from sentence_transformers import SentenceTransformer

            # fp32 whatever the folder stores (fp16 safetensors load as fp16 otherwise)
            self._st = SentenceTransformer(self.st_folder(), device=torch_device(self.device)).float()
        return self._st

    def st_encode(self, texts: list) -> dict:
        """Seconds to encode `texts` at batch ST_BATCH in fp32 (median of `repeats` after a warm-up batch) and
        the embeddings (L2-normalized: the model's own Normalize module)."""
        model = self.st_model()
        model.encode(texts[:ST_BATCH], batch_size=ST_BATCH)  # warm-up: kernels, allocator
        runs = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            emb = model.encode(texts, batch_size=ST_BATCH, convert_to_numpy=True)  # returns on the host: synced
            runs.append(time.perf_counter() - t0)
        _free_gpu_memory()
        return {"seconds": float(np.median(runs)), "embeddings": np.asarray(emb, dtype=np.float32)}

    def st_wall(self, prompts_file, timeout_s: float) -> dict:
        """Wall seconds of a fresh process that imports sentence-transformers, loads the model and encodes the
        prompt file (st_anchor.py), and its own split; raises RuntimeError when it fails."""
        done = run_command([sys.executable, "-m", "rshard_hpc.bench.st_anchor", self.st_folder(), prompts_file, torch_device(self.device), ST_BATCH], timeout_s, env=job_env())
        if not done.ok:
            raise RuntimeError(f"sentence-transformers anchor process: {done.why()}")
        split = json.loads(done.stdout.strip().splitlines()[-1])
        return dict(split, wall_s=done.wall_s)

    # ---------------------------------------------------------------- NumPy single-process forward (CPU rows)
    def numpy_forward(self, model_path, texts: list, batch: bool) -> dict:
        """rshard's single-process NumPy forward of `texts` (one ragged batch, or one prompt at a time): seconds
        (median of `repeats` after a warm-up) and the pooled, normalized embeddings."""
        from rshard_hpc.models import load_model, weights
        from rshard_hpc.models.reference import reference_forward
        from rshard_hpc.models.tokenizer import TextCodec

        if self._numpy_model is None:
            self._numpy_model = load_model(model_path), TextCodec(model_path, weights.read_config(model_path))
        model, codec = self._numpy_model
        seqs = [np.array(codec.encode(t)) for t in texts]
        groups = [seqs] if batch else [[s] for s in seqs]

        def forward():
            return [rows for group in groups for rows in reference_forward(model, group)]

        forward()
        runs = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            rows = forward()
            runs.append(time.perf_counter() - t0)
        return {"seconds": float(np.median(runs)), "embeddings": np.stack([_mean_normalized(r) for r in rows])}

    # ---------------------------------------------------------------- transformers generate (decode)
    def decode_ms(self, shape: str, tokens: int, layers: int | None, steps: int, seed: int) -> float:
        """transformers `generate` fp32 on this device, with bench job's random weights and prompt: ms/token."""
        from rshard_hpc.bench.common import bench_config
        from rshard_hpc.bench.job import bench_prompt, hf_model, plain_decode_ms
        from rshard_hpc.models.random_init import random_tensors

        cfg = bench_config(shape, tokens, layers)
        model = hf_model(cfg, random_tensors(cfg, seed=seed), self.device, "float32")
        ms = plain_decode_ms(model, bench_prompt(cfg, tokens, seed), steps)
        del model
        _free_gpu_memory()
        return ms


def _mean_normalized(rows: np.ndarray) -> np.ndarray:
    vec = rows.astype(np.float64).mean(axis=0)
    return (vec / max(np.linalg.norm(vec), 1e-12)).astype(np.float32)


def _free_gpu_memory() -> None:
    """Hand torch's cached GPU memory back before the next job's ranks need it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
