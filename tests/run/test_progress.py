"""Progress lines: redrawn after every batch on a terminal, at most one line per interval in a log."""
import io

from rshard_hpc.run import progress as progress_mod
from rshard_hpc.run.progress import Progress


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
    assert out.count("\r[rshard] batch") == 5 and out.endswith("\n")


def test_quiet_prints_nothing(monkeypatch):
    assert _run(monkeypatch, _Tty(), [100.0] * 3, enabled=False) == ""
