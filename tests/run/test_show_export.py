"""Results out: `rshard show` sums a results file up (and draws one prompt's ledger), `rshard export` writes its
ids with embeddings or generated text as JSONL, CSV or NPY, ids keeping their type. One real job per task."""
import csv
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import rshard

from rshard_hpc import __version__
from rshard_hpc.cli import main as cli_main

IDS = [1, "1", "x"]  # an integer id and a string id with the same text stay two prompts
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_job(tmp_path_factory, model, n, args) -> str:
    folder = tmp_path_factory.mktemp("show_export")
    prompts = folder / "prompts.jsonl"
    texts = ["one two three four five six seven", "alpha beta gamma delta epsilon zeta", "a, \"quoted\" prompt here"]
    prompts.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(IDS, texts)))
    out = folder / "results.h5"
    result = rshard(n, ["run", "--model", model, "--prompts", prompts, "--out", out, "--min-delta", 0, "--quiet"]
                    + args)
    assert result.returncode == 0, result.stderr
    return str(out)


@pytest.fixture(scope="module")
def embed_file(tmp_path_factory, tiny_bert):
    return run_job(tmp_path_factory, tiny_bert, 7, ["--alpha", 2, "--beta", 2])


@pytest.fixture(scope="module")
def generate_file(tmp_path_factory, tiny_llama):
    return run_job(tmp_path_factory, tiny_llama, 3, ["--alpha", 1, "--beta", 1, "--task", "generate",
                                                     "--max-new-tokens", 3])


def cli(*args):
    return CliRunner().invoke(cli_main, [str(a) for a in args])


def stored(path):
    """(typed ids, rows) as the HDF5 file holds them."""
    with h5py.File(path, "r") as f:
        ids = [int(t) if k else t for t, k in zip(f["ids"].asstr()[()], f["id_is_int"][()])]
        rows = f["embeddings"][()] if "embeddings" in f else f["generated/text"].asstr()[()].tolist()
    return ids, rows


# ------------------------------------------------------------------------------------------ show
def test_show_names_model_task_prompts_precision_and_privacy(embed_file, generate_file, tiny_bert, tiny_llama):
    embed = cli("show", embed_file)
    assert embed.exit_code == 0, embed.output
    for text in [f"model:     {tiny_bert} (tiny-random-bert)", "task:      embed, 3 prompts (embeddings of",
                 "precision: float32 on cpu", "plan:      strided alpha=2 beta=2", "7 ranks",
                 "privacy:   delta = 0 (not checked: --min-delta 0", "the report covers 3 prompts",
                 "ledger:    consistent with the plan", f"written by rshard {__version__}", "time (s):",
                 "sent between ranks"]:
        assert text in embed.stdout, (text, embed.stdout)
    gen = cli("show", generate_file)
    assert gen.exit_code == 0, gen.output
    assert f"model:     {tiny_llama} (tiny-random-llama)" in gen.stdout
    assert "task:      generate, 3 prompts (" in gen.stdout and "new tokens)" in gen.stdout


def test_show_draws_the_first_prompt_or_the_one_named(embed_file, tmp_path):
    first, named = tmp_path / "first.png", tmp_path / "named.svg"
    result = cli("show", embed_file, "--picture", first)
    assert result.exit_code == 0, result.output
    assert f"picture of prompt 1 (prompt 1 of 3) in {first}" in result.stdout
    assert first.read_bytes().startswith(PNG_MAGIC) and first.stat().st_size > 1000
    result = cli("show", embed_file, "--picture", named, "--prompt", '"1"')
    assert result.exit_code == 0, result.output
    assert f'picture of prompt "1" (prompt 2 of 3) in {named}' in result.stdout and "<svg" in named.read_text()
    result = cli("show", embed_file, "--picture", named, "--prompt", "nope")
    assert result.exit_code == 2 and 'no prompt nope in the results file (ids: 1, "1", x)' in result.stderr


