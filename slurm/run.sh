#!/usr/bin/env bash
#SBATCH --job-name=rshard
#SBATCH --time=01:00:00
#SBATCH --output=logs/%x-%j.out
# rshard on a Slurm cluster: one job file (slurm/job.toml) holds the job's `rshard run` options.
#
#   slurm/run.sh slurm/job.toml [rshard run options]             # outside Slurm: submits itself with
#                                                                 # --ntasks = 1 + alpha + beta^2
#   sbatch --ntasks=13 slurm/run.sh slurm/job.toml [options]      # or submit it yourself
#
# The job's output goes to logs/rshard-JOBID.out under the submit directory. sbatch does not create that
# folder (a job whose output folder is missing fails without a word): run.sh makes it when it submits itself;
# make it yourself (mkdir -p logs) before `sbatch slurm/run.sh`, or pass --output.
#
# Options after the job file override it (e.g. --out other.h5 --resume). Inside the allocation run.sh
# checks that SLURM_NTASKS is 1 + alpha + beta^2, adds --device gpu when the job has GPUs (each rank takes
# GPU SLURM_LOCALID mod the node's GPUs: ask for as many tasks per node as GPUs per node), checks the
# launch with `rshard doctor`, then starts the ranks.
#
# Launchers, tried in order until `rshard doctor` sees one MPI job of the right size:
#   srun --mpi=pmix   MPI libraries built with PMIx (Open MPI 5, most site MPIs)
#   srun --mpi=pmi2   MPICH (the pip `mpich` wheel) and MVAPICH
#   mpiexec           the MPI library's own launcher inside the allocation (MPICH's hydra starts its
#                     proxies with srun)
# A srun plugin is tried only when `srun --mpi=list` names it, and pmi2 before pmix when mpi4py's MPI
# library is MPICH or MVAPICH (which speak PMI-2), so that the log does not open with a failed PMIx launch.
# srun gets --kill-on-bad-exit=1: a rank that dies ends the whole step (hydra does so by itself).
#
# Environment:
#   RSHARD_LAUNCHER="srun --mpi=cray_shasta"  the site's launcher (used as is, followed by -n W; no fallback)
#   RSHARD_LAUNCHERS="srun-pmi2 mpiexec"      the order to try (default: the srun plugins `srun --mpi=list`
#                                             names, pmi2 first for MPICH, then mpiexec)
#   RSHARD_PREFLIGHT=0                        skip the doctor check (take the first launcher)
#   RSHARD_PYTHON=python3                     the Python that has rshard_hpc installed
#   RSHARD_GPUS_PER_NODE=4                    when submitting: ask for GPUs (and as many tasks per node)
#   RSHARD_SBATCH_ARGS="--time=4:00:00 -p gpu" when submitting: more sbatch options
#   RSHARD_DEVICE=cpu|gpu                     force the device (default: gpu when the job has GPUs)
#   RSHARD_MPS=1                              GPU jobs: run the ranks under a CUDA MPS control daemon on each
#                                             node (several ranks share a GPU better), started before the
#                                             doctor check and stopped when run.sh ends; skipped with a note
#                                             where nvidia-cuda-mps-control is missing. Pipes and logs go to
#                                             CUDA_MPS_PIPE_DIRECTORY / CUDA_MPS_LOG_DIRECTORY (default: a
#                                             folder of this job under /tmp)
set -euo pipefail

job=${1:?usage: run.sh JOB_FILE [rshard run options]  (see the comments at the top of slurm/run.sh)}
shift
py=${RSHARD_PYTHON:-python3}
read -r ntasks alpha beta < <("$py" -m rshard_hpc.run.jobfile "$job" "$@") || {
  echo "run.sh: cannot read the job file $job (see the message above)" >&2; exit 2; }

if [[ -z ${SLURM_JOB_ID:-} ]]; then  # not inside an allocation: submit this script with the right size
  submit=(--ntasks="$ntasks")
  gpus=${RSHARD_GPUS_PER_NODE:-0}
  if (( gpus > 0 )); then submit+=(--gpus-per-node="$gpus" --ntasks-per-node="$gpus"); fi
  mkdir -p logs  # the default --output folder: sbatch does not make it
  # shellcheck disable=SC2086  # RSHARD_SBATCH_ARGS is a list of options
  exec sbatch "${submit[@]}" ${RSHARD_SBATCH_ARGS:-} "$0" "$job" "$@"
fi

have=${SLURM_NTASKS:-${SLURM_NPROCS:-?}}
if [[ $have != "$ntasks" ]]; then
  echo "run.sh: error: this job has SLURM_NTASKS=$have tasks, but $job (alpha=$alpha, beta=$beta) needs" \
       "1 + alpha + beta^2 = $ntasks: submit with sbatch --ntasks=$ntasks, or run slurm/run.sh $job" \
       "outside Slurm and it submits itself" >&2
  exit 2
fi

device=()
gpus_here=${SLURM_GPUS_ON_NODE:-0}
if [[ ${RSHARD_DEVICE:-} == cpu ]]; then
  :
elif [[ ${RSHARD_DEVICE:-} == gpu || $gpus_here =~ ^[1-9] || -n ${SLURM_JOB_GPUS:-} || -n ${SLURM_STEP_GPUS:-} ]]; then
  device=(--device gpu)
