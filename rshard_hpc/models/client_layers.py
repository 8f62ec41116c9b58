"""The first K layers on the client (`--client-layers K`, docs/privacy.md): the client holds every prompt whole, so
it can run layers 0 … K-1 over all positions itself and hand each CompNode the layer-K hidden rows of its
positions instead of token ids; the servers start at layer K.

Single-device math, no MPI: the model's own per-token passes around plain attention over every position computed
so far (a KV cache per layer, kept across the decode steps of a batch). The client loads only these K layers
and the embeddings (`client_tensor_keys`)."""
from __future__ import annotations

import dataclasses

import numpy as np

from rshard_hpc.errors import InputError
from rshard_hpc.models import build_model, model_class
from rshard_hpc.models.config import ModelConfig
from rshard_hpc.ops.attention import prepare_attention
from rshard_hpc.ops.precision import to_bf16_bits


def check_client_layers(k: int, n_layers: int | None = None, model: str = "the model") -> None:
    """InputError unless 0 <= k < n_layers (n_layers None: only k >= 0 is checked)."""
    if k < 0:
        raise InputError(f"--client-layers must be >= 0 (0: the client runs no layer), got {k}")
    if n_layers is not None and k >= n_layers:
        raise InputError(f"--client-layers {k} leaves no layer to the servers: {model} has {n_layers} layers, "
                         f"so use at most {n_layers - 1}")


def comp_input_form(k: int) -> str:
    """What a CompNode receives for its positions, as its ledger records it: "token_id", or with k client layers
    the layer-k hidden rows, "hidden@k"."""
    return f"hidden@{k}" if k else "token_id"


def client_config(cfg: ModelConfig, k: int) -> ModelConfig:
    """The model cut to its first k layers (the embeddings and layers 0 … k-1)."""
    return dataclasses.replace(cfg, n_layers=k)


def client_tensor_keys(cfg: ModelConfig, k: int) -> list:
    """The weight-file keys the client needs for its k layers (the head, when generating, is LmHead's)."""
    cut = client_config(cfg, k)
    return model_class(cut).tensor_keys(cut)


def load_client_layers(path, cfg: ModelConfig, k: int, dtype: str = "float32", xp=None) -> ClientLayers | None:
    """The client's first k layers read from a weight file (None for k = 0: the client sends token ids)."""
    from rshard_hpc.models import weights

    check_client_layers(k, cfg.n_layers, cfg.name)
    if k == 0:
        return None
    tensors = weights.read_tensors(path, client_tensor_keys(cfg, k))
    return ClientLayers(build_model(client_config(cfg, k), tensors, dtype=dtype, xp=xp), tensors)


class ClientLayers:
    """Layers 0 … K-1 of `model` (a model built on its first K layers) over whole sequences, with a KV cache per
    layer for decoding: `forward` on the tokens of one engine step (by sequence, then position) gives their
    layer-K hidden rows. `reset` at each batch's start and end."""

    def __init__(self, model, tensors: dict | None = None):
        self.model, self.cfg, self.xp = model, model.cfg, model.xp
        self.n_layers = model.cfg.n_layers
        self.weight_bytes = sum(int(np.asarray(t).nbytes) for t in (tensors or {}).values())  # as read (float32)
        self.cache = {}  # layer -> (k (n, Hkv, D), v, pos (n,), seq (n,)) over every position computed so far

    def reset(self) -> None:
        self.cache = {}

    def forward(self, ids, pos, seq):
        """ids, pos, seq: (n,) the step's token ids, positions and batch sequence indices -> (n, d) float32 hidden
        rows after layer K-1, on the model's array module. Keys: this step's and every earlier step's of the
        same sequence (pos_k <= pos_q when causal)."""
        xp, cfg, model = self.xp, self.cfg, self.model
        pos, seq = xp.asarray(np.asarray(pos, dtype=np.int32)), xp.asarray(np.asarray(seq, dtype=np.int32))
        h = model.embed(xp.asarray(np.asarray(ids, dtype=np.int64)), pos)  # (n, d)
        scale = 1.0 / np.sqrt(cfg.head_dim)
        plan = None  # every layer of a step has the same query and key positions
        for layer in range(self.n_layers):
            q, k, v = model.pre(layer, h, pos)
            if model.dtype == "bfloat16":  # q, k, v rounded as the engine's wire rounds them
                q, k, v = (to_bf16_bits(a) for a in (q, k, v))
            k_all, v_all, k_pos, k_seq = self._append(layer, k, v, pos, seq)
            if plan is None:
                plan = prepare_attention(pos, seq, k_pos, k_seq, causal=cfg.causal, scale=scale, xp=xp)
            o, _ = plan(q, k_all, v_all)  # (n, H, D)
            h = model.post(layer, h, o)
        return h.astype(xp.float32, copy=False)

    def _append(self, layer: int, k, v, pos, seq):
        new = (k, v, pos, seq)
        if layer in self.cache:
            new = tuple(self.xp.concatenate([old, x]) for old, x in zip(self.cache[layer], new))
        self.cache[layer] = new
        return new