def test_show_and_export_refuse_what_is_not_a_results_file(tmp_path, tiny_bert):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    cases = [(tmp_path / "missing.h5", "no such results file"), (text, "is not a results file"),
             (tiny_bert, "is a weight file, not a results file"), (tmp_path, "is a folder")]
    for path, message in cases:
        for args in (["show", path], ["export", path, "--out", tmp_path / "out.jsonl"]):
            result = cli(*args)
            assert result.exit_code == 2, (args, result.output)
            assert result.stderr.count("\n") == 1 and result.stderr.startswith("rshard: error: "), result.stderr
            assert message in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


# ------------------------------------------------------------------------------------------ export
def test_export_jsonl_round_trips_embeddings_and_texts(embed_file, generate_file, tmp_path):
    for path, field in ((embed_file, "embedding"), (generate_file, "text")):
        out = tmp_path / f"{field}.jsonl"
        result = cli("export", path, "--format", "jsonl", "--out", out)
        assert result.exit_code == 0, result.output
        objects = [json.loads(line) for line in out.read_text().splitlines()]
        ids, rows = stored(path)
        assert ids == IDS and [o["id"] for o in objects] == IDS  # 1 stays an integer, "1" a string
        assert all(set(o) == {"id", field} for o in objects)
        if field == "embedding":
            assert np.array_equal(np.asarray([o["embedding"] for o in objects], np.float32), rows)
        else:
            assert [o["text"] for o in objects] == rows


def test_export_csv_round_trips_with_id_types(embed_file, generate_file, tmp_path):
    for path in (embed_file, generate_file):
        out = tmp_path / "out.csv"
        result = cli("export", path, "--out", out, "--overwrite")  # the format from the suffix
        assert result.exit_code == 0, result.output
        with open(out, newline="", encoding="utf-8") as f:
            header, *lines = list(csv.reader(f, quoting=csv.QUOTE_NONNUMERIC))
        ids, rows = stored(path)
        assert [int(x) if isinstance(x, float) else x for x, *_ in lines] == ids == IDS
        if isinstance(rows, np.ndarray):
            assert header == ["id"] + [f"e{i}" for i in range(rows.shape[1])]
            assert np.array_equal(np.asarray([rest for _, *rest in lines], np.float32), rows)
        else:
            assert header == ["id", "text"] and [text for _, text in lines] == rows


def test_export_npy_writes_embeddings_and_typed_ids(embed_file, generate_file, tmp_path):
    out = tmp_path / "emb.npy"
    result = cli("export", embed_file, "--format", "npy", "--out", out)
    assert result.exit_code == 0, result.output
    ids, rows = stored(embed_file)
    loaded = np.load(out)
    assert loaded.dtype == np.float32 and np.array_equal(loaded, rows)
    assert json.loads((tmp_path / "emb.ids.json").read_text()) == ids == IDS
    result = cli("export", generate_file, "--format", "npy", "--out", tmp_path / "gen.npy")
    assert result.exit_code == 2 and "is a generate file: use --format jsonl or csv" in result.stderr
    assert not (tmp_path / "gen.npy").exists()


def test_export_refuses_to_overwrite_without_overwrite(embed_file, tmp_path):
    out = tmp_path / "emb.jsonl"
    out.write_text("keep me\n")
    result = cli("export", embed_file, "--out", out)
    assert result.exit_code == 2 and f"{out} exists: pass --overwrite to replace it" in result.stderr
    assert out.read_text() == "keep me\n"
    (tmp_path / "emb.ids.json").write_text("[]\n")  # npy: its ids file counts too
    result = cli("export", embed_file, "--out", tmp_path / "emb.npy")
    assert result.exit_code == 2 and "emb.ids.json exists" in result.stderr and not (tmp_path / "emb.npy").exists()
    assert cli("export", embed_file, "--out", out, "--overwrite").exit_code == 0
    assert json.loads(out.read_text().splitlines()[0])["id"] == 1
    result = cli("export", embed_file, "--out", embed_file, "--format", "csv", "--overwrite")
    assert result.exit_code == 2 and "is the results file" in result.stderr
    result = cli("export", embed_file, "--out", tmp_path / "emb.txt")
    assert result.exit_code == 2 and "pass --format" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.ids.json", "emb.jsonl"]  # no partial files left
