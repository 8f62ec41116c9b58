"""Nothing unbounded: the strided plan's δ in closed form (against the enumeration), the layout search built on it
(against trying every layout and chunk length, as the search did before), and refusals that come at once however
large --min-delta, --delta, --length or --search-max are (timed as a bound on a hang, not as a speed test)."""
import itertools
import math
import time
from dataclasses import replace

import pytest
from click.testing import CliRunner
from conftest import rshard

from rshard_hpc.cli import main as cli_main
from rshard_hpc.dist.topology import world_size_for
from rshard_hpc.plan.check import check_job, job_delta, smallest_layout, strided_delta
from rshard_hpc.plan.schemes import PlanSpec
from rshard_hpc.plan.views import INF

HANG_S = 5  # every refusal below must come well within this, on a slow 2-core machine under load
LENGTHS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 17, 24, 31, 40, 64]


def every_layout_search(spec, lengths, delta, public_prefix, search_max, delta_of):
    """The layout search as it was: every (alpha, beta) in order of ranks for the chunk lengths given, then every
    pair of chunk lengths up to delta. delta_of(spec, lengths, public_prefix) is the job's δ."""
    layouts = sorted(((a, b) for a in range(1, search_max + 1) for b in range(1, search_max + 1)),
                     key=lambda ab: (world_size_for(*ab), ab[1], ab[0]))

    def first_reaching(c, c_a):
        for a, b in layouts:
            if delta_of(replace(spec, alpha=a, beta=b, c=c, c_a=c_a), lengths, public_prefix) >= delta:
                return {"alpha": a, "beta": b, "c": c, "c_a": c_a, "world_size": world_size_for(a, b)}
        return None

    found = first_reaching(spec.c, spec.c_a)
    if found:
        return dict(found, chunks_changed=False)
    top = max(int(math.ceil(delta)) if delta != INF else 1, 1)
    best = None
    for c in range(spec.c, max(spec.c, top) + 1):
        for c_a in range(spec.c_a, max(spec.c_a, top) + 1):
            if (c, c_a) != (spec.c, spec.c_a):
                got = first_reaching(c, c_a)
                key = ((c != spec.c) + (c_a != spec.c_a), got and got["world_size"], c + c_a)
                if got and (best is None or key < best[0]):
                    best = (key, got)
    return dict(best[1], chunks_changed=True) if best else None


def enumerated(spec, lengths, public_prefix):
    return job_delta(spec, lengths, public_prefix)["delta"]


def closed_form(spec, lengths, public_prefix):
    return strided_delta(spec, max(lengths, default=0), public_prefix)


def test_strided_delta_equals_the_enumeration():
    """architecture.md §4 in closed form, for every layout, chunk length, length and public prefix tried here
    (a wider sweep, 79200 cases, agreed when it was written)."""
    for alpha, beta, c, c_a in itertools.product(range(1, 5), range(1, 5), range(1, 4), range(1, 4)):
        spec = PlanSpec("strided", alpha, beta, c, c_a)
        for n, pp in itertools.product(LENGTHS, (0, 1, 3)):
            assert strided_delta(spec, n, pp) == enumerated(spec, [n], pp), (spec, n, pp)
        assert closed_form(spec, [3, 9, 40], 1) == enumerated(spec, [3, 9, 40], 1)  # a job: its longest decides


def test_search_equals_trying_every_layout():
    """The closed-form search gives what trying every layout and chunk length gives (with the enumerated δ on
    a few cases, with the closed-form δ, shown equal above, on many)."""
    for c, c_a, n, pp, delta in [(1, 2, 240, 0, 2), (1, 3, 240, 0, 3), (1, 1, 240, 0, 2), (2, 1, 40, 1, 3),
                                 (1, 1, 9, 0, 2), (1, 2, 3, 1, 2), (1, 1, 17, 3, 4)]:
        spec = PlanSpec("strided", 2, 2, c, c_a)
        assert smallest_layout(spec, [n], delta, pp, 4) == every_layout_search(spec, [n], delta, pp, 4, enumerated)
    for c, c_a in itertools.product(range(1, 5), range(1, 5)):
        spec = PlanSpec("strided", 2, 2, c, c_a)
        for n, pp, delta, search_max in itertools.product([0, 1, 2, 3, 5, 7, 12, 25, 64], (0, 1, 3),
                                                          (0, 1, 2, 3, 4, 6, 9, INF), (2, 4)):
            want = every_layout_search(spec, [n], delta, pp, search_max, closed_form)
            assert smallest_layout(spec, [n], delta, pp, search_max) == want, (spec, n, pp, delta, search_max)


