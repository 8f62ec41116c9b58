#!/usr/bin/env bash
# Stop the daemons tests/slurm/start_cluster.sh DIR started (by the pids it recorded: slurmd, slurmctld and
# the cluster's private munged) and remove the munge folder. Bounded: a daemon alive after 10 s is killed.
set -uo pipefail
dir=$(realpath -m "${1:?usage: stop_cluster.sh DIR}")
pids=()
for name in slurmd slurmctld munged; do  # all at once: each takes 1-2 s to stop
  pid=$(cat "$dir/run/$name.pid" 2>/dev/null) || continue  # (the daemon removes its file as it stops)
  kill "$pid" 2>/dev/null && pids+=("$pid")
  rm -f "$dir/run/$name.pid"
done
for _ in $(seq 100); do
  alive=()
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
  (( ${#alive[@]} )) || break
  sleep 0.1
done
for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null; done
if [[ -s $dir/run/munge_dir ]]; then rm -rf "$(cat "$dir/run/munge_dir")" "$dir/run/munge_dir"; fi
exit 0
