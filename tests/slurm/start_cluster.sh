#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (Debian's slurm-wlm and munge),
# for the workflow's SLURM tests. Needs root. Idempotent: exits 0 if the node is
# already up. Settings verified on slurm-wlm 22.05: linuxproc process tracking,
# no task plugin, no cgroup.conf, cons_tres selection, no accounting database.
set -euo pipefail

# Not `nproc`: it obeys OMP_NUM_THREADS, which a test process may have set to 1, and a
# 1-CPU node never starts the 2-CPU jobs the tests submit.
cpus=$(getconf _NPROCESSORS_ONLN)

if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
  if [ "$(sinfo -h -o %c | head -1)" = "$cpus" ]; then
    echo "slurm: already running"; exit 0
  fi
  echo "slurm: the running node does not have this machine's $cpus CPUs: restarting it" >&2
  scontrol shutdown >/dev/null 2>&1 || true
  pkill -x slurmd || true
  sleep 2
fi

host=$(hostname -s)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
conf_dir=/etc/slurm
mkdir -p "$conf_dir" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
chown -R munge:munge /run/munge 2>/dev/null || true

cat > "$conf_dir/slurm.conf" <<CONF
ClusterName=bhtest
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MinJobAge=600
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmUser=root
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
fi
pgrep -x munged >/dev/null || runuser -u munge -- munged --force 2>/dev/null || munged --force
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 1 60); do
  if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
    echo "slurm: node $host up with $cpus CPUs, ${mem_mb} MB"; exit 0
  fi
  scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "slurm: node did not come up; see /var/log/slurm/" >&2
exit 1
