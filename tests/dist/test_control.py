"""The control channel (dist/control.py): headers, arrays and ledgers between the client and the workers, in order,
of any size, under real mpiexec (tests/mpi/control_check.py), with sleeping and with spinning waits."""
import sys

import numpy as np
import pytest
from conftest import REPO, mpiexec

from rshard_hpc.dist.launcher import WAIT_ENV

SCRIPT = REPO / "tests" / "mpi" / "control_check.py"


@pytest.mark.parametrize("ranks, wait", [(2, "spin"), (7, "sleep"), (13, "sleep")])
def test_messages_arrive_whole_and_in_order(ranks, wait):
    seed = int(np.random.default_rng().integers(1 << 30))  # fresh payloads each run
    result = mpiexec(ranks, [sys.executable, SCRIPT, seed], env={WAIT_ENV: wait})
    assert result.returncode == 0, f"seed {seed}\n{result.stdout}\n{result.stderr}"
    assert "control channel: ok" in result.stdout


def test_unsupported_array_type_is_refused():
    from rshard_hpc.dist.control import Channel

    with pytest.raises(TypeError, match="bytes, int64 or float32, not float16"):
        Channel(None).send_arrays({1: np.zeros(2, np.float16)}, tag=2)
