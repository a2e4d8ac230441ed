#!/usr/bin/env bash
# A real two-node Slurm cluster with accounting on this one machine, for the tests marked `slurm`.
#
# Why each part is here (see the README's "Running on Slurm"):
# - slurmdbd + MariaDB: submitit polls `sacct`; without accounting a job killed before it wrote
#   its result (scancel, OOM) leaves the sweep driver waiting forever.
# - two `slurmd -N` daemons on one host (Debian builds Slurm with MULTIPLE_SLURMD), so a 2-node
#   job really puts rank 0 on n1 and rank 1 on n2.
# - no systemd, no cgroups: process tracking by /proc, no task binding.
# - fake GPU devices so `--gpus-per-node` is accepted (jobs still run on the CPU).
# Usage: bash .ci/system.d/slurm.sh [ENV_FILE]   (ROOT=/tmp/harness-slurm by default)
# It is idempotent: a cluster that already answers is left as it is.
set -euo pipefail
ROOT=${ROOT:-/tmp/harness-slurm}
ENV_FILE=${1:-.ci/env}
NODES=2
GPUS=2
export SLURM_CONF=$ROOT/slurm.conf

write_env() {
  [ -n "$ENV_FILE" ] || return 0
  mkdir -p "$(dirname "$ENV_FILE")"
  echo "export SLURM_CONF=$SLURM_CONF" >> "$ENV_FILE"
}

# The cluster's configuration, written below; a cluster that runs an older one is restarted with it.
slurm_conf() {
  HOST=$(hostname -s)
  CPUS=$(nproc)
  MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 * 8 / 10 / NODES ))
  cat <<EOF
ClusterName=harnessci
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=6827
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/none
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd-%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6829
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
MpiDefault=none
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
MinJobAge=600
GresTypes=gpu
NodeName=n[1-$NODES] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17101-$((17100 + NODES)) CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

if [ -f "$SLURM_CONF" ] && timeout 10 sinfo -h >/dev/null 2>&1 && timeout 10 sacct -n -X -S now >/dev/null 2>&1; then
  if cmp -s <(slurm_conf) "$SLURM_CONF"; then
    echo "[slurm] cluster at $ROOT already answers"
    write_env
    exit 0
  fi
  echo "[slurm] cluster at $ROOT runs an older configuration: restarting it"
  for pid in "$ROOT"/run/slurmctld.pid "$ROOT"/run/slurmd-n*.pid; do kill -TERM "$(cat "$pid")" 2>/dev/null || true; done
  for _ in $(seq 1 60); do { pgrep -x slurmctld || pgrep -x slurmd; } >/dev/null || break; sleep 0.5; done
fi

export DEBIAN_FRONTEND=noninteractive
need=()
for cmd in slurmctld slurmd sinfo munged slurmdbd mariadbd; do
  command -v "$cmd" >/dev/null || [ -x "/usr/sbin/$cmd" ] || need+=("$cmd")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge slurmdbd mariadb-server >/dev/null
fi

mkdir -p "$ROOT"/{state,run,log,dev,db,db-run}
for i in $(seq 1 $NODES); do mkdir -p "$ROOT/spool/n$i"; done

# --- munge: the daemons authenticate each other with it (the package created the key) ---------
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

# --- accounting: MariaDB on loopback (its own port and socket) + slurmdbd ----------------------
chown mysql:mysql "$ROOT/db" "$ROOT/db-run"
[ -d "$ROOT/db/mysql" ] || mariadb-install-db --user=mysql --datadir="$ROOT/db" >/dev/null
if ! mariadb -S "$ROOT/db-run/sock" -e 'select 1' >/dev/null 2>&1; then
  (mariadbd --user=mysql --datadir="$ROOT/db" --socket="$ROOT/db-run/sock" --pid-file="$ROOT/db-run/pid" \
    --bind-address=127.0.0.1 --port=3317 >"$ROOT/log/mariadb.log" 2>&1 &)
  for _ in $(seq 1 120); do mariadb -S "$ROOT/db-run/sock" -e 'select 1' >/dev/null 2>&1 && break; sleep 0.5; done
fi
mariadb -S "$ROOT/db-run/sock" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"

cat > "$ROOT/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort=6829
SlurmUser=root
LogFile=$ROOT/log/slurmdbd.log
PidFile=$ROOT/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3317
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
chmod 600 "$ROOT/slurmdbd.conf"

# --- the cluster --------------------------------------------------------------------------------
for g in $(seq 0 $((GPUS - 1))); do [ -e "$ROOT/dev/gpu$g" ] || mknod "$ROOT/dev/gpu$g" c 1 3; done
cat > "$ROOT/gres.conf" <<EOF
AutoDetect=off
NodeName=n[1-$NODES] Name=gpu File=$ROOT/dev/gpu[0-$((GPUS - 1))]
EOF
slurm_conf >"$SLURM_CONF"

# slurmdbd reads slurmdbd.conf from the folder of $SLURM_CONF.
pgrep -x slurmdbd >/dev/null || /usr/sbin/slurmdbd
for _ in $(seq 1 120); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.5; done
# slurmctld and each slurmd run in the foreground (-D) under a keeper that starts them again when
# they die of a signal other than a clean stop (HUP, INT, TERM, PIPE), as systemd's Restart=on-abort
# does for munged. Why: this Debian build's slurmd (22.05) aborted, in CI and here, with "double
# free or corruption" in munge_decode while unpacking job credentials of a job array launched at
# once; a node whose slurmd is gone answers nothing until SlurmdTimeout (300 s) marks it DOWN, and a
# job launched on it fails or waits to be requeued. Hence also CredType=cred/none above: job
# credentials are not signed with munge on this one-machine test cluster (every RPC is still
# authenticated by munge), which takes that code path out of the launch.
# Running jobs outlive a slurmd restart (their slurmstepd is a process of its own).
# keep NAME COMMAND...: detached from this shell, its output and restarts in $ROOT/log. An exit of
# 128 + HUP, INT, PIPE or TERM is a clean stop; an exit without a signal (a bad config) is not looped.
keep() {
  local name=$1; shift
  setsid -f bash -c '
    name=$1; log=$2; shift 2
    cd "$log"  # a core dump of an abort lands beside the logs, not in the folder this script ran from
    while :; do
      "$@" >>"$log/$name.out" 2>&1 && exit 0
      rc=$?
      case $rc in 129|130|141|143) exit "$rc" ;; esac
      [ "$rc" -gt 128 ] || exit "$rc"
      echo "[$(date -Is)] $name died of signal $((rc - 128)); starting it again" >>"$log/keeper.log"
      sleep 1
    done' keep "$name" "$ROOT/log" "$@" </dev/null >/dev/null 2>&1
}
pgrep -x slurmctld >/dev/null || keep slurmctld /usr/sbin/slurmctld -D -f "$SLURM_CONF"
for i in $(seq 1 $NODES); do
  [ -f "$ROOT/run/slurmd-n$i.pid" ] && kill -0 "$(cat "$ROOT/run/slurmd-n$i.pid")" 2>/dev/null ||
    keep "slurmd-n$i" /usr/sbin/slurmd -D -f "$SLURM_CONF" -N "n$i"
done
for _ in $(seq 1 120); do
  [ "$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)" -ge $NODES ] && break
  sleep 0.5
done
# A node that went INVAL in an earlier life comes back drained.
scontrol update nodename="n[1-$NODES]" state=resume >/dev/null 2>&1 || true
sinfo -N
write_env
