"""A rank's process where several share a node (issue 13, dist/launcher.py): no huge pages for NumPy's arrays,
freed memory kept by glibc, the cycle collector paused through the start-up and resumed, frozen, for the job."""
import os
import platform
import subprocess
import sys

from conftest import rshard

from rshard_hpc.dist.launcher import LOCAL_SIZE_VARS, NODE_SIZE_VARS

PROBE = """
import gc, os, sys
import rshard_hpc
import numpy
from rshard_hpc.dist import launcher
state = [gc.isenabled(), os.environ.get("NUMPY_MADVISE_HUGEPAGE"), numpy._core.multiarray._get_madvise_hugepage()]
took = launcher.lean_rank_process()  # again: whether glibc takes the malloc settings
launcher.resume_collection()  # where lean_rank_process paused the collector: frozen and running again
print(state + [took, gc.isenabled(), gc.get_freeze_count() > 0])
"""


def _probe(**env):
    clean = {k: v for k, v in os.environ.items() if k not in NODE_SIZE_VARS + ("NUMPY_MADVISE_HUGEPAGE",)}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return eval(done.stdout.strip().splitlines()[-1])


def test_ranks_sharing_a_node_start_lean_and_resume_collecting():
    collecting, hugepage_env, numpy_hugepages, glibc_took, enabled, frozen = _probe(**{LOCAL_SIZE_VARS[0]: "13"})
    assert (collecting, hugepage_env, numpy_hugepages) == (False, "0", False)
    assert glibc_took is (platform.libc_ver()[0] == "glibc")
    assert enabled and frozen


def test_a_users_hugepage_setting_stays_and_a_lone_process_is_untouched():
    assert _probe(**{LOCAL_SIZE_VARS[0]: "13"}, NUMPY_MADVISE_HUGEPAGE="1")[1:3] == ["1", True]
    collecting, hugepage_env, _, glibc_took, _, frozen = _probe()
    assert (collecting, hugepage_env, glibc_took, frozen) == (True, None, False, False)  # as Python starts


def test_every_rank_of_a_job_collects_again_with_its_start_up_frozen(tmp_path, tiny_bert):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"w{i} " * (3 + 5 * i) + "\n" for i in range(4)))
    result = rshard(3, ["run", "--model", tiny_bert, "--prompts", prompts, "--out", tmp_path / "o.h5", "--alpha", 1,
                        "--beta", 1, "--quiet", "--allow-weak-plan"], env={"RSHARD_EXIT_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    states = [(tmp_path / f"rank{r}.gc").read_text().split() for r in range(3)]
    assert all(enabled == "1" and int(frozen) > 1000 for enabled, frozen in states), states


def test_other_commands_collect_again_as_they_start(tmp_path):
    probe = ("import gc, sys\nfrom click.testing import CliRunner\nimport rshard_hpc.cli as cli\n"
             "paused = gc.isenabled()\nCliRunner().invoke(cli.main, ['plan', '--alpha', '1', '--beta', '1'])\n"
             "print(paused, gc.isenabled(), gc.get_freeze_count() > 0)")
    done = subprocess.run([sys.executable, "-c", probe], env={**os.environ, LOCAL_SIZE_VARS[0]: "4"},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "True"]
