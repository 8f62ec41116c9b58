"""Write the random models the GPU checks use: SmolLM2-shaped (hidden 576, 9 heads, 3 KV heads, head dim 64).

usage: python tools/make_test_models.py OUT_DIR [N_LAYERS]
Writes OUT_DIR/llama.h5 (causal decoder) and OUT_DIR/bert.h5 (bidirectional encoder, same attention shape).
"""
import sys
from pathlib import Path

from rshard_hpc.models.random_init import tiny_config, write_random_model

out = Path(sys.argv[1])
layers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
shape = dict(hidden=576, n_layers=layers, n_heads=9, n_kv_heads=3, head_dim=64, intermediate=1536,
             vocab_size=1000, max_positions=16384 + 512)
write_random_model(out / "llama.h5", tiny_config("llama", rope_theta=100000.0, **shape), seed=1)
write_random_model(out / "bert.h5", tiny_config("bert", **shape), seed=2)
print(f"wrote {out}/llama.h5 and {out}/bert.h5 ({layers} layers)")
