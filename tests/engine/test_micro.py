"""Micro-batches (engine/micro.py): where a step is cut, and the order of the exchanges every rank follows."""
import numpy as np
import pytest

from rshard_hpc.engine import micro
from rshard_hpc.errors import InputError


def seq_of(lens):
    return np.repeat(np.arange(len(lens)), lens).astype(np.int32)


def check_cover(ranges, n):
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(b > a for a, b in ranges)
    assert all(z == a for (_, z), (a, _) in zip(ranges[:-1], ranges[1:]))


@pytest.mark.parametrize("seed", range(20))
def test_lanes_cover_the_step_and_keep_sequences_whole_without_causality(seed):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 300, rng.integers(1, 12))
    seq = seq_of(lens)
    count = int(rng.integers(1, 6))
    ranges = micro.lane_ranges(seq, count, causal=False, min_tokens=32)
    check_cover(ranges, len(seq))
    assert len(ranges) <= count
    starts = set(np.cumsum(lens)[:-1].tolist())
    assert all(a in starts for a, _ in ranges[1:])  # every cut on a sequence boundary


@pytest.mark.parametrize("seed", range(20))
def test_causal_lanes_are_balanced_and_may_split_a_sequence(seed):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 600, rng.integers(1, 5))
    seq = seq_of(lens)
    n, count = len(seq), int(rng.integers(2, 5))
    ranges = micro.lane_ranges(seq, count, causal=True, min_tokens=64)
    check_cover(ranges, n)
    assert len(ranges) == max(1, min(count, n // 64))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_one_lane_when_the_step_is_small_or_one_is_asked():
    assert micro.lane_ranges(seq_of([100]), 4, causal=True, min_tokens=256) == [(0, 100)]
    assert micro.lane_ranges(seq_of([1000]), 1, causal=True) == [(0, 1000)]
    assert micro.lane_ranges(seq_of([1000]), 2, causal=False, min_tokens=8) == [(0, 1000)]  # one sequence, whole
    assert micro.lane_ranges(seq_of([1000]), 2, causal=True) == [(0, 500), (500, 1000)]  # MIN_LANE_TOKENS = 256
    assert micro.lane_ranges(np.zeros(0, np.int32), 3, causal=True) == [(0, 0)]


def test_schedule_without_lanes_alternates_out_and_back():
    assert micro.schedule(1, [2, 3]) == [("out", 0, 2), ("back", 0, 2), ("out", 0, 3), ("back", 0, 3)]


@pytest.mark.parametrize("lanes,layers", [(2, 3), (3, 1), (4, 5)])
def test_schedule_sends_each_lane_out_then_back_once_a_layer_in_order(lanes, layers):
    events = micro.schedule(lanes, range(layers))
    assert len(events) == 2 * lanes * layers
    assert events[:lanes] == [("out", m, 0) for m in range(lanes)]
    for m in range(lanes):
        mine = [(kind, layer) for kind, lane, layer in events if lane == m]
        assert mine == [(kind, layer) for layer in range(layers) for kind in ("out", "back")]
    # between a lane's return and its next layer's departure no other exchange happens (the CompNodes run its
    # post- and pre-passes there while the AttnNodes attend another lane)
    for at, (kind, m, layer) in enumerate(events):
        if kind == "back" and layer + 1 < layers:
            assert events[at + 1] == ("out", m, layer + 1)


def test_requested_reads_the_environment(monkeypatch):
    monkeypatch.delenv(micro.ENV_VAR, raising=False)
    assert micro.requested() == 1
    monkeypatch.setenv(micro.ENV_VAR, "3")
    assert micro.requested() == 3
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv(micro.ENV_VAR, bad)
        with pytest.raises(InputError, match=micro.ENV_VAR):
            micro.requested()
