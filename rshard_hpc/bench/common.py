"""What the benchmarks share: the random-weight Llama shapes and the table file they append to."""
from __future__ import annotations

from pathlib import Path

from rshard_hpc.models.config import ModelConfig
from rshard_hpc.models.random_init import tiny_config

SHAPES = {  # name -> ModelConfig overrides for a Llama of that shape
    "smollm2": dict(name="SmolLM2-135M-shaped", hidden=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                    intermediate=1536, vocab_size=49152, rope_theta=100000.0, tie_embeddings=True),
    "llama-1b": dict(name="Llama-3.2-1B-shaped", hidden=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                     intermediate=8192, vocab_size=128256, rope_theta=500000.0, tie_embeddings=True),
    "llama-8b": dict(name="Llama-3.1-8B-shaped", hidden=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                     intermediate=14336, vocab_size=128256, rope_theta=500000.0, tie_embeddings=False),
    "tiny": dict(name="tiny", hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate=128,
                 vocab_size=97),
}


def bench_config(shape: str, tokens: int, layers: int | None = None) -> ModelConfig:
    over = dict(SHAPES[shape])
    if layers:
        over["n_layers"] = layers
    return tiny_config("llama", max_positions=tokens + 1024, eos_token_ids=(), **over)


def append_table(path, text: str) -> None:
    """Append a benchmark table to the file `path` (folders made as needed); nothing when path is empty."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(text + "\n\n")