def test_random_search_is_checked_on_the_draws():
    """A random plan's suggestion is the strided one (the scheme guarantees those gaps), kept only when the draws
    reach delta."""
    spec = PlanSpec("random", 2, 2, 1, 1, seed=3, target_delta=2)
    found = smallest_layout(spec, [40, 240], 2)
    assert (found["alpha"], found["beta"], found["c_a"]) == (3, 3, 2)
    trial = replace(spec, alpha=found["alpha"], beta=found["beta"], c=found["c"], c_a=found["c_a"])
    assert job_delta(trial, [40, 240])["delta"] >= 2
    assert smallest_layout(spec, [3], 2) is None  # too short for any plan: nothing reaches 2


def _timed(call):
    start = time.monotonic()
    out = call()
    elapsed = time.monotonic() - start
    assert elapsed < HANG_S, f"took {elapsed:.1f} s"
    return out


@pytest.mark.parametrize("scheme", ["strided", "random"])
@pytest.mark.parametrize("min_delta", [24, 1000, 10 ** 9])
def test_run_check_refuses_at_once(scheme, min_delta):
    """`rshard run --min-delta D` refused a weak plan only after minutes for D = 24 (every chunk length pair up to
    D, every layout); it is a closed form now."""
    lengths = list(range(3, 500, 7)) + [512]
    got = _timed(lambda: check_job(PlanSpec(scheme, 3, 3, 1, 2, seed=1, target_delta=min_delta), lengths,
                                   min_delta, public_prefix=1))
    assert not got["ok"] and "--allow-weak-plan" in got["message"]
    if min_delta == 24:
        assert "--alpha 2 --beta 3 --c 24 --c-a 24 (mpiexec -n 12)" in got["message"]
    else:
        assert "no layout with alpha, beta <= 8" in got["message"]


@pytest.mark.parametrize("args,message", [
    (["--length", 100_000_000], "--length 100000000 is too long for the node-by-node report of alpha=3 beta=3"),
    (["--search-max", 1000], "--search-max must lie in [1, 32] (got 1000)"),
    (["--alpha", 1000, "--beta", 1000], "--length 64 is too long for the node-by-node report of alpha=1000 "
                                        "beta=1000 (1001000 nodes): at most 4 positions"),
    (["--beta", 3000], "alpha=3 beta=3000 has 9000003 nodes, more than rshard plan reports"),
])
def test_rshard_plan_refuses_unbounded_requests_at_once(args, message):
    result = _timed(lambda: CliRunner().invoke(cli_main, ["plan", "--alpha", 3, "--beta", 3, "--c-a", 2] + args))
    assert result.exit_code == 2, result.output
    assert result.output.count("rshard: error:") == 1 and message in result.output, result.output


@pytest.mark.parametrize("args,advice", [
    (["--delta", 1000], "No layout with alpha, beta <= 8 and chunk lengths up to 1000 reaches delta=1000"),
    (["--delta", 24, "--length", 300_000], "--alpha 2 --beta 3 --c 24 --c-a 24 (mpiexec -n 12)"),
    (["--delta", 3, "--search-max", 32, "--length", 300_000], "--alpha 4 --beta 3 --c 1 --c-a 3 (mpiexec -n 14)"),
])
def test_rshard_plan_layout_search_is_bounded(args, advice):
    result = _timed(lambda: CliRunner().invoke(cli_main, ["plan", "--alpha", 3, "--beta", 3, "--c-a", 2] + args))
    assert result.exit_code == 0 and advice in result.output, result.output[:2000]


def test_run_with_a_huge_min_delta_is_refused_quickly(tmp_path, tiny_bert):
    """Under mpiexec: before, this ran past 120 s with no output; the launch itself takes a few seconds here."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("t1 t2 t3 t4 t5 t6 t7 t8 t9\nt1 t2\n")
    start = time.monotonic()
    result = rshard(3, ["run", "--model", tiny_bert, "--prompts", prompts, "--out", tmp_path / "o.h5", "--alpha", 1,
                        "--beta", 1, "--quiet", "--min-delta", 1000], timeout=60)
    assert result.returncode == 2 and result.stderr.count("rshard: error:") == 1, result.stderr
    assert "below the required --min-delta 1000" in result.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "o.h5").exists()
