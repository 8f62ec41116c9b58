"""`rshard convert` refuses what it cannot convert faithfully or cannot write, with one `rshard: error:` line and
status 2, and leaves nothing behind: no half file, no temporary (before: tracebacks, a wrong model written with
exit 0, and a temporary the size of the model left next to the output)."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from rshard_hpc.cli import main as cli_main
from rshard_hpc.convert.llama_hf import LAYER_NAMES
from rshard_hpc.errors import InputError
from rshard_hpc.models import load_model, weights
from rshard_hpc.models.random_init import random_tensors, tiny_config


def write_hf_llama(folder, change=None):
    """A tiny Hugging Face Llama folder (config.json, model.safetensors, tokenizer.json); change(tensors) may
    damage the tensors first."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config("llama", tie_embeddings=False)
    t = random_tensors(cfg, seed=3)
    src = {"model.embed_tokens.weight": t["embed/word"], "model.norm.weight": t["final_norm/w"],
           "lm_head.weight": t["lm_head/w"]}
    for i in range(cfg.n_layers):
        src.update({f"model.layers.{i}.{name}": t[weights.layer_key(i, short)] for name, short in LAYER_NAMES.items()})
    if change:
        change(src)
    save_file({k: np.ascontiguousarray(v) for k, v in src.items()}, str(folder / "model.safetensors"))
    hf = dict(model_type="llama", hidden_size=cfg.hidden, num_hidden_layers=cfg.n_layers,
              num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, intermediate_size=cfg.intermediate,
              vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_positions, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False)
    (folder / "config.json").write_text(json.dumps(hf))
    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    (folder / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}}))
    return folder


def convert(source, out):
    return CliRunner().invoke(cli_main, ["convert", str(source), str(out)])


def assert_refused(result, message):
    assert result.exit_code == 2, result.output
    assert result.output.count("rshard: error:") == 1 and message in result.output, result.output
    assert "Traceback" not in result.output


def leftovers(folder):
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp")


def test_a_good_folder_converts(tmp_path):
    result = convert(write_hf_llama(tmp_path / "hf"), tmp_path / "out" / "m.h5")
    assert result.exit_code == 0 and "wrote" in result.output, result.output
    assert load_model(tmp_path / "out" / "m.h5").cfg.n_layers == 2 and leftovers(tmp_path) == []


def test_a_tensor_of_the_wrong_shape_is_refused(tmp_path):
    def narrow(src):
        src["model.layers.1.self_attn.q_proj.weight"] = src["model.layers.1.self_attn.q_proj.weight"][:, :32].copy()

    source = write_hf_llama(tmp_path / "hf", narrow)
    result = convert(source, tmp_path / "m.h5")
    assert_refused(result, f"{source}: /layers/001/wq has shape (64, 32), but the model's config needs (64, 64)")
    assert not (tmp_path / "m.h5").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("value,count", [(np.nan, "1 NaN value"), (np.inf, "1 Inf value")])
def test_nan_or_inf_is_refused(tmp_path, value, count):
    def poison(src):
        src["model.layers.0.mlp.up_proj.weight"][3, 4] = value

    source = write_hf_llama(tmp_path / "hf", poison)
    result = convert(source, tmp_path / "m.h5")
    assert_refused(result, f"{source}: /layers/000/w_up holds {count} (the first at [3, 4])")
    assert not (tmp_path / "m.h5").exists() and leftovers(tmp_path) == []


def test_an_output_below_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = convert(write_hf_llama(tmp_path / "hf"), tmp_path / "afile" / "m.h5")
    assert_refused(result, f"cannot write {tmp_path / 'afile' / 'm.h5'}: {tmp_path / 'afile'} is a file, "
                           f"not a directory")


def test_an_output_that_is_a_directory_is_refused_and_nothing_is_left(tmp_path):
    (tmp_path / "adir").mkdir()
    result = convert(write_hf_llama(tmp_path / "hf"), tmp_path / "adir")
    assert_refused(result, f"cannot write {tmp_path / 'adir'}: it is a directory (name the file, e.g. "
                           f"{tmp_path / 'adir' / 'model.h5'})")
    assert leftovers(tmp_path) == [] and list((tmp_path / "adir").iterdir()) == []


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_leaves_no_temporary(tmp_path, monkeypatch, failure):
    """A full disk (or Ctrl-C) in the middle of writing: the temporary goes, no output appears."""
    import h5py

    real = h5py.Group.create_dataset
    written = []

    def fail_later(self, name, *args, **kwargs):
        written.append(name)
        if len(written) == 5:
            assert any(p.suffix == ".tmp" for p in tmp_path.iterdir())  # the temporary is there while writing
            raise failure
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", fail_later)
    cfg = tiny_config("bert")
    out = tmp_path / "m.h5"
    with pytest.raises(InputError if isinstance(failure, OSError) else KeyboardInterrupt) as info:
        weights.write_weights(out, cfg, {"json": "{}"}, random_tensors(cfg))
    if isinstance(failure, OSError):
        assert str(info.value) == f"cannot write weight file {out}: [Errno 28] No space left on device"
    assert os.listdir(tmp_path) == []
