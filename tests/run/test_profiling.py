"""RSHARD_PROFILE_MIN_TOKENS: a worker's profile covers only its steps of at least that many tokens."""
import cProfile
import pstats

from rshard_hpc.run import profiling


def _small_step_work():
    return sum(range(100))


def _large_step_work():
    return sum(range(100))


def _profiled_names(profiler) -> set:
    return {name for (_, _, name) in pstats.Stats(profiler).stats}


def test_step_scope_profiles_only_steps_of_the_size(monkeypatch):
    profiler = cProfile.Profile()
    monkeypatch.setattr(profiling, "_scoped", {"profiler": profiler, "min_tokens": 10})
    with profiling.step_scope(9):
        _small_step_work()
    with profiling.step_scope(10):
        _large_step_work()
    _small_step_work()  # outside any step
    names = _profiled_names(profiler)
    assert "_large_step_work" in names and "_small_step_work" not in names


def test_step_scope_without_a_scoped_profile_is_a_no_op(monkeypatch):
    monkeypatch.setattr(profiling, "_scoped", {})
    with profiling.step_scope(10**6):
        assert _small_step_work() == 4950


def _sleeps():
    import time

    time.sleep(0.2)


def _seconds_in(profiler, name: str) -> float:
    return sum(row[3] for (_, _, fn), row in pstats.Stats(profiler).stats.items() if fn == name)


def test_cpu_clock_leaves_out_time_off_the_core(monkeypatch):
    """RSHARD_PROFILE_CPU=1: a rank's profile counts its CPU time, so time it spends off the core (here asleep; in a
    job, while other ranks hold the core) is not charged to the function it was in."""
    timings = {}
    for value in ("0", "1"):
        monkeypatch.setenv(profiling.CPU_CLOCK_VAR, value)
        profiler = profiling.new_profiler()
        profiler.runcall(_sleeps)
        timings[value] = _seconds_in(profiler, "_sleeps")
    assert timings["0"] >= 0.19
    assert timings["1"] < 0.05


def test_written_profile_has_a_text_table_and_pstats_data(tmp_path):
    """At exit a rank writes DIR/rank<N>.txt (the tables) and DIR/rank<N>.prof, which pstats reads with callers."""
    profiler = cProfile.Profile()
    profiler.runcall(_large_step_work)
    profiling._write(profiler, str(tmp_path), 3)
    assert "==== rank 3, by tottime" in (tmp_path / "rank3.txt").read_text()
    stats = pstats.Stats(str(tmp_path / "rank3.prof"))
    assert "_large_step_work" in {name for (_, _, name) in stats.stats}
