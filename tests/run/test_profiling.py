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