fi

mps_step=
start_mps() {  # RSHARD_MPS=1 on a GPU job: a CUDA MPS control daemon on every node of the job
  [[ ${RSHARD_MPS:-0} == 1 && ${#device[@]} -gt 0 ]] || return 0
  if ! command -v nvidia-cuda-mps-control >/dev/null; then
    echo "run.sh: RSHARD_MPS=1, but nvidia-cuda-mps-control is not on PATH: running without MPS" >&2
    return 0
  fi
  export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/rshard-mps-$SLURM_JOB_ID/pipe}
  export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/rshard-mps-$SLURM_JOB_ID/log}
  local start='mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY" && nvidia-cuda-mps-control -d'
  trap stop_mps EXIT
  if (( ${SLURM_JOB_NUM_NODES:-1} > 1 )); then
    # a step's processes end with it: one task a node starts its daemon and stays, beside the job's steps
    srun --overlap --ntasks-per-node=1 -N "$SLURM_JOB_NUM_NODES" bash -c "$start && exec sleep infinity" &
    mps_step=$!
    sleep 3
  else
    bash -c "$start"
  fi
  echo "run.sh: CUDA MPS daemon started (pipes in $CUDA_MPS_PIPE_DIRECTORY)" >&2
}

stop_mps() {
  local quit='echo quit | nvidia-cuda-mps-control'
  if [[ -n $mps_step ]]; then
    srun --overlap --ntasks-per-node=1 -N "$SLURM_JOB_NUM_NODES" bash -c "$quit" || true
    kill "$mps_step" 2>/dev/null || true
  else
    bash -c "$quit" || true
  fi
  echo "run.sh: CUDA MPS daemon stopped" >&2
}

launch() {  # launch NAME COMMAND...: run COMMAND on $ntasks ranks with launcher NAME
  local name=$1; shift
  case $name in
    srun-pmix) srun --mpi=pmix --kill-on-bad-exit=1 -n "$ntasks" "$@" ;;
    srun-pmi2) srun --mpi=pmi2 --kill-on-bad-exit=1 -n "$ntasks" "$@" ;;
    # hydra's proxies run in a one-task-per-node srun step: their SLURM_LOCALID (0) is not the rank's
    mpiexec) mpiexec -n "$ntasks" env -u SLURM_LOCALID "$@" ;;
    site) ${RSHARD_LAUNCHER} -n "$ntasks" "$@" ;;  # word-split on purpose: a command and its options
    *) echo "run.sh: unknown launcher $name (srun-pmix, srun-pmi2, mpiexec)" >&2; return 2 ;;
  esac
}

default_launchers() {  # the srun plugins this Slurm has, in the order the MPI library likes, then mpiexec
  local plugins vendor order=(srun-pmix srun-pmi2) out=()
  plugins=$(srun --mpi=list 2>&1 || true)
  vendor=$("$py" -c 'import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; print(MPI.get_vendor()[0])' \
           2>/dev/null || true)
  if [[ $vendor == MPICH || $vendor == MVAPICH* ]]; then order=(srun-pmi2 srun-pmix); fi
  for name in "${order[@]}"; do
    if grep -qw -- "${name#srun-}" <<< "$plugins"; then out+=("$name"); fi
  done
  echo "${out[*]} mpiexec"
}

start_mps
if [[ -n ${RSHARD_LAUNCHER:-} ]]; then
  candidates=(site)
else
  read -r -a candidates <<< "${RSHARD_LAUNCHERS:-$(default_launchers)}"
  echo "run.sh: launchers to try: ${candidates[*]}" >&2
fi
chosen=
for name in "${candidates[@]}"; do
  if [[ $name == mpiexec ]] && ! command -v mpiexec >/dev/null; then continue; fi
  if [[ ${RSHARD_PREFLIGHT:-1} == 0 ]]; then chosen=$name; break; fi
  echo "run.sh: checking the launch with $name: rshard doctor on $ntasks ranks" >&2
  log=$(mktemp)
  status=0
  launch "$name" "$py" -m rshard_hpc doctor --alpha "$alpha" --beta "$beta" "${device[@]}" >"$log" 2>&1 || status=$?
  if (( status == 0 )); then
    cat "$log"; rm -f "$log"; chosen=$name; break
  fi
  if (( status == 2 )) && grep -q '^PROBLEM:' "$log"; then  # the launch works, the job cannot run
    cat "$log" >&2; rm -f "$log"
    echo "run.sh: error: rshard doctor found a problem (above)" >&2
    exit 2
  fi
  echo "run.sh: $name does not start one MPI job here (exit status $status):" >&2
  grep -E '^(PROBLEM|srun: error|.*[Ee]rror)' "$log" | sort -u | head -n 5 >&2 || true
  rm -f "$log"
done
if [[ -z $chosen ]]; then
  echo "run.sh: error: no launcher started one MPI job of $ntasks ranks (tried: ${candidates[*]});" \
       "set RSHARD_LAUNCHER to the site's launcher" >&2
  exit 2
fi

echo "run.sh: launching rshard run on $ntasks ranks with $chosen (job file $job)" >&2
status=0
launch "$chosen" "$py" -m rshard_hpc run --config "$job" "${device[@]}" "$@" || status=$?
exit "$status"
