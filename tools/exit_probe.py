"""What a GPU rank's exit costs when many share one GPU (issue 13: 0.7 s of a 13-rank 12-prompt job's wall lay
after its last mark). Run under `mpirun -n N python3 tools/exit_probe.py MODE`; every rank makes a CUDA context
(CuPy, a kernel, a cuBLAS product, a pooled allocation), meets the others in a barrier and prints the epoch time
at which it begins to exit; the launcher's end minus the latest of those is the exit's cost. MODE:
  normal    return from the script (Python runs its atexit handlers, MPI_Finalize, CuPy's teardown)
  handlers  atexit's handlers, then MPI_Finalize, then os._exit (no interpreter or CUDA teardown)
  finalize  MPI_Finalize, then os._exit (no atexit handlers)"""
import atexit
import os
import sys
import time

import cupy
from mpi4py import MPI

mode = sys.argv[1] if len(sys.argv) > 1 else "normal"
cupy.cuda.Device(0).use()
a = cupy.ones((256, 256), dtype=cupy.float32)
float((a @ a).sum())
pool_block = cupy.empty(64 << 20, dtype=cupy.uint8)  # the pool keeps device memory, as a job's does
del pool_block
MPI.COMM_WORLD.Barrier()
print(f"exit begins {time.time():.4f}", flush=True)
if mode == "handlers":
    atexit._run_exitfuncs()
if mode in ("handlers", "finalize"):
    MPI.Finalize()
    os._exit(0)
