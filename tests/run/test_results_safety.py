"""A results file holds hours of results: two jobs never share one, a failed start never costs the old file,
--out never replaces an input, --resume never mixes rows made under other settings, the privacy report covers
every prompt across resumes, and a full disk is said plainly and leaves a resumable file."""
import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import mpi_env, rshard, wait_for_file, write_prompts

from rshard_hpc.models.random_init import tiny_config, write_random_model

FAST = ["--alpha", 1, "--beta", 1, "--min-delta", 0, "--quiet"]  # 3 ranks: the file handling is what is tested


def _run(model, prompts, out, *extra, n=3, **kwargs):
    return rshard(n, ["run", "--model", model, "--prompts", prompts, "--out", out, *FAST, *extra], **kwargs)


def _ids(out):
    with h5py.File(out, "r") as f:
        return [x.decode() for x in f["ids"][()]]


def test_a_second_job_on_the_same_out_is_refused_while_the_first_runs(tmp_path, tiny_bert):
    prompts, out = write_prompts(tmp_path, 8, seed=3), tmp_path / "r.h5"
    launcher = shutil.which("mpiexec") or pytest.skip("mpiexec not found")
    pids = tmp_path / "pids"
    pids.mkdir()
    cmd = [launcher, "-n", "3", sys.executable, "-m", "rshard_hpc", "run", "--model", str(tiny_bert), "--prompts",
           str(prompts), "--out", str(out), "--batch-tokens", "40", *map(str, FAST)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=mpi_env({"RSHARD_PID_DIR": str(pids), "RSHARD_TEST_SLOW_BATCH_S": "2"}))
    wait_for_file(pids / "batch1.done", first)
    for flag in ("--overwrite", "--resume"):
        second = _run(tiny_bert, prompts, out, flag)
        assert second.returncode == 2, second.stderr
        assert f"results file {out} is in use by another job (pid" in second.stderr, second.stderr
    _, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stderr
    assert sorted(_ids(out)) == sorted(f"p{i}" for i in range(8)) and len(_ids(out)) == 8
    assert not (tmp_path / "r.h5.lock").exists()


def test_a_failed_start_keeps_the_old_file(tmp_path, tiny_bert):
    prompts, out = write_prompts(tmp_path, 4, seed=4), tmp_path / "r.h5"
    assert _run(tiny_bert, prompts, out).returncode == 0
    with h5py.File(out, "r") as f:
        before = f["embeddings"][()]
    broken = tmp_path / "broken.h5"  # its config reads, its tensors do not: the CompNodes fail to load it
    shutil.copy(tiny_bert, broken)
    with h5py.File(broken, "a") as f:
        del f["layers/000"]
    failed = _run(broken, prompts, out, "--overwrite")
    assert failed.returncode == 2 and "lacks /layers/000" in failed.stderr, failed.stderr
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["embeddings"][()], before)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".r.h5", "r.h5"))) == ["r.h5"]


@pytest.mark.parametrize("which", ["prompts", "model", "folder"])
def test_out_may_not_be_an_input_or_a_folder(tmp_path, tiny_bert, which):
    prompts = write_prompts(tmp_path, 2, seed=5)
    model = tmp_path / "model.h5"
    shutil.copy(tiny_bert, model)
    out = {"prompts": prompts, "model": model, "folder": tmp_path}[which]
    before = {p: p.read_bytes() for p in (prompts, model)}
    result = _run(model, prompts, out, "--overwrite")
    assert result.returncode == 2, result.stderr
    assert ("is a folder" if which == "folder" else f"is the --{which} file") in result.stderr, result.stderr
    assert all(p.read_bytes() == data for p, data in before.items())


def test_resume_refuses_other_weights_or_precision(tmp_path):
    model = tmp_path / "m.h5"
    write_random_model(model, tiny_config("bert"), seed=1)
    prompts, out = write_prompts(tmp_path, 4, seed=6), tmp_path / "r.h5"
    assert _run(model, prompts, out).returncode == 0
    other = _run(model, prompts, out, "--resume", "--dtype", "bfloat16")
    assert other.returncode == 2 and "dtype: file float32, this run bfloat16" in other.stderr, other.stderr
    model.unlink()
    write_random_model(model, tiny_config("bert"), seed=2)  # other weights at the same path
    other = _run(model, prompts, out, "--resume")
    assert other.returncode == 2 and "other settings (weights: file" in other.stderr, other.stderr


