#!/bin/bash
# Every GPU check in one go (for the lent GPU machine): kernel tests, transport, sharded engine on the GPU
# (short cases against NumPy, 16k-token cases against a torch fp64 forward), kernel benchmark.
# Logs go to $OUT (default ./gpu_out). usage: [BENCH_ARGS="--variants --dtypes bf16"] [BENCH_END=seconds] bash tools/gpu_check.sh [quick|bench]
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
MPI="mpirun --allow-run-as-root --oversubscribe"
step() { echo "=== $1 ($(date -u +%T))"; }
{
  step env; nvidia-smi -L; python3 -c "import cupy, torch, mpi4py; print('cupy', cupy.__version__, 'torch', torch.__version__, 'mpi4py', mpi4py.__version__)"
  mpirun --version | head -1; (ompi_info --parsable --all 2>/dev/null | grep -i cuda_support) || true
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"
if [ "${1:-}" != bench ]; then
step "kernel tests" | tee "$OUT/tests.log"
timeout 300 python3 -m pytest -q --tb=short -p no:cacheprovider -n 8 tests/ops/test_gpu_kernels.py >> "$OUT/tests.log" 2>&1
grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 25
step transport | tee "$OUT/engine.log"
for t in auto staged mpi ipc nccl; do
  timeout 60 $MPI -n 4 python3 tests/mpi/gpu_transport.py $t 2>&1 | grep -E "transport:|Error" | tail -n 2 | tee -a "$OUT/engine.log"
done
step models | tee -a "$OUT/engine.log"
python3 tools/make_test_models.py /tmp/models 2 2>&1 | tee -a "$OUT/engine.log"
run_eq() { timeout 240 $MPI -n "$1" python3 tests/mpi/gpu_equivalence.py "${@:2}" 2>&1 | grep -v "^\s*$" | tail -n 6 | tee -a "$OUT/engine.log"; }
step "engine short" | tee -a "$OUT/engine.log"
run_eq 7 --model /tmp/models/llama.h5 --alpha 2 --beta 2 --case short
run_eq 12 --model /tmp/models/bert.h5 --alpha 2 --beta 3 --c-a 2 --case short
if [ "${1:-}" != quick ]; then
  step "engine long" | tee -a "$OUT/engine.log"
  run_eq 7 --model /tmp/models/llama.h5 --alpha 2 --beta 2 --case long
  run_eq 12 --model /tmp/models/bert.h5 --alpha 2 --beta 3 --c-a 2 --case long
fi
fi
step bench | tee "$OUT/bench.log"
timeout $(( ${BENCH_END:-575} - SECONDS )) python3 -m rshard_hpc bench kernel --out "$OUT/bench_kernel.md" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log"
step done
