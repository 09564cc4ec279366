#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (munge, MariaDB, slurmdbd, slurmctld,
# slurmd), for trying qdquant's SLURM profile and for its tests.
#
#   tests/workflow/cluster/slurm_cluster.sh start    # about 15 s; then: export SLURM_CONF=<dir>/slurm.conf
#   tests/workflow/cluster/slurm_cluster.sh status
#   tests/workflow/cluster/slurm_cluster.sh stop     # stops exactly the daemons start recorded
#
# Needs root and Debian's packages: apt-get install --no-install-recommends
# munge slurm-client slurmctld slurmd slurmdbd mariadb-server. Everything it makes
# (configs, logs, pid files, spool, the accounting database) lives in
# $QDQUANT_SLURM_DIR (default /tmp/qdquant-slurm); nothing under /etc is
# changed, and it runs its own MariaDB (port 3307); munged must take the default
# socket in /run/munge and Slurm's ports 6817-6819 must be free, so it is not for
# a machine that already runs Slurm.
# Daemons are started in the foreground under setsid and stopped by their
# recorded pids only (checked against /proc/PID/comm), never by name.
set -euo pipefail

DIR=${QDQUANT_SLURM_DIR:-/tmp/qdquant-slurm}
DIR=$(mkdir -p "$DIR" && cd "$DIR" && pwd)   # absolute: safe after any cd
CLUSTER=qdquant
PARTITION=debug
DB_PORT=${QDQUANT_SLURM_DB_PORT:-3307}
MUNGE_DIR=/run/munge
export SLURM_CONF=$DIR/slurm.conf
# start order; stop goes the other way
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
PACKAGES="munge slurm-client slurmctld slurmd slurmdbd mariadb-server"

