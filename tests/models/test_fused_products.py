"""The fused matrix products of a layer (issue 13): q/k/v one product (Llama, BERT), gate/up one product (Llama),
over weights concatenated once when the model is built. On CPU: four products a Llama layer, one for BERT's
q/k/v; the placed weights are the concatenations (bf16: the same bits as the separate matrices) and nothing
else; the passes give what the separate products gave, within fp32 rounding of a product."""
import numpy as np
import pytest

from rshard_hpc.models import common, weights
from rshard_hpc.models.bert import Bert
from rshard_hpc.models.llama import Llama, rope_qk
from rshard_hpc.models.random_init import random_tensors, tiny_config
from rshard_hpc.ops.precision import Bf16Matrix

SEPARATE = {"llama": {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")},
            "bert": {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv")}}


def build(arch: str, dtype: str):
    cfg = tiny_config(arch, **({"n_kv_heads": 2} if arch == "llama" else {}))
    tensors = random_tensors(cfg, seed=3)
    return cfg, tensors, (Llama if arch == "llama" else Bert)(cfg, tensors, np, dtype)


def inputs(cfg, n=7):
    rng = np.random.default_rng(11)
    h = rng.standard_normal((n, cfg.hidden)).astype(np.float32)
    attn = rng.standard_normal((n, cfg.n_heads, cfg.head_dim)).astype(np.float32)
    return h, np.arange(3, 3 + n).astype(np.int32), attn


@pytest.mark.parametrize("arch,pre,post", [("llama", 1, 3), ("bert", 1, 3)])
def test_products_a_layer(monkeypatch, arch, pre, post):
    """Llama: one product before attention (q/k/v), three after (O, gate/up, down): four, not seven."""
    import rshard_hpc.models.bert as bert

    cfg, _, model = build(arch, "float32")
    calls = []
    real = common.matmul_t

    def counted(x, w, **kwargs):
        calls.append(w.shape)
        return real(x, w, **kwargs)

    monkeypatch.setattr(common, "matmul_t", counted)
    monkeypatch.setattr(bert, "matmul_t", counted)
    h, pos, attn = inputs(cfg)
    model.pre(0, h, pos)
    assert len(calls) == pre and calls[0] == ((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cfg.hidden)
    calls.clear()
    model.post(0, h, attn)
    assert len(calls) == post


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_placed_weights_are_the_concatenations(arch, dtype):
    """Only the concatenations are placed (the separate tensors are not held twice); a bf16 concatenation holds
    the separate matrices' bits, a float one their values."""
    cfg, tensors, model = build(arch, dtype)
    for layer in range(cfg.n_layers):
        for name, parts in SEPARATE[arch].items():
            assert not any(weights.layer_key(layer, p) in model.t for p in parts)
            placed = model.t[weights.layer_key(layer, name)]
            separate = [tensors[weights.layer_key(layer, p)] for p in parts]
            if isinstance(placed, Bf16Matrix):
                assert np.array_equal(placed.bits, np.concatenate([Bf16Matrix(w).bits for w in separate]))
            else:
                assert placed.dtype == (np.float64 if dtype == "float64" else np.float32)  # biases stay float
                assert np.array_equal(placed, np.concatenate(separate))


def separate_llama_layer(cfg, tensors, dtype, layer, h, pos, attn):
    """Llama.pre / post as they were: seven products over the separate weights."""
    from rshard_hpc.models.llama import rope_inv_freq, rope_tables

    keys = [weights.layer_key(layer, k) for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")]
    t = common.place_tensors({k: v for k, v in tensors.items() if k.startswith(weights.layer_key(layer, ""))},
                             np, dtype, keys)

    def w(name):
        return t[weights.layer_key(layer, name)]

    n = h.shape[0]
    _, x = common.rms_norm_input(h, w("attn_norm_w"), cfg.norm_eps, w("wq"))
    q = common.linear(x, w("wq")).reshape(n, cfg.n_heads, cfg.head_dim)
    k = common.linear(x, w("wk")).reshape(n, cfg.n_kv_heads, cfg.head_dim)
    v = common.linear(x, w("wv")).reshape(n, cfg.n_kv_heads, cfg.head_dim)
    inv_freq = rope_inv_freq(cfg)
    q, k = rope_qk(q, k, rope_tables(inv_freq, pos, np, False), inv_freq)
    attn_out = common.linear(attn.reshape(n, -1).astype(h.dtype), w("wo"))
    h2, x = common.rms_norm_input(h, w("mlp_norm_w"), cfg.norm_eps, w("w_gate"), residual=attn_out)
    act = common.silu_mul_input(common.linear(x, w("w_gate")), common.linear(x, w("w_up")), w("w_down"))
    return (q, k, v), h2 + common.linear(act, w("w_down"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llama_layer_equals_the_separate_products(dtype):
    """The fused layer gives the separate products' values: equal within fp32 rounding of a product (BLAS may sum
    a column of a wider product in another order; under bf16 that may flip a rounding of the next input)."""
    cfg, tensors, model = build("llama", dtype)
    h, pos, attn = inputs(cfg)
    (q, k, v), out = separate_llama_layer(cfg, tensors, dtype, 1, h, pos, attn)
    tol = 1e-5 if dtype == "float32" else 2e-2
    for got, want in zip(model.pre(1, h, pos) + (model.post(1, h, attn),), (q, k, v, out)):
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.abs(got - want).max() <= tol * np.abs(want).max()


def test_bert_pre_equals_the_separate_products():
    cfg, tensors, model = build("bert", "float32")
    h, pos, _ = inputs(cfg)
    got = model.pre(0, h, pos)
    for a, (wk, bk, heads) in zip(got, (("wq", "bq", cfg.n_heads), ("wk", "bk", cfg.n_kv_heads),
                                        ("wv", "bv", cfg.n_kv_heads))):
        w, b = (tensors[weights.layer_key(0, key)] for key in (wk, bk))
        want = (h @ w.T + b).reshape(len(h), heads, cfg.head_dim)
        assert a.shape == want.shape and np.abs(a - want).max() <= 1e-5 * np.abs(want).max()
