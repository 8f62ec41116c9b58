"""RSHARD_TRACE_DEVICE=1: a GPU rank's marks also record an event on its stream, timed at the step's end
(engine/trace.py), and `rshard bench trace` adds the GPU's time between marks. Here on a stand-in clock whose
events carry the time the "GPU" reached them; tests/engine/test_gpu_engine.py's jobs run the CuPy one."""
import json

import pytest

from rshard_hpc.bench import trace_report
from rshard_hpc.engine import trace


class _Clock:
    """Events that the stand-in GPU reaches at DEVICE_MS, in order, whatever the host's time."""
    DEVICE_MS = [0.0, 5.0, 6.0, 30.0, 31.0, 40.0, 41.0, 70.0, 71.0, 80.0, 90.0]

    def __init__(self):
        self.recorded = 0

    def record(self):
        self.recorded += 1
        return self.DEVICE_MS[self.recorded - 1]

    @staticmethod
    def elapsed_ms(start, end):
        return end - start


@pytest.fixture
def fresh_trace(monkeypatch):
    for name, value in (("_on", True), ("_events", []), ("_pending", []), ("_clock", None), ("_first_event", None)):
        monkeypatch.setattr(trace, name, value)
    return trace


def _two_steps(tr):
    for _ in range(2):
        for label in ("step", "layer", "x in", "x out", "step end"):
            tr.mark(label)
        tr.settle()


def test_marks_carry_the_gpu_time_once_settled(fresh_trace, monkeypatch, tmp_path):
    monkeypatch.setenv(trace.DEVICE_ENV, "1")
    clock = _Clock()
    trace.use_device_clock(clock.record, clock.elapsed_ms)
    trace.mark("step")
    assert len(trace._events[-1]) == 2 and len(trace._pending) == 1  # recorded, not yet timed
    trace.settle()
    trace.mark("layer")
    trace.mark("x in")
    trace.mark("x out")
    trace.mark("step end")
    trace.settle()
    assert [e[2] for e in trace._events] == [0, 5_000_000, 6_000_000, 30_000_000, 31_000_000]
    assert not trace._pending
    trace._write(str(tmp_path), 1)
    doc = json.loads((tmp_path / "rank1.json").read_text())
    assert doc["events"][-1][1] == "exit"


def test_the_report_adds_the_gpu_time_between_marks(fresh_trace, monkeypatch, tmp_path):
    monkeypatch.setenv(trace.DEVICE_ENV, "1")
    trace.mark("process")  # before the device clock, as in a job (the report's start-up table needs it)
    clock = _Clock()
    trace.use_device_clock(clock.record, clock.elapsed_ms)
    _two_steps(trace)
    trace._write(str(tmp_path), 1)
    ranks = trace_report.load(tmp_path)
    assert [label for _, label in ranks[1]["device"]][:5] == ["step", "layer", "x in", "x out", "step end"]
    text = trace_report.report(tmp_path, steps="0:", layer=0)
    gpu = text.split("## GPU time between marks")[1]
    # steps at 0, 5, 6, 30, 31 and 40, 41, 70, 71, 80 ms: layer -> x in 1 and 29 ms, x in -> x out 24 and 1
    assert "| 1 | rank 1 | layer -> x in | 15.00 |" in gpu
    assert "| 1 | rank 1 | x in -> x out | 12.50 |" in gpu
    assert "| 1 | rank 1 | step -> layer | 3.00 |" in gpu


def test_off_unless_asked(fresh_trace, monkeypatch, tmp_path):
    monkeypatch.delenv(trace.DEVICE_ENV, raising=False)
    trace.mark("process")
    clock = _Clock()
    trace.use_device_clock(clock.record, clock.elapsed_ms)
    _two_steps(trace)
    assert clock.recorded == 0 and all(len(e) == 2 for e in trace._events)
    trace._write(str(tmp_path), 1)
    assert "GPU time between marks" not in trace_report.report(tmp_path, steps="0:", layer=0)


def test_a_gpu_job_times_its_marks_on_the_device(tmp_path, tiny_llama):
    """The CuPy clock (engine/stats.event_clock) in a real 3-rank GPU job: every worker's step marks carry a
    device time, in stream order. Skipped without a GPU."""
    from conftest import require_gpu, rshard, write_prompts

    require_gpu()
    folder = tmp_path / "trace"
    result = rshard(3, ["run", "--task", "generate", "--model", tiny_llama, "--prompts", write_prompts(tmp_path, 3, 5),
                        "--out", tmp_path / "out.h5", "--alpha", 1, "--beta", 1, "--max-new-tokens", 3,
                        "--allow-weak-plan", "--client-layers", 0, "--device", "gpu"],
                    env={"RSHARD_TRACE": str(folder), trace.DEVICE_ENV: "1"})
    assert result.returncode == 0, result.stderr
    ranks = trace_report.load(folder)
    for rank in (1, 2):
        device = ranks[rank]["device"]
        labels = [label for _, label in device]
        assert labels.count("step end") == 3 and "x in" in labels, (rank, labels[:12])
        times = [t for t, _ in device]
        assert times == sorted(times), f"rank {rank}: device marks out of stream order"
    assert "## GPU time between marks" in trace_report.report(folder, steps="0:", layer=0)


def test_phase_timer_reads_gpu_phases_from_the_event_clock():
    """PhaseTimer on a GPU times phases by stats.event_clock's events (here a stand-in CuPy whose events carry
    the time the "GPU" reached them): device seconds from the events, host seconds beside them."""
    from types import SimpleNamespace

    from rshard_hpc.engine.stats import HOST, PhaseTimer

    reached = iter([1.0, 4.0, 10.0, 12.5])  # ms at which each recorded event completes, in order
    waits = []

    class Event:
        def record(self):
            self.ms = next(reached)

        def synchronize(self):
            waits.append(self.ms)

    fake_cupy = SimpleNamespace(cuda=SimpleNamespace(Event=Event, get_elapsed_time=lambda a, b: b.ms - a.ms))
    timer = PhaseTimer(fake_cupy)
    with timer("attention"):
        pass
    with timer("attention"):
        pass
    seconds = timer.seconds
    assert seconds["attention"] == pytest.approx((3.0 + 2.5) / 1e3)
    assert "attention" + HOST in seconds
    assert waits == [12.5]  # one wait, on the last event: every earlier one is complete then
