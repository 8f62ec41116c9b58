#!/bin/bash
# Decode-step experiment on the lent GPU: transports x CUDA MPS, one call.  usage: bash tools/device_decode.sh
set -u
OUT=${OUT:-device_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
TOKENS=${TOKENS:-8192}; STEPS=${STEPS:-30}
job() {  # $1 label, rest: extra options
  local label=$1; shift
  echo "--- $label $(date -u +%T)"
  timeout 120 mpirun -n 7 python3 -m rshard_hpc bench job --alpha 2 --beta 2 --device gpu --tokens $TOKENS \
    --decode-steps $STEPS --no-plaintext --out /tmp/job.md "$@" 2>&1 | grep -E "^\| [0-9]|rror|Trace" | \
    awk -F'|' '{print "prefill_s",$6,"mpi_s",$10,"staging_s",$11,"decode_ms",$14}'
}
mps() { mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY; nvidia-cuda-mps-control -d && sleep 1; }
nomps() { echo quit | nvidia-cuda-mps-control; sleep 1; }
for round in 1 2; do
  job "ipc, no MPS ($round)"
  job "staged, no MPS ($round)" --transport staged
done
mps
for round in 1 2; do
  job "ipc, MPS ($round)"
  job "staged, MPS ($round)" --transport staged
done
nomps
