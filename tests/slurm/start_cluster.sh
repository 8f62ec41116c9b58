#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine, for tests (root; Debian's slurm-wlm and munge).
#
#   tests/slurm/start_cluster.sh DIR     # writes DIR/slurm.conf and DIR/env, starts a private munged,
#   . DIR/env                            # slurmctld and slurmd; then: sinfo, sbatch, srun ...
#   tests/slurm/stop_cluster.sh DIR      # stops what this script started
#
# Everything lives under DIR (state, spool, logs, pid files); /etc/slurm is not touched: clients find the
# cluster through SLURM_CONF (DIR/env). The node claims RSHARD_SLURM_CPUS CPUs (default 32, more than the
# machine has, with SlurmdParameters=config_overrides) so that 1 + alpha + beta^2 tasks fit; the partition
# oversubscribes. Ports: RSHARD_SLURM_PORT (slurmctld, default 6817) and the next one (slurmd).
set -euo pipefail
dir=$(realpath -m "${1:?usage: start_cluster.sh DIR}")
cpus=${RSHARD_SLURM_CPUS:-32}
port=${RSHARD_SLURM_PORT:-6817}
host=$(hostname -s)
export PATH=$PATH:/usr/sbin:/sbin  # the daemons live in sbin
for exe in slurmctld slurmd munged sinfo; do  # (a system munged is not needed, nor touched)
  command -v "$exe" >/dev/null || { echo "start_cluster.sh: $exe not found (apt-get install slurm-wlm munge)" >&2; exit 2; }
done
if [[ $(id -u) != 0 ]]; then echo "start_cluster.sh: run as root (SlurmUser=root)" >&2; exit 2; fi
mkdir -p "$dir"/state "$dir"/spool "$dir"/log "$dir"/run

# munge, authentication between the Slurm commands and daemons: a private munged for this cluster (its own
# key and socket, so that clusters of concurrent test sessions and a system munged do not meet). The socket
# folder must be reachable by everyone (munged checks), hence /run rather than DIR.
munge_dir=/run/rshard-munge.$port
rm -rf "$munge_dir" && install -d -m 755 "$munge_dir"
echo "$munge_dir" > "$dir/run/munge_dir"
head -c 1024 /dev/urandom > "$munge_dir/munge.key" && chmod 400 "$munge_dir/munge.key"
munged --socket="$munge_dir/munge.socket" --key-file="$munge_dir/munge.key" --log-file="$dir/log/munged.log" \
  --pid-file="$munge_dir/munged.pid" --seed-file="$munge_dir/munged.seed"
cp "$munge_dir/munged.pid" "$dir/run/munged.pid"

# Job ids unique to this cluster: under srun --mpi=pmi2 MPICH names its shared-memory segments after the job
# and step ids, so two test clusters (or a stale segment of a killed job) that both count from 1 collide.
first_job=$(( $(date +%s) % 5000000 * 10 + RANDOM % 10 + 1 ))
cat > "$dir/slurm.conf" <<CONF
ClusterName=rshardtest
FirstJobId=$first_job
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$munge_dir/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldPort=$port
SlurmdPort=$((port + 1))
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
PlugStackConfig=$dir/plugstack.conf
NodeName=$host CPUs=$cpus RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
: > "$dir/plugstack.conf"
echo "export SLURM_CONF=$dir/slurm.conf" > "$dir/env"
export SLURM_CONF=$dir/slurm.conf

slurmctld -c -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 120); do  # bounded: 60 s
  state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
  [[ $state == idle* ]] && { echo "start_cluster.sh: node $host idle ($cpus CPUs), SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 0.5
done
echo "start_cluster.sh: node $host did not become idle (state '${state:-?}'); logs in $dir/log" >&2
tail -n 20 "$dir"/log/*.log >&2 || true
exit 1
