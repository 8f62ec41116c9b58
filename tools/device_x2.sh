#!/bin/bash
# On the two-GPU machine (nvidia-h200-x2): one worker rank per GPU (alpha=1, beta=1: the client stays on the
# CPU, the CompNode and the AttnNode each get a GPU), then alpha=2, beta=2 over the two GPUs; correctness
# first (transport across the GPUs, the sharded engine against NumPy), then the job benchmark (alpha=2, beta=2
# too with WITH_A2=1).
# usage: bash tools/device_x2.sh    logs go to $OUT
set -u
OUT=${OUT:-device_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
nvidia-smi -L; nvidia-smi topo -m 2>/dev/null | head -4
{
  echo "=== doctor $(date -u +%T)"
  timeout 60 mpirun -n 3 python3 -m rshard_hpc doctor --alpha 1 --beta 1 --device gpu 2>&1 | tail -n 12
  echo "=== transport over two GPUs $(date -u +%T)"
  timeout 90 mpirun -n 4 python3 tests/mpi/gpu_transport.py ipc 2>&1 | tail -n 2
  timeout 90 mpirun -n 4 python3 tests/mpi/gpu_transport.py staged 2>&1 | tail -n 2
  timeout 90 mpirun -n 2 python3 tests/mpi/gpu_transport.py nccl 2>&1 | tail -n 2   # one rank a GPU
  echo "=== engine, one worker per GPU $(date -u +%T)"
  python3 tools/make_test_models.py /tmp/models 2 > /dev/null
  for dtype in float32 bfloat16; do  # auto takes NCCL here (a GPU a worker); then the IPC path beside it
    for t in auto ipc; do
      timeout 150 mpirun -n 3 python3 tests/mpi/gpu_equivalence.py --model /tmp/models/llama.h5 --alpha 1 --beta 1 \
        --case short --dtype $dtype --transport $t 2>&1 | grep -E "rank 1|PASS|FAIL|Error"
    done
  done
  echo "=== bench job $(date -u +%T)"
  for dtype in float32 bfloat16; do
    for t in ${TRANSPORTS:-nccl ipc}; do
      timeout 150 mpirun -n 3 python3 -m rshard_hpc bench job --alpha 1 --beta 1 --device gpu --shape smollm2 --transport $t \
        --tokens ${TOKENS:-8192,16384} --decode-steps 4 --dtype $dtype --out "$OUT/bench_job_x2.md" 2>&1 | grep -E "^\| [0-9]|transport|Error"
    done
    [ -n "${WITH_A2:-}" ] && timeout 150 mpirun -n 7 python3 -m rshard_hpc bench job --alpha 2 --beta 2 --device gpu --shape smollm2 \
      --tokens 8192 --decode-steps 4 --dtype $dtype --out "$OUT/bench_job_x2.md" 2>&1 | grep -E "^\| [0-9]|transport|Error"
  done
  echo "=== done $(date -u +%T)"
} 2>&1 | tee "$OUT/x2.log"
