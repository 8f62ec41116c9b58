#!/bin/bash
# Every GPU transport side by side on the lent GPU machine, under the CUDA-aware Open MPI that
# tools/build_cuda_mpi.sh built (PREFIX, default /tmp/ompi-cuda; built first when missing or with `build`):
# the doctor, the transport test per --transport, the GPU tests (engine against NumPy, the real MiniLM job over
# each transport), and `rshard bench job` over staged, mpi and ipc in one run.
# usage: bash tools/device_transports.sh [build|quick|engine|jobs|bench|all]   logs go to $OUT
#   quick: doctor and the transport test per --transport (1-2 min); engine: tests/engine/test_gpu_engine.py;
#   jobs: the real MiniLM job per transport and dtype (tests/run/test_gpu_jobs.py), the fake-NCCL tests;
#   bench: `rshard bench job` per transport; all: the four (may pass 10 minutes: run them one a call)
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
has() { [ "$WHAT" = all ] || [ "$WHAT" = "$1" ]; }
if has quick; then
  echo "=== doctor $(date -u +%T)"
  for t in auto nccl; do
    timeout 60 mpirun -n 7 python3 -m rshard_hpc doctor --alpha 2 --beta 2 --device gpu --transport $t 2>&1 | \
      grep -E "CUDA-aware MPI:|NCCL|transport|OK|PROBLEM"
  done
  echo "=== transports $(date -u +%T)"
  for t in staged mpi ipc nccl auto; do
    timeout 90 mpirun -n 4 python3 tests/mpi/gpu_transport.py $t 2>&1 | grep -E "transport:|Error" | tail -n 2
  done
fi
for part in engine jobs; do
  has $part || continue
  echo "=== GPU tests: $part $(date -u +%T)"
  files=(tests/engine/test_gpu_engine.py)
  [ $part = jobs ] && files=(tests/run/test_gpu_jobs.py tests/dist/test_nccl.py)
  timeout ${TEST_TIMEOUT:-540} python3 -m pytest -q -p no:cacheprovider -rs -s "${files[@]}" 2>&1 | \
    tee "$OUT/gpu_tests_$part.log" | grep -E "passed|failed|error|MiniLM|PASS|FAIL|SKIP|transport:|rank 1: transport" | \
    tail -n 60
done
if has bench; then
  echo "=== bench job $(date -u +%T)"
  for t in staged mpi ipc; do
    timeout ${BENCH_TIMEOUT:-150} mpirun -n 7 python3 -m rshard_hpc bench job --alpha 2 --beta 2 --device gpu \
      --shape smollm2 --tokens ${TOKENS:-8192} --decode-steps 4 --transport $t --out "$OUT/bench_job_transports.md" \
      2>&1 | grep -E "^\| [0-9]|transport|Error"
  done
fi
echo "=== done $(date -u +%T)"