say() { echo "slurm_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

alive() {  # alive NAME: the recorded pid runs that program (not a zombie, not a reused pid)
    local pidfile=$DIR/pids/$1 pid comm state
    [ -s "$pidfile" ] || return 1
    pid=$(cat "$pidfile")
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [ "$state" != Z ] && [ "${comm:0:15}" = "${1:0:15}" ]
}

launch() {  # launch NAME CMD...: in its own session, output to log/NAME.log, pid to pids/NAME
    local name=$1; shift
    setsid "$@" >"$DIR/log/$name.log" 2>&1 </dev/null &
    echo $! >"$DIR/pids/$name"
}

wait_for() {  # wait_for SECONDS DAEMON CMD...: until CMD succeeds; fail at once if DAEMON died
    local seconds=$1 name=$2 end; shift 2
    end=$((SECONDS + seconds))
    while [ "$SECONDS" -lt "$end" ]; do
        timeout 10 "$@" >/dev/null 2>&1 && return 0
        alive "$name" || die "$name exited: $(tail -n 3 "$DIR/log/$name.log" | tr '\n' ' ')(log: $DIR/log/$name.log)"
        sleep 0.2
    done
    die "$name did not come up within ${seconds} s (log: $DIR/log/$name.log)"
}

missing() {
    local cmd out=""
    for cmd in munged mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd sbatch sacct sacctmgr sinfo; do
        command -v "$cmd" >/dev/null 2>&1 || out="$out $cmd"
    done
    echo "${out# }"
}

write_configs() {
    local cpus mem
    # what slurmd finds on the machine (not `nproc`, which follows OMP_NUM_THREADS: a test
    # session where dask set it to 1 would get a one-CPU node that never runs a 2-CPU job)
    cpus=$(slurmd -C | sed -n 's/.* CPUs=\([0-9]*\).*/\1/p')
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$((mem * 95 / 100))   # more than the node reports gets it drained
    cat >"$DIR/slurm.conf" <<CONF
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/slurmctld
SlurmdSpoolDir=$DIR/slurmd
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.file.log
SlurmdLogFile=$DIR/log/slurmd.file.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
SlurmctldParameters=enable_configless
DefMemPerCPU=1000
ReturnToService=2
MinJobAge=300
MpiDefault=none
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoreFlags=job_comment
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
    cat >"$DIR/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=slurm
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.file.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=qdquant
StorageLoc=slurm_acct_db
CONF
    chown slurm:slurm "$DIR/slurmdbd.conf"
    chmod 600 "$DIR/slurmdbd.conf"
}

start() {
    [ "$(id -u)" = 0 ] || die "must run as root (it starts munged, slurmd and MariaDB)"
    local lacking
    lacking=$(missing)
    [ -z "$lacking" ] || die "not installed: $lacking (apt-get install --no-install-recommends $PACKAGES)"
    local name
    for name in "${DAEMONS[@]}"; do
        alive "$name" && die "$name already runs (pid $(cat "$DIR/pids/$name")); run stop first"
    done
    mkdir -p "$DIR/pids" "$DIR/log" "$DIR/munge" "$DIR/slurmctld" "$DIR/slurmd" "$MUNGE_DIR"
    chown munge:munge "$MUNGE_DIR"
    chmod 755 "$MUNGE_DIR"
    chown slurm:slurm "$DIR/slurmctld"
    chmod 755 "$DIR"
    # the daemons that drop root (mysql, slurm, munge) must reach their folders in $DIR
    runuser -u mysql -- test -x "$DIR" \
        || die "$DIR is not reachable by other users (a private parent folder); set QDQUANT_SLURM_DIR elsewhere"
    write_configs

    # Slurm's clients reach munge at its default socket only (/run/munge); --force takes over
    # the socket a munged that died left there
    launch munged munged --foreground --force --socket="$MUNGE_DIR/munge.socket.2" \
        --pid-file="$DIR/munge/munged.pid" --seed-file="$DIR/munge/munged.seed" \
        --log-file="$DIR/log/munged.file.log"
    wait_for 10 munged munge --socket="$MUNGE_DIR/munge.socket.2" -n

    if [ ! -d "$DIR/mysql/mysql" ]; then
        mkdir -p "$DIR/mysql"
        chown mysql:mysql "$DIR/mysql"
        mariadb-install-db --no-defaults --user=mysql --datadir="$DIR/mysql" --skip-test-db \
            --auth-root-authentication-method=socket >"$DIR/log/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed (see $DIR/log/mariadb-install.log)"
    fi
    launch mariadbd mariadbd --no-defaults --user=mysql --datadir="$DIR/mysql" --socket="$DIR/mysql/mysqld.sock" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$DIR/mysql/mysqld.pid" --skip-log-bin \
        --innodb-buffer-pool-size=64M
    wait_for 30 mariadbd mariadb --no-defaults --socket="$DIR/mysql/mysqld.sock" -u root -e "SELECT 1"
    mariadb --no-defaults --socket="$DIR/mysql/mysqld.sock" -u root -e "
        CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'qdquant';
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'qdquant';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

    launch slurmdbd slurmdbd -D
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true   # already there on a restart

    launch slurmctld slurmctld -D -i
    wait_for 30 slurmctld scontrol ping
    # configless: slurmd takes the config from slurmctld and caches it in /run/slurm/conf, where
    # commands inside jobs find it (Snakemake's SLURM plugin drops SLURM_* from a job's environment)
    launch slurmd env -u SLURM_CONF slurmd -D -N localhost --conf-server 127.0.0.1
    wait_for 30 slurmd sh -c "sinfo -h -N -o %T | grep -qx idle"
    say "up: partition $PARTITION, $(nproc) CPUs; export SLURM_CONF=$SLURM_CONF"
}

stop() {
    local i name pid
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        name=${DAEMONS[i]}
        if alive "$name"; then
            pid=$(cat "$DIR/pids/$name")
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do alive "$name" || break; sleep 0.2; done
            if alive "$name"; then kill -KILL "$pid" 2>/dev/null || true; fi
            say "stopped $name (pid $pid)"
        fi
        rm -f "$DIR/pids/$name"
    done
}

status() {
    local name rc=0
    for name in "${DAEMONS[@]}"; do
        if alive "$name"; then echo "$name: running (pid $(cat "$DIR/pids/$name"))"; else echo "$name: stopped"; rc=3; fi
    done
    return $rc
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    missing) lacking=$(missing); [ -z "$lacking" ] || { echo "$lacking"; exit 1; } ;;
    *) echo "usage: $0 start|stop|status|missing  (state in \$QDQUANT_SLURM_DIR, default /tmp/qdquant-slurm)" >&2; exit 2 ;;
esac
