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


# ------------------------------------------------------------------------------------------ "results you can trust"
def _damaged_copy(tmp_path, source, key, change):
    path = tmp_path / "damaged.h5"
    path.write_bytes(source.read_bytes())
    with h5py.File(path, "a") as f:
        value = change(f[key][()])
        del f[key]
        f[key] = value
    return path


def _poison(w):
    w[:] = float("nan")
    return w


@pytest.mark.parametrize("key,change,message", [
    ("layers/001/wq", lambda w: w[:, :32], "/layers/001/wq has shape (64, 32), but the model's config needs (64, 64)"),
    ("embed/word", _poison, "/embed/word holds 6208 NaN values (the first at [0, 0])"),
])
def test_damaged_weights(tmp_path, tiny_bert, good_prompts, key, change, message):
    """Before: a traceback inside a matmul (wrong shape), or a wrong result with exit status 0 (NaN)."""
    damaged = _damaged_copy(tmp_path, tiny_bert, key, change)
    out = tmp_path / "o.h5"
    result, codes = run_and_collect(tmp_path, ["--model", damaged, "--prompts", good_prompts, "--out", out])
    assert_failed_everywhere(result, codes, f"weight file {damaged}: {message}")
    assert all(code == 2 for code in codes.values()), codes


@pytest.mark.parametrize("args,message", [
    (["--temperature", -1], "--temperature must be a finite number >= 0 (0: greedy), got -1.0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0: greedy), got nan"),
    (["--top-p", 0], "--top-p must lie in (0, 1] (1: no nucleus cut), got 0.0"),
    (["--top-p", 1.5], "--top-p must lie in (0, 1] (1: no nucleus cut), got 1.5"),
    (["--top-k", -1], "--top-k must be >= 0 (0: no top-k cut), got -1"),
    (["--max-new-tokens", 0], "--max-new-tokens must be at least 1 (got 0)"),
])
def test_bad_generation_settings(tmp_path, tiny_llama, good_prompts, args, message):
    """Before: the negative ones ran (exit 0: greedy, or no cut), NaN failed mid-job with a traceback."""
    out = tmp_path / "o.h5"
    result, codes = run_and_collect(tmp_path, ["--task", "generate", "--model", tiny_llama, "--prompts", good_prompts,
                                               "--out", out] + args)
    assert_failed_everywhere(result, codes, message)
    assert not out.exists()


@pytest.mark.parametrize("plan,args,message", [
    ('[[0, 1], [0, 1]]', ["--scheme", "explicit"], "must be an object {\"comp\": [...], \"group\": [...]}, not a list"),
    ('{"comp": [0, 1]}', ["--scheme", "explicit"], "lacks \"group\""),
    ('{"comp": [0, 1.5], "group": [0, 1]}', ["--scheme", "explicit"], "\"comp\"[1] is 1.5; values must be integers"),
    ('{"comp": [0, 1], "group": [0, 1]}', [], "needs --scheme explicit (the scheme is 'strided': the file would be"),
    ('{"comp": [0, 1], "group": [0, 1]}', ["--scheme", "explicit", "--min-delta", -1], "--min-delta must be >= 0"),
])
def test_bad_plans(tmp_path, tiny_bert, good_prompts, plan, args, message):
    """Every rank makes its plan itself: every rank refuses it alike, and rank 0 alone says so."""
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(plan)
    result, codes = run_and_collect(tmp_path, ["--model", tiny_bert, "--prompts", good_prompts, "--out",
                                               tmp_path / "o.h5", "--plan-file", plan_file] + args)
    assert_failed_everywhere(result, codes, message)


@pytest.mark.parametrize("text,message", [
    ('prompts = "a"\nalhpa = 3\n', "job file {job}: unknown option(s) alhpa (valid: "),
    ('prompts = "a"\nout = "o"\nalpha = "three"\n', "job file {job}: alpha: 'three' is not a valid integer"),
])
def test_bad_job_file_is_reported_once(tmp_path, text, message):
    """Before: click's usage error, once per rank (7 times here)."""
    job = tmp_path / "job.toml"
    job.write_text(text)
    exits = tmp_path / "exits"
    exits.mkdir()
    result = rshard(WORLD, ["run", "--config", job], env={"RSHARD_EXIT_DIR": str(exits)})
    codes = {p.stem: int(p.read_text()) for p in exits.glob("*.exit")}
    assert result.returncode == 2
    assert_failed_everywhere(result, codes, message.format(job=job))
    assert "Usage:" not in result.stderr


@pytest.mark.parametrize("extra", [[], ["--truncate"]])
def test_max_new_tokens_beyond_the_context(tmp_path, tiny_llama, good_prompts, extra):
    result, codes = run_and_collect(tmp_path, ["--task", "generate", "--model", tiny_llama, "--prompts", good_prompts,
                                               "--out", tmp_path / "o.h5", "--max-new-tokens", 600] + extra)
    assert_failed_everywhere(result, codes, "--max-new-tokens 600 does not fit the model's context of 512 positions "
                                            "(prompt and new tokens together): use at most 511")