def test_resume_refuses_other_generation_settings(tmp_path, tiny_llama):
    prompts, out = write_prompts(tmp_path, 2, seed=7), tmp_path / "g.h5"
    gen = ["--task", "generate", "--max-new-tokens", 3]
    assert _run(tiny_llama, prompts, out, *gen).returncode == 0
    other = _run(tiny_llama, prompts, out, "--resume", "--task", "generate", "--max-new-tokens", 4)
    assert other.returncode == 2 and '"max_new_tokens": 4' in other.stderr, other.stderr
    same = _run(tiny_llama, prompts, out, "--resume", *gen)
    assert same.returncode == 0 and "2 prompts already" in same.stderr, same.stderr


def test_integer_and_string_ids_stay_apart_across_a_resume(tmp_path, tiny_bert):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "r.h5"
    prompts.write_text('{"id": 1, "text": "one two three"}\n')
    assert _run(tiny_bert, prompts, out).returncode == 0
    prompts.write_text('{"id": 1, "text": "one two three"}\n{"id": "1", "text": "four five six"}\n')
    resumed = _run(tiny_bert, prompts, out, "--resume")
    assert resumed.returncode == 0 and "1 prompts already" in resumed.stderr, resumed.stderr
    with h5py.File(out, "r") as f:
        assert list(f["ids"][()]) == [b"1", b"1"] and list(f["id_is_int"][()]) == [1, 0]


def test_the_privacy_report_covers_every_prompt_across_resumes(tmp_path, tiny_bert):
    full = write_prompts(tmp_path, 9, seed=8)
    half = tmp_path / "half.jsonl"
    half.write_text("\n".join(full.read_text().splitlines()[:4]) + "\n")
    out = tmp_path / "r.h5"
    args = ["--alpha", 2, "--beta", 2]
    first = rshard(7, ["run", "--model", tiny_bert, "--prompts", half, "--out", out, "--quiet", "--min-delta", 0,
                       "--batch-tokens", 60, *args])
    assert first.returncode == 0, first.stderr
    again = rshard(7, ["run", "--model", tiny_bert, "--prompts", full, "--out", out, "--quiet", "--min-delta", 0,
                       "--batch-tokens", 60, "--resume", *args])
    assert again.returncode == 0, again.stderr
    with h5py.File(out, "r") as f:
        report = json.loads(f["privacy/json"][()])
        ledger_prompts = {p for doc in f["privacy/ledger"][()] for p in json.loads(doc)["prompts"]}
    assert report["prompts"] == 9 and ledger_prompts == {f"p{i}" for i in range(9)}
    assert report["ledger_check"]["consistent"], report["ledger_check"]


@pytest.fixture
def small_disk(tmp_path):
    """A 300 kB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_said_plainly_and_the_file_resumes(tmp_path, tiny_bert, small_disk):
    prompts = write_prompts(tmp_path, 400, seed=9)
    out = small_disk / "r.h5"
    full = _run(tiny_bert, prompts, out, "--batch-tokens", 200)
    assert full.returncode == 1, full.stderr
    assert "rshard: error: disk full while writing" in full.stderr and "--resume" in full.stderr, full.stderr
    assert "Traceback" not in full.stderr, full.stderr
    moved = tmp_path / "r.h5"  # the user frees space: here, the file moves to a larger disk
    shutil.copy(out, moved)
    done_before = len(_ids(moved))
    assert done_before > 0
    resumed = _run(tiny_bert, prompts, moved, "--batch-tokens", 200, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    whole = _run(tiny_bert, prompts, tmp_path / "whole.h5", "--batch-tokens", 200)
    assert whole.returncode == 0, whole.stderr
    with h5py.File(moved, "r") as a, h5py.File(tmp_path / "whole.h5", "r") as b:
        assert list(a["ids"][()]) == list(b["ids"][()])
        np.testing.assert_array_equal(a["embeddings"][()], b["embeddings"][()])
