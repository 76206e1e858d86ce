#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for tests and CI (issue #19).
#
#   scripts/slurm-test-cluster.sh start  [DIR]   # writes the configs, starts the daemons, waits for an idle node
#   scripts/slurm-test-cluster.sh stop   [DIR]   # stops the daemons this script started (pid files under DIR)
#   scripts/slurm-test-cluster.sh status [DIR]   # exit 0 when the node answers and is usable
#   scripts/slurm-test-cluster.sh env    [DIR]   # prints `export SLURM_CONF=...` for clients (sbatch, squeue, submitit)
#
# DIR (default $KDPROBE_SLURM_DIR, else /tmp/kdprobe-slurm) holds everything: etc/slurm.conf,
# etc/slurmdbd.conf, the munge key and socket, controller state, slurmd spool, logs (log/), pid files
# (run/) and, with accounting, the MariaDB data folder. Nothing is written to /etc; clients find the
# cluster through SLURM_CONF=DIR/etc/slurm.conf (the file DIR/env exports it) and the munge socket
# through AuthInfo in that file. `start` wipes DIR's state first (a fresh cluster, job ids from 1).
#
# It installs nothing. The Debian packages (bookworm: Slurm 22.05, MUNGE 0.5):
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge slurmdbd mariadb-server
# (slurmdbd and mariadb-server only for accounting, see below). It runs as root, as CI does: slurmd must
# be root to start jobs, and SlurmUser=root keeps the daemons and the job owner the same.
#
# Accounting (sacct). submitit reads job states only through `sacct` (SlurmInfoWatcher): without
# accounting its Job.state is UNKNOWN and Job.done()/result() never return for a job that died without
# writing its result pickle (cancelled, killed, out of memory). kdprobe's trainers/executors.py does not
# depend on sacct: it reads submitit's result pickles, `squeue` for live jobs, and `sacct` (else
# `scontrol show job`) only for the final state of a job that ended without a result. So accounting is
# optional here: KDPROBE_SLURM_ACCOUNTING=auto (default) runs slurmdbd with a private MariaDB (TCP on
# 127.0.0.1, data under DIR/mysql) when slurmdbd and mariadbd are installed, 1 requires it, 0 runs with
# AccountingStorageType=accounting_storage/none (then sacct answers "accounting storage is disabled"
# and the tests that read sacct skip). Slurm 22.05 has no file-based accounting any more, so sacct
# needs slurmdbd.
#
# Requeue: JobRequeue=1 (batch jobs may be requeued), and submitit's preemption/time-limit path works
# unchanged: sbatch --signal=USR2@S makes Slurm send SIGUSR2 before the time limit (a test sends it with
# `scancel --signal=USR2`), submitit's handler calls the callable's checkpoint() and runs `scontrol
# requeue` from inside the job. KillWait=2 (SIGTERM to SIGKILL) keeps an external `scontrol requeue` of
# a job that ignores SIGTERM (submitit does) to seconds instead of the default 30.
#
# The daemons are started with fd 9 (the lock DIR.lock that serialises start/stop) closed, so they do
# not hold it. Ports: KDPROBE_SLURM_PORT (default 6817) for slurmctld, +1 slurmd, +2 slurmdbd, +3 MariaDB.
# The node has this machine's CPUs (nproc) and 90% of MemTotal; SlurmdParameters=config_overrides
# lets it register even where the hardware shows more cores than nproc (containers, cpusets).
set -euo pipefail

