#!/bin/bash
# A/B of rshard run on this machine's CPUs: the working tree against an old tree, alternating, then whether the two
# sides' embeddings are bit-identical.   usage: bash tools/cpu_ab.sh OLD_TREE PROMPTS [RUNS] [RANKS] [RUN ARGS...]
#   OLD_TREE: a folder holding an old rshard_hpc (git archive REV rshard_hpc kernels | tar -x -C .old); PROMPTS: a
#   prompt file (python -c "from rshard_hpc.bench.prompts import word_prompts as p, write_prompts as w;
#   w('p12.jsonl', p(12, seed=1))"); RUN ARGS go to both sides' `rshard run` (e.g. --allow-weak-plan at 7 ranks).
#   Each line: side, the summary's seconds in the job, the launcher's wall.
set -eu
old=$(cd "$1" && pwd); prompts=$(realpath "$2"); runs=${3:-5}; ranks=${4:-13}; shift $(( $# < 4 ? $# : 4 ))
out=$(mktemp -d); export MPIR_CVAR_ENABLE_HEAVY_YIELD=${MPIR_CVAR_ENABLE_HEAVY_YIELD:-1}
cd "$out"  # not the repository: `python -m` would put its rshard_hpc first
for run in $(seq "$runs"); do for side in old new; do
  if [ $side = old ]; then env=(PYTHONPATH="$old" PYTHONSAFEPATH=1); else env=(RSHARD_AB=new); fi
  t0=$EPOCHREALTIME
  env "${env[@]}" mpiexec -n "$ranks" python -m rshard_hpc run --task embed --prompts "$prompts" \
    --out "$out/$side.h5" --overwrite "$@" > "$out/$side.log" 2>&1 || { tail -n 5 "$out/$side.log"; exit 1; }
  wall=$(python -c "print(round($EPOCHREALTIME - $t0, 2))")
  job=$(grep -o 'tokens in [0-9.]* s' "$out/$side.log" | head -n 1 | tr -dc '0-9.')
  echo "$side run $run: $job s in the job, wall $wall s"
done; done
python -c "
import h5py
a, b = (h5py.File('$out/' + s + '.h5')['embeddings'][()] for s in ('old', 'new'))
print('embeddings bit-identical:', a.tobytes() == b.tobytes(), '| max abs difference:', abs(a - b).max())"
rm -rf "$out"
