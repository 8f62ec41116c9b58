"""Weights are checked against their config where they are read and where they are written: a tensor of the wrong
shape (before: a traceback inside a matmul) or holding NaN/Inf (before: a silently wrong result, exit 0) is an
InputError naming the file and the tensor."""
import shutil

import h5py
import numpy as np
import pytest

from rshard_hpc.errors import InputError
from rshard_hpc.models import load_model, model_class, weights
from rshard_hpc.models.llama import Llama, load_head
from rshard_hpc.models.random_init import random_tensors, tiny_config


def _damaged(tmp_path, source, key, change):
    """A copy of the weight file `source` whose tensor `key` is replaced by change(tensor)."""
    path = tmp_path / f"damaged_{key.replace('/', '_')}.h5"
    shutil.copy(source, path)
    with h5py.File(path, "a") as f:
        value = change(f[key][()])
        del f[key]
        f[key] = value
    return path


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_every_tensor_has_the_shape_its_config_gives(arch):
    cfg = tiny_config(arch, tie_embeddings=False) if arch == "llama" else tiny_config(arch)
    cls = model_class(cfg)
    keys = list(cls.tensor_keys(cfg)) + [k for k in getattr(cls, "head_keys", lambda c: [])(cfg)]
    tensors = random_tensors(cfg)
    for key in keys:
        assert weights.tensor_shape(cfg, key) == tensors[key].shape, key
    weights.check_tensors(cfg, tensors, "random")  # no error


@pytest.mark.parametrize("key,change,message", [
    ("layers/001/wq", lambda w: w[:, :32], "/layers/001/wq has shape (64, 32), but the model's config needs (64, 64)"),
    ("embed/position", lambda w: w[:100], "/embed/position has shape (100, 64), but the model's config needs (512, 64)"),
    ("layers/000/b_up", lambda w: w[None], "/layers/000/b_up has shape (1, 128), but the model's config needs (128,)"),
])
def test_load_refuses_a_tensor_of_the_wrong_shape(tmp_path, tiny_bert, key, change, message):
    path = _damaged(tmp_path, tiny_bert, key, change)
    with pytest.raises(InputError) as info:
        load_model(path)
    assert str(info.value).startswith(f"weight file {path}: ") and message in str(info.value)
    assert "do not belong together" in str(info.value)


@pytest.mark.parametrize("value,count", [(np.nan, "1 NaN value"), (np.inf, "1 Inf value"), (-np.inf, "1 Inf value")])
def test_load_refuses_nan_and_inf(tmp_path, tiny_bert, value, count):
    def poison(w):
        w[5, 3] = value
        return w

    path = _damaged(tmp_path, tiny_bert, "embed/word", poison)
    with pytest.raises(InputError) as info:
        load_model(path)
    assert str(info.value) == (f"weight file {path}: /embed/word holds {count} (the first at [5, 3]): the weights "
                               f"are corrupt; convert them again from a good copy")


def test_the_client_head_is_checked_too(tmp_path, tiny_llama):
    def poison(w):
        w[:2] = np.nan
        w[3] = np.inf
        return w

    cfg = weights.read_config(tiny_llama)
    path = _damaged(tmp_path, tiny_llama, "final_norm/w", poison)
    with pytest.raises(InputError, match=r"/final_norm/w holds 2 NaN and 1 Inf values \(the first at \[0\]\)"):
        load_head(path, cfg)
    assert "final_norm/w" not in Llama.tensor_keys(cfg)  # CompNodes never read it: the client's check is needed


def test_writing_refuses_mismatched_or_corrupt_tensors(tmp_path):
    cfg = tiny_config("bert")
    tensors = random_tensors(cfg)
    tensors["layers/000/wk"] = tensors["layers/000/wk"][:-1]
    out = tmp_path / "m.h5"
    with pytest.raises(InputError, match=r"^src: /layers/000/wk has shape \(63, 64\), but the model's config needs"):
        weights.write_weights(out, cfg, {"json": "{}"}, tensors, source="src")
    tensors = random_tensors(cfg)
    tensors["layers/001/w_down"][0, 0] = np.nan
    with pytest.raises(InputError, match=r"/layers/001/w_down holds 1 NaN value"):
        weights.write_weights(out, cfg, {"json": "{}"}, tensors)
    assert list(tmp_path.iterdir()) == [], "nothing is written"


def test_gguf_shapes_are_checked_before_any_reshape(tmp_path, monkeypatch):
    """A q projection whose rows do not match the heads failed inside llama.cpp's un-permutation (a reshape)."""
    pytest.importorskip("gguf")
    from test_llama_model import _write_gguf

    from rshard_hpc.convert import convert_any, gguf

    _write_gguf(tmp_path / "tiny.gguf")
    real = gguf.dequantize_tensor
    calls = []

    def short_rows(data, qtype):  # the first q projection comes out with 60 rows instead of 64
        w = real(data, qtype)
        calls.append(w.shape)
        return w[:60] if len(calls) == 5 and w.shape == (64, 64) else w

    monkeypatch.setattr(gguf, "dequantize_tensor", short_rows)
    with pytest.raises(InputError, match=r"tiny.gguf: /layers/000/wq has shape \(60, 64\), but the model's config "
                                         r"needs \(64, 64\)"):
        convert_any(tmp_path / "tiny.gguf", tmp_path / "tiny.h5")
    assert not (tmp_path / "tiny.h5").exists()