usage() { echo "usage: $0 start|stop|status|env [DIR]   (DIR default \$KDPROBE_SLURM_DIR or /tmp/kdprobe-slurm)" >&2; exit 2; }
[ $# -ge 1 ] || usage
CMD=$1
DIR=${2:-${KDPROBE_SLURM_DIR:-/tmp/kdprobe-slurm}}
case "$DIR" in /*) ;; *) DIR="$PWD/$DIR" ;; esac
PORT=${KDPROBE_SLURM_PORT:-6817}
ACCOUNTING=${KDPROBE_SLURM_ACCOUNTING:-auto}
NODE=kdprobe-node
CLUSTER=kdprobe
export SLURM_CONF="$DIR/etc/slurm.conf"

APT="apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge slurmdbd mariadb-server"

log() { echo "slurm-test-cluster: $*" >&2; }
die() { log "$*"; exit 1; }

have_slurm() {
    local b
    for b in munged slurmctld slurmd sinfo sbatch srun squeue scontrol scancel; do
        command -v "$b" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 || return 1
    done
}
have_accounting() {
    PATH="$PATH:/usr/sbin:/sbin" command -v slurmdbd >/dev/null 2>&1 &&
        PATH="$PATH:/usr/sbin:/sbin" command -v mariadbd >/dev/null 2>&1 &&
        command -v mariadb-install-db >/dev/null 2>&1 && command -v sacctmgr >/dev/null 2>&1
}
export PATH="$PATH:/usr/sbin:/sbin"

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local t=$1 what=$2; shift 2
    local end=$((SECONDS + t))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $end ] || return 1
        sleep 0.2
    done
    log "$what up after ${SECONDS}s"
}

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1; }
node_usable() { case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac; }

stop_pids() {  # stop_pids NAME...: SIGTERM to each (DIR/run/NAME.pid, only pids this script recorded), SIGKILL after 10 s
    local name pid pids=()
    for name in "$@"; do
        [ -f "$DIR/run/$name.pid" ] || continue
        pid=$(cat "$DIR/run/$name.pid")
        # a stale pid file (a machine restarted since) may name someone else's process now: only ours by name
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${name/mariadb/mariadbd}" ] && kill -TERM "$pid" 2>/dev/null &&
            pids+=("$pid")
        rm -f "$DIR/run/$name.pid"
    done
    local end=$((SECONDS + 10))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then log "pid $pid ignored SIGTERM; SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
    done
}

do_stop() {  # the Slurm daemons first (slurmctld sends its last records to slurmdbd), then what they used
    stop_pids slurmd slurmctld
    stop_pids slurmdbd mariadb munged
}

write_configs() {
    local cpus mem_kb mem acct_type defmem host
    cpus=$(nproc)
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    mem=$((mem_kb / 1024 * 9 / 10))
    defmem=$((mem / cpus)); [ "$defmem" -le 1024 ] || defmem=1024
    host=$(hostname -s 2>/dev/null || hostname)
    acct_type=accounting_storage/none
    [ "$1" = 1 ] && acct_type=accounting_storage/slurmdbd
    : > "$DIR/etc/plugstack.conf"
    cat > "$DIR/etc/slurm.conf" <<EOF
# written by scripts/slurm-test-cluster.sh: a single-node test cluster, everything under $DIR
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/etc/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$defmem
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=2
MinJobAge=300
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=$acct_type
AccountingStorageHost=localhost
AccountingStoragePort=$((PORT + 2))
AccountingStoragePass=$DIR/munge/munge.socket
NodeName=$NODE NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    cat > "$DIR/etc/slurmdbd.conf" <<EOF
# written by scripts/slurm-test-cluster.sh
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=localhost
DbdPort=$((PORT + 2))
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PORT + 3))
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/etc/slurmdbd.conf"  # slurmdbd refuses a readable one (it holds the password)
    echo "export SLURM_CONF=$DIR/etc/slurm.conf" > "$DIR/env"
    log "slurm.conf: node $NODE with $cpus CPUs, ${mem} MB, accounting $acct_type"
}

start_munge() {
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
    munged 9>&- --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
        || die "munged did not start; see $DIR/log/munged.log"
    wait_for 20 munged test -S "$DIR/munge/munge.socket" || die "munged socket missing; see $DIR/log/munged.log"
}

mysql_ok() { mariadb --no-defaults -S "$DIR/run/mysql.sock" -u root -e 'select 1'; }

start_accounting() {
    mkdir -p "$DIR/mysql"
    mariadb-install-db --no-defaults --datadir="$DIR/mysql" --user=root --auth-root-authentication-method=normal \
        --skip-test-db > "$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $DIR/log/mariadb-install.log"
    setsid mariadbd 9>&- --no-defaults --datadir="$DIR/mysql" --user=root --bind-address=127.0.0.1 --port=$((PORT + 3)) \
        --socket="$DIR/run/mysql.sock" --pid-file="$DIR/run/mariadb.pid" --log-error="$DIR/log/mariadb.log" \
        --skip-name-resolve --innodb-use-native-aio=0 --innodb-buffer-pool-size=64M \
        --innodb-lock-wait-timeout=900 < /dev/null > /dev/null 2>&1 &
    wait_for 60 mariadbd mysql_ok || die "MariaDB did not start; see $DIR/log/mariadb.log"
    mariadb --no-defaults -S "$DIR/run/mysql.sock" -u root -e \
        "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    slurmdbd 9>&- || die "slurmdbd did not start; see $DIR/log/slurmdbd.log"
    wait_for 60 slurmdbd sacctmgr -n list cluster || die "slurmdbd does not answer; see $DIR/log/slurmdbd.log"
    sacctmgr -i add cluster "$CLUSTER" > /dev/null
}

check_installed() {
    if ! have_slurm; then
        log "Slurm or MUNGE is not installed. Install them (Debian/Ubuntu) with:"
        echo "  $APT" >&2
        exit 3
    fi
    [ "$(id -u)" = 0 ] || die "run as root (slurmd starts jobs as their owner; CI runs as root)"
}

do_start() {
    local acct=0
    case "$ACCOUNTING" in
        0) ;;
        1) have_accounting || die "KDPROBE_SLURM_ACCOUNTING=1 needs slurmdbd and mariadb-server: $APT"; acct=1 ;;
        auto) have_accounting && acct=1 ;;
        *) die "KDPROBE_SLURM_ACCOUNTING must be 0, 1 or auto, got $ACCOUNTING" ;;
    esac
    if pid_alive "$DIR/run/slurmctld.pid" && node_usable; then
        log "already running (SLURM_CONF=$SLURM_CONF)"; echo "export SLURM_CONF=$SLURM_CONF"; return 0
    fi
    do_stop
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/log" "$DIR/munge" "$DIR/mysql" "$DIR/etc"
    mkdir -p "$DIR/etc" "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/log" "$DIR/munge"
    chmod 700 "$DIR/munge"
    write_configs "$acct"
    SECONDS=0
    start_munge
    [ "$acct" = 1 ] && start_accounting
    slurmctld 9>&- || die "slurmctld did not start; see $DIR/log/slurmctld.log"
    wait_for 30 slurmctld scontrol ping || die "slurmctld does not answer; see $DIR/log/slurmctld.log"
    slurmd 9>&- -N "$NODE" || die "slurmd did not start; see $DIR/log/slurmd.log"
    if ! wait_for 60 "node $NODE" node_usable; then
        log "node state: $(node_state); see $DIR/log/slurmd.log and $DIR/log/slurmctld.log"
        exit 1
    fi
    echo "export SLURM_CONF=$SLURM_CONF"
}

do_status() {
    if [ -f "$SLURM_CONF" ] && pid_alive "$DIR/run/slurmctld.pid" && node_usable; then
        echo "running: node $NODE $(node_state), SLURM_CONF=$SLURM_CONF, accounting $(grep -q slurmdbd "$SLURM_CONF" && echo on || echo off)"
        return 0
    fi
    echo "not running (DIR=$DIR)"
    return 1
}

case "$CMD" in
    start)
        check_installed
        mkdir -p "$DIR"
        exec 9> "$DIR.lock"
        flock 9  # two test sessions starting at once: the second waits and finds it running
        # a start that fails half-way stops what it started (the logs under DIR/log stay)
        trap 'rc=$?; if [ $rc != 0 ]; then log "start failed (exit $rc); stopping what it started"; do_stop; fi' EXIT
        do_start ;;
    stop)
        [ -d "$DIR" ] || exit 0
        exec 9> "$DIR.lock"
        flock 9
        do_stop; log "stopped" ;;
    status) do_status ;;
    env) echo "export SLURM_CONF=$SLURM_CONF" ;;
    *) usage ;;
esac
