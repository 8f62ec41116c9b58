"""Job files (`rshard run --config FILE`): TOML or JSON options as defaults, the command line overrides them."""
import json

import pytest
from click.testing import CliRunner
from conftest import REPO

from rshard_hpc import cli
from rshard_hpc.run import job as jobs
from rshard_hpc.run import jobfile
from rshard_hpc.run.options import DEFAULT_BATCH_TOKENS, RunOptions


@pytest.fixture
def captured(monkeypatch):
    """The RunOptions `rshard run` would run with (no MPI job is started)."""
    seen = []
    monkeypatch.setattr(jobs, "run", seen.append)
    return seen


def invoke(args):
    return CliRunner().invoke(cli.main, ["run"] + [str(a) for a in args], catch_exceptions=False)


def test_sample_job_file(captured):
    result = invoke(["--config", REPO / "slurm/job.toml"])
    assert result.exit_code == 0, result.output
    opts = captured[0]
    assert (opts.task, opts.model, opts.prompts, opts.alpha, opts.beta, opts.c, opts.c_a) == \
        ("embed", "all-MiniLM-L6-v2", "inputs/sample.jsonl", 3, 3, 1, 2)
    assert jobfile.main([str(REPO / "slurm/job.toml")]) == 0


def test_command_line_overrides_the_file(tmp_path, captured):
    job = tmp_path / "job.toml"
    job.write_text('prompts = "a.jsonl"\nout = "a.h5"\nalpha = 3\nbeta = 3\nc-a = 2\nquiet = true\n')
    result = invoke(["--alpha", 2, "--config", job, "--out", "b.h5"])  # --config's place does not matter
    assert result.exit_code == 0, result.output
    opts = captured[0]
    assert (opts.prompts, opts.out, opts.alpha, opts.beta, opts.c_a, opts.progress) == ("a.jsonl", "b.h5", 2, 3, 2, False)


def test_json_job_file(tmp_path, captured):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"prompts": "p.txt", "out": "o.h5", "batch_tokens": 64, "scheme": "random"}))
    assert invoke(["--config", job]).exit_code == 0
    assert (captured[0].batch_tokens, captured[0].scheme) == (64, "random")


@pytest.mark.parametrize("text,message", [
    ('prompts = "a"\nalhpa = 3\n', "unknown option(s) alhpa"),
    ('prompts = "a"\nalpha = \n', "not valid TOML"),
    ('[slurm]\nntasks = 3\n', "[slurm] tables are not options"),
    ('prompts = "a"\nout = "o"\nalpha = "three"\n', "'three' is not a valid integer"),
    ('prompts = "a"\nout = "o"\nscheme = "zigzag"\n', "'zigzag' is not one of"),
])
def test_bad_job_files_are_clear_errors(tmp_path, captured, text, message):
    job = tmp_path / "job.toml"
    job.write_text(text)
    result = invoke(["--config", job])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not captured


def test_missing_job_file(tmp_path, captured):
    result = invoke(["--config", tmp_path / "nope.toml"])
    assert result.exit_code == 2 and "cannot read job file" in result.output


