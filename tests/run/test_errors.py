"""Every user error exits non-zero on every rank, with its message on rank 0, and never hangs."""
import json

import h5py
import pytest
from conftest import rshard

WORLD = 7  # alpha = 2, beta = 2


def run_and_collect(tmp_path, args, world=WORLD, alpha=2, beta=2):
    exits = tmp_path / "exits"
    exits.mkdir(exist_ok=True)
    base = ["run", "--alpha", alpha, "--beta", beta, "--quiet", "--allow-weak-plan"]  # alpha=2, beta=2: not private
    result = rshard(world, base + args, env={"RSHARD_EXIT_DIR": str(exits)})
    codes = {p.stem: int(p.read_text()) for p in exits.glob("*.exit")}
    return result, codes


def assert_failed_everywhere(result, codes, message, world=WORLD):
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert result.stderr.count("rshard: error:") == 1, "the message is printed once, by rank 0"
    assert sorted(codes) == [f"rank{r}" for r in range(world)], codes
    assert all(code != 0 for code in codes.values()), codes


def write_prompts(tmp_path, lines, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def good_prompts(tmp_path):
    return write_prompts(tmp_path, [json.dumps({"text": "t1 t2 t3"}), json.dumps({"text": "t4"})], "good.jsonl")


def test_wrong_world_size(tmp_path, tiny_bert, good_prompts):
    result, codes = run_and_collect(tmp_path, ["--model", tiny_bert, "--prompts", good_prompts,
                                               "--out", tmp_path / "o.h5"], world=5)
    assert_failed_everywhere(result, codes, "1 + alpha + beta^2 = 1 + 2 + 4 = 7", world=5)


def test_missing_weights(tmp_path, good_prompts):
    result, codes = run_and_collect(tmp_path, ["--model", tmp_path / "nope.h5", "--prompts", good_prompts,
                                               "--out", tmp_path / "o.h5"])
    assert_failed_everywhere(result, codes, "nope.h5")


def test_corrupt_weights(tmp_path, good_prompts):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"garbage" * 100)
    result, codes = run_and_collect(tmp_path, ["--model", bad, "--prompts", good_prompts, "--out", tmp_path / "o.h5"])
    assert_failed_everywhere(result, codes, "not a readable HDF5 file")


def test_weights_missing_a_tensor(tmp_path, tiny_bert, good_prompts):
    """Only CompNodes read the layers: the failure must still reach every rank."""
    broken = tmp_path / "broken.h5"
    broken.write_bytes(tiny_bert.read_bytes())
    with h5py.File(broken, "a") as f:
        del f["layers/001/wq"]
    result, codes = run_and_collect(tmp_path, ["--model", broken, "--prompts", good_prompts, "--out", tmp_path / "o.h5"])
    assert_failed_everywhere(result, codes, "lacks /layers/001/wq")


@pytest.mark.parametrize("lines,message", [
    ([json.dumps({"text": "t1"}), "{not json", json.dumps({"text": "t2"})], "p.jsonl:2: not valid JSON"),
    ([json.dumps({"text": "t1"}), json.dumps({"id": "x"})], "p.jsonl:2: no \"text\" field"),
    ([json.dumps({"text": "t1"}), json.dumps({"text": "t1"}), json.dumps({"text": "   "})], "p.jsonl:3: empty prompt"),
])
def test_bad_prompt_files(tmp_path, tiny_bert, lines, message):
    prompts = write_prompts(tmp_path, lines)
    out = tmp_path / "o.h5"
    result, codes = run_and_collect(tmp_path, ["--model", tiny_bert, "--prompts", prompts, "--out", out])
    assert_failed_everywhere(result, codes, message)
    assert not out.exists(), "nothing is written before the prompts are valid"


def test_unreadable_prompt_file(tmp_path, tiny_bert):
    result, codes = run_and_collect(tmp_path, ["--model", tiny_bert, "--prompts", tmp_path / "missing.jsonl",
                                               "--out", tmp_path / "o.h5"])
    assert_failed_everywhere(result, codes, "cannot read prompt file")


def test_over_long_prompt_names_id_and_length(tmp_path, tiny_bert):
    long_text = " ".join(f"t{i % 90}" for i in range(600))  # tiny model limit: 512 positions
    prompts = write_prompts(tmp_path, [json.dumps({"id": "short", "text": "t1"}),
                                       json.dumps({"id": "long-one", "text": long_text})])
    result, codes = run_and_collect(tmp_path, ["--model", tiny_bert, "--prompts", prompts, "--out", tmp_path / "o.h5"])
    assert_failed_everywhere(result, codes, "prompt 'long-one'")
    assert "600 tokens" in result.stderr and "--truncate" in result.stderr
    # with --truncate it runs
    result, codes = run_and_collect(tmp_path, ["--model", tiny_bert, "--prompts", prompts,
                                               "--out", tmp_path / "o2.h5", "--truncate"])
    assert result.returncode == 0, result.stderr
    assert all(code == 0 for code in codes.values()) and len(codes) == WORLD


def test_existing_results_need_resume_or_overwrite(tmp_path, tiny_bert, good_prompts):
    out = tmp_path / "o.h5"
    result, _ = run_and_collect(tmp_path, ["--model", tiny_bert, "--prompts", good_prompts, "--out", out])
    assert result.returncode == 0, result.stderr
    result, codes = run_and_collect(tmp_path, ["--model", tiny_bert, "--prompts", good_prompts, "--out", out])
    assert_failed_everywhere(result, codes, "--resume")
