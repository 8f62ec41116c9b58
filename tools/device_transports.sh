#!/bin/bash
# Every GPU transport side by side on the lent GPU machine, under the CUDA-aware Open MPI that
# tools/build_cuda_mpi.sh built (PREFIX, default /tmp/ompi-cuda; built first when missing or with `build`):
# the doctor, the transport test per --transport, the GPU tests (engine against NumPy, the real MiniLM job over
# each transport), and `rshard bench job` over staged, mpi and ipc in one run.
# usage: bash tools/device_transports.sh [build|tests|bench|all]      logs go to $OUT
set -u
OUT=${OUT:-device_out}; mkdir -p "$OUT"
PREFIX=${PREFIX:-/tmp/ompi-cuda}
WHAT=${1:-all}
if [ "$WHAT" = build ] || [ ! -f "$PREFIX/env.sh" ]; then
  echo "=== build $(date -u +%T)"
  start=$SECONDS
  PREFIX=$PREFIX bash tools/build_cuda_mpi.sh all 2>&1 | tee "$OUT/build.log" | grep -E "build_cuda_mpi|check|FAILED|error"
  echo "build took $((SECONDS - start)) s"
  [ "$WHAT" = build ] && exit 0
fi
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RSHARD_CACHE=/tmp/cache
# shellcheck disable=SC1091
. "$PREFIX/env.sh"
[ -f .big/minilm_sample_vocab.h5 ] && export RSHARD_MINILM_H5=$PWD/.big/minilm_sample_vocab.h5
echo "mpirun: $(command -v mpirun) ($(mpirun --version | head -n 1))"
if [ "$WHAT" = tests ] || [ "$WHAT" = all ]; then
  echo "=== doctor $(date -u +%T)"
  for t in auto nccl; do
    timeout 60 mpirun -n 7 python3 -m rshard_hpc doctor --alpha 2 --beta 2 --device gpu --transport $t 2>&1 | \
      grep -E "CUDA-aware MPI:|NCCL|transport|OK|PROBLEM"
  done
  echo "=== transports $(date -u +%T)"
  for t in staged mpi ipc nccl auto; do
    timeout 90 mpirun -n 4 python3 tests/mpi/gpu_transport.py $t 2>&1 | grep -E "transport:|Error" | tail -n 2
  done
  echo "=== GPU tests $(date -u +%T)"
  timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q -p no:cacheprovider -rs -s tests/engine/test_gpu_engine.py \
    tests/run/test_gpu_jobs.py tests/dist/test_nccl.py 2>&1 | tee "$OUT/gpu_tests.log" | \
    grep -E "passed|failed|error|MiniLM|PASS|FAIL|SKIP|transport:|rank 1: transport" | tail -n 60
fi
if [ "$WHAT" = bench ] || [ "$WHAT" = all ]; then
  echo "=== bench job $(date -u +%T)"
  for t in staged mpi ipc; do
    timeout ${BENCH_TIMEOUT:-150} mpirun -n 7 python3 -m rshard_hpc bench job --alpha 2 --beta 2 --device gpu \
      --shape smollm2 --tokens ${TOKENS:-8192} --decode-steps 4 --transport $t --out "$OUT/bench_job_transports.md" \
      2>&1 | grep -E "^\| [0-9]|transport|Error"
  done
fi
echo "=== done $(date -u +%T)"