def test_world_size_for_run_sh(tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text("alpha = 3\nbeta = 3\n")
    assert jobfile.main([str(job)]) == 0 and capsys.readouterr().out.split() == ["13", "3", "3"]
    assert jobfile.main([str(job), "--out", "x.h5", "--alpha", "2", "--beta=1"]) == 0
    assert capsys.readouterr().out.split() == ["4", "2", "1"]
    assert jobfile.main([str(tmp_path / "nope.toml")]) == 2


def test_a_job_file_without_a_layout_asks_for_the_default_one(tmp_path):
    """run.sh sizes the job from the job file: no alpha/beta means rshard run's default layout on the fewest
    ranks reaching the job's min_delta (13 for delta 2: alpha=3 beta=3)."""
    job = tmp_path / "job.toml"
    job.write_text('task = "embed"\n')
    assert jobfile.layout(job) == (3, 3)
    assert jobfile.layout(job, ["--alpha", "2"]) == (2, 1)  # one given: the other is 1, as in rshard run
    job.write_text('min_delta = 3\n')
    assert jobfile.layout(job) == (4, 3)


def test_client_takes_a_gpu_only_when_it_computes():
    from rshard_hpc.run.options import RunOptions

    from rshard_hpc.dist.transport_choice import SMALL_JOB_TOKENS

    assert not RunOptions(device="cpu", task="generate").client_on_gpu()
    assert not RunOptions(device="gpu", task="embed").client_on_gpu()
    assert RunOptions(device="gpu", task="generate").client_on_gpu()  # the LM head of every new token
    assert RunOptions(device="gpu", task="generate").client_on_gpu(job_tokens=10)
    layers = RunOptions(device="gpu", task="embed", client_layers=1)
    assert layers.client_on_gpu() and layers.client_on_gpu(job_tokens=SMALL_JOB_TOKENS)
    assert not layers.client_on_gpu(job_tokens=SMALL_JOB_TOKENS - 1)  # a small job's layers: NumPy, no CUDA context
    assert not RunOptions(device="cpu", task="embed", client_layers=1).client_on_gpu(job_tokens=10**6)


def test_a_small_embedding_job_under_device_gpu_computes_on_the_cpus(monkeypatch):
    import math

    from rshard_hpc.models.random_init import tiny_config
    from rshard_hpc.run.options import SMALL_JOB_FLOP, SMALL_JOB_ON_CPU_ENV

    cfg = tiny_config("bert")
    largest_small = math.ceil(SMALL_JOB_FLOP / (2 * cfg.n_layers * cfg.layer_matrix_params)) - 1  # tokens
    gpu = RunOptions(device="gpu", task="embed")
    assert gpu.device_for(largest_small, cfg) == "cpu" and gpu.device_for(largest_small + 1, cfg) == "gpu"
    assert gpu.device_for(None, cfg) == "gpu"  # size not known
    assert RunOptions(device="gpu", task="generate").device_for(10, cfg) == "gpu"  # decode steps are many
    assert RunOptions(device="cpu", task="embed").device_for(10**9, cfg) == "cpu"
    monkeypatch.setenv(SMALL_JOB_ON_CPU_ENV, "0")
    assert gpu.device_for(10, cfg) == "gpu"


@pytest.mark.parametrize("args,device,expected", [
    ([], "cpu", DEFAULT_BATCH_TOKENS["cpu"]),
    (["--device", "gpu"], "gpu", DEFAULT_BATCH_TOKENS["gpu"]),
    (["--batch-tokens", 300], "cpu", 300),
    (["--device", "gpu", "--batch-tokens", 300], "gpu", 300),
])
def test_batch_tokens_default_follows_the_device(captured, args, device, expected):
    result = invoke(["--prompts", "p.txt", "--out", "o.h5"] + args)
    assert result.exit_code == 0, result.output
    assert (captured[0].device, captured[0].tokens_per_batch) == (device, expected)


def test_batches_cut_at_the_default(captured):
    """cut_batches at the CPU default: consecutive prompts up to the limit, a longer prompt alone; an embedding job's
    first batch up to FIRST_BATCH_SHARE of it (at least one prompt), each later one up to BATCH_GROWTH times the
    tokens of the one before; generation's batches whole."""
    from rshard_hpc.run.client_job import BATCH_GROWTH, FIRST_BATCH_SHARE, cut_batches

    limit = DEFAULT_BATCH_TOKENS["cpu"]
    lens = [limit // 2, limit // 2, 1, limit + 5, 3, limit - 3]
    assert cut_batches(lens, limit, growing=True) == [[0], [1, 2], [3], [4, 5]]
    first = limit // FIRST_BATCH_SHARE
    assert cut_batches([first // 2] * 3 + [limit // 2] * 3, limit, growing=True) == [[0, 1], [2, 3], [4, 5]]
    # 1,024-token prompts at 4,096: the second batch stops at 3 x the first (the client has it ready in time)
    assert BATCH_GROWTH == 3 and first == 1024
    assert cut_batches([first] * 9, limit, growing=True) == [[0], [1, 2, 3], [4, 5, 6, 7], [8]]
    assert cut_batches([first] * 9, limit, growing=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]  # generation


def test_a_resumed_job_runs_the_whole_runs_batches(captured):
    """ClientJob.batches: the whole file's batches less the prompts done, as indices into the prompts to do; a
    resume after two whole batches runs exactly the uninterrupted run's third and later batches."""
    from types import SimpleNamespace

    from rshard_hpc.run.client_job import ClientJob, cut_batches

    limit = DEFAULT_BATCH_TOKENS["cpu"]
    lens = [1024] * 9
    whole = cut_batches(lens, limit, growing=True)  # [[0], [1, 2, 3], [4, 5, 6, 7], [8]]
    done = set(whole[0] + whole[1])
    todo_at = {at: n for n, at in enumerate(i for i in range(len(lens)) if i not in done)}
    job = SimpleNamespace(file_lengths=lens, todo_at=todo_at, opts=RunOptions(device="cpu"))
    resumed = [[i + len(done) for i in batch] for batch in ClientJob.batches(job)]  # back to file indices
    assert resumed == whole[2:]
    job.todo_at = {at: n for n, at in enumerate(i for i in range(len(lens)) if i not in {0, 5})}  # done: not a prefix
    assert list(ClientJob.batches(job)) == [[0, 1, 2], [3, 4, 5], [6]]  # each batch's prompts still to do


def test_batch_tokens_below_one_is_refused(captured):
    result = invoke(["--prompts", "p.txt", "--out", "o.h5", "--batch-tokens", 0])
    assert result.exit_code == 2 and "--batch-tokens" in result.output and not captured
