"""Where a GPU rank's start goes when many share one GPU (issue 13): run under `mpirun -n N` (no MPI calls), each
rank prints the wall-clock time (s since the earliest rank's start) at which it finished each stage: CuPy's
import, the context, the first cached kernel, a second one, cuBLAS's first product. Shows which stage runs one
rank after another."""
import os
import time

t_start = time.time()
marks = [("start", t_start)]


def mark(label):
    marks.append((label, time.time()))


import cupy  # noqa: E402

mark("import")
cupy.cuda.Device(0).use()
mark("context")
x = cupy.ones(8, dtype=cupy.float32)
mark("first alloc+fill")
float((x * 2).sum())
mark("first kernels")
float((x * 3).sum())
mark("again")
a = cupy.ones((64, 64), dtype=cupy.float32)
float((a @ a).sum())
mark("cublas")
rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))
print(f"rank {rank:2d} " + " ".join(f"{label}={t:.3f}" for label, t in marks), flush=True)
