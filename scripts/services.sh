#!/usr/bin/env bash
# Throw-away services for the tests: PostgreSQL, munge + single-node SLURM, and a Prefect server, all in one temp dir.
#
#   scripts/services.sh start    start everything (idempotent: a healthy running set is reused)
#   scripts/services.sh env      print the `export ...` lines (HOPFLOW_TEST_POSTGRES_URL, SLURM_CONF, PREFECT_API_URL)
#   scripts/services.sh status   one line per service; exit 0 only when all are up
#   scripts/services.sh stop     stop everything and remove the state dir (idempotent)
#
# Knobs: HOPFLOW_SERVICES_DIR (state dir, default /tmp/hopflow-services), HOPFLOW_PYTHON (python of the venv that has
# prefect, default .venv/bin/python), HOPFLOW_PG_BIN (PostgreSQL binaries, default the newest /usr/lib/postgresql/*/bin),
# HOPFLOW_SLURM_CPUS / HOPFLOW_SLURM_MEMORY_MB (the SLURM node's size), HOPFLOW_SERVICES_TIMEOUT (seconds per service),
# HOPFLOW_PREFECT_DATABASE (sqlite, the default, or postgres: the Prefect server keeps its own database `prefect` on the
# temporary PostgreSQL, as Prefect recommends for many concurrent flow runs; the campaign benchmark wants it).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${HOPFLOW_SERVICES_DIR:-/tmp/hopflow-services}
STATE=${STATE%/}
PYTHON=${HOPFLOW_PYTHON:-$ROOT/.venv/bin/python}
TIMEOUT=${HOPFLOW_SERVICES_TIMEOUT:-180}
PREFECT_DATABASE=${HOPFLOW_PREFECT_DATABASE:-sqlite}
PG_PASSWORD=
MARKER=.hopflow-services
PG_USER=hopflow
PG_DB=hopflow_test
SLURM_NODE=localhost
SLURM_PARTITION=debug

log() { printf '[services] %s\n' "$*" >&2; }

# Print the last lines of each given log file (that exists) to stderr.
tail_logs() {
    local f
    for f in "$@"; do
        if [[ -s $f ]]; then
            printf -- '----- last lines of %s -----\n' "$f" >&2
            tail -n 40 "$f" >&2
        fi
    done
}

# Report a failed service with its logs, stop whatever was started, exit 1.
fail() {
    local what=$1
    shift
    log "ERROR: $what"
    tail_logs "$@"
    log "stopping the services started so far"
    stop_all || true
    exit 1
}

# True when the process exists and is not a zombie.
alive() {
    local pid=${1:-}
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    local stat
    stat=$(sed -e 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ -n $stat && $stat != Z && $stat != X ]]
}

pidfile_pid() { [[ -s $1 ]] && head -n1 "$1" | tr -d '[:space:]' || true; }

# Send TERM to a pid (or a process group when given as -PGID), wait up to $2 s, then KILL.
terminate() {
    local pid=$1 wait_s=${2:-15} target=$1 i
    pid=${pid#-}
    alive "$pid" || return 0
    kill -TERM -- "$target" 2>/dev/null || true
    for ((i = 0; i < wait_s * 5; i++)); do
        alive "$pid" || return 0
        sleep 0.2
    done
    log "pid $pid did not stop after ${wait_s}s: KILL"
    kill -KILL -- "$target" 2>/dev/null || true
}

pg_bin() {
    if [[ -n ${HOPFLOW_PG_BIN:-} ]]; then
        echo "$HOPFLOW_PG_BIN"
        return
    fi
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
    if [[ -n $d ]]; then
        echo "$d"
    elif command -v initdb >/dev/null; then
        dirname "$(command -v initdb)"
    else
        echo "/usr/lib/postgresql/15/bin"
    fi
}

# Run a PostgreSQL command as the `postgres` user when we are root (initdb refuses root), else as ourselves.
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_ports() {
    "$PYTHON" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# ---------------------------------------------------------------- PostgreSQL
start_postgres() {
    local port=$1 bin dir=$STATE/postgres password
    bin=$(pg_bin)
    [[ -x $bin/initdb ]] || fail "PostgreSQL binaries not found in $bin (apt-get install postgresql, or set HOPFLOW_PG_BIN)"
    mkdir -p "$dir"
    password=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')
    printf '%s\n' "$password" >"$dir/pwfile"
    chmod 600 "$dir/pwfile"
    if [[ $EUID -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
        chown -R postgres: "$dir"
    fi
    log "PostgreSQL: initdb in $dir/data"
    as_pg "$bin/initdb" -D "$dir/data" -U "$PG_USER" --pwfile="$dir/pwfile" -E UTF8 --no-locale \
        --auth-local=trust --auth-host=scram-sha-256 -N >"$dir/initdb.log" 2>&1 ||
        fail "PostgreSQL initdb failed" "$dir/initdb.log"
    rm -f "$dir/pwfile"
    PG_PASSWORD=$password
    # fsync off: a throw-away test cluster; the socket lives in the state dir so nothing touches /var/run.
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t "$TIMEOUT" \
        -o "-h 127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c max_connections=200" \
        start >"$dir/pg_ctl.log" 2>&1 9>&- || fail "PostgreSQL did not start on 127.0.0.1:$port" "$dir/pg_ctl.log" "$dir/postgres.log"
    as_pg "$bin/createdb" -h "$dir" -p "$port" -U "$PG_USER" "$PG_DB" >>"$dir/pg_ctl.log" 2>&1 ||
        fail "PostgreSQL createdb $PG_DB failed" "$dir/pg_ctl.log" "$dir/postgres.log"
    PGPASSWORD=$password "$bin/psql" -h 127.0.0.1 -p "$port" -U "$PG_USER" -d "$PG_DB" -tAc 'select 1' >/dev/null 2>>"$dir/pg_ctl.log" ||
        fail "PostgreSQL password login over TCP failed" "$dir/pg_ctl.log" "$dir/postgres.log"
    echo "export HOPFLOW_TEST_POSTGRES_URL='postgresql+psycopg://$PG_USER:$password@127.0.0.1:$port/$PG_DB'" >>"$STATE/env.sh.tmp"
    log "PostgreSQL: up on 127.0.0.1:$port, database $PG_DB"
}

stop_postgres() {
    local dir=$STATE/postgres bin pid
    [[ -f $dir/data/postmaster.pid ]] || return 0
    bin=$(pg_bin)
    pid=$(pidfile_pid "$dir/data/postmaster.pid")
    if alive "$pid"; then
        as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >/dev/null 2>&1 || terminate "$pid" 10
    fi
}

# ---------------------------------------------------------------- munge + SLURM
start_munge() {
    local dir=$STATE/munge
    mkdir -p "$dir/key" "$dir/run"
    chmod 700 "$dir/key"
    chmod 755 "$dir" "$dir/run"
    if command -v mungekey >/dev/null; then
        mungekey -c -k "$dir/key/munge.key" >/dev/null 2>&1 || fail "mungekey could not create a key"
    else
        dd if=/dev/urandom of="$dir/key/munge.key" bs=1024 count=1 status=none
    fi
    chmod 400 "$dir/key/munge.key"
    command -v munged >/dev/null || fail "munged not found (apt-get install munge)"
    # A private munged (own key and socket): it neither needs nor disturbs a system-wide one.
    munged --force -S "$dir/run/munge.socket" --key-file="$dir/key/munge.key" --log-file="$dir/munged.log" \
        --pid-file="$dir/run/munged.pid" --seed-file="$dir/munged.seed" </dev/null >"$dir/start.log" 2>&1 9>&- ||
        fail "munged did not start" "$dir/start.log" "$dir/munged.log"
    munge -S "$dir/run/munge.socket" -n </dev/null | unmunge -S "$dir/run/munge.socket" >/dev/null 2>>"$dir/start.log" ||
        fail "munge round trip failed" "$dir/start.log" "$dir/munged.log"
    log "munge: up (socket $dir/run/munge.socket)"
}

write_slurm_conf() {
    local ctld_port=$1 slurmd_port=$2 dir=$STATE/slurm cpus mem_mb user
    cpus=${HOPFLOW_SLURM_CPUS:-$(nproc)}
    ((cpus >= 2)) || cpus=2
    mem_mb=${HOPFLOW_SLURM_MEMORY_MB:-$(awk '/MemTotal/ {m = int($2 / 1024 * 0.75); print (m > 8000 ? 8000 : m)}' /proc/meminfo)}
    user=$(id -un)
    cat >"$dir/slurm.conf" <<EOF
# Generated by scripts/services.sh: a throw-away single-node SLURM for the tests.
ClusterName=hopflowtest
SlurmctldHost=$SLURM_NODE
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/run/munge.socket
SlurmUser=$user
SlurmdUser=$user
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
ReturnToService=2
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MinJobAge=300
InactiveLimit=0
KillWait=5
NodeName=$SLURM_NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$SLURM_PARTITION Nodes=$SLURM_NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start_slurm() {
    local ctld_port=$1 slurmd_port=$2 dir=$STATE/slurm i state=
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null ||
        fail "slurmctld/slurmd not found (apt-get install slurm-wlm)"
    mkdir -p "$dir/state" "$dir/spool" "$dir/jobs"
    write_slurm_conf "$ctld_port" "$slurmd_port"
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF" </dev/null >"$dir/start.log" 2>&1 9>&- || fail "slurmctld did not start" "$dir/start.log" "$dir/slurmctld.log"
    slurmd -f "$SLURM_CONF" -N "$SLURM_NODE" </dev/null >>"$dir/start.log" 2>&1 9>&- || fail "slurmd did not start" "$dir/start.log" "$dir/slurmd.log"
    for ((i = 0; i < TIMEOUT * 2; i++)); do
        state=$(sinfo -h -n "$SLURM_NODE" -o %t 2>>"$dir/start.log" || true)
        [[ $state == idle ]] && break
        alive "$(pidfile_pid "$dir/slurmctld.pid")" || fail "slurmctld died" "$dir/start.log" "$dir/slurmctld.log"
        sleep 0.5
    done
    [[ $state == idle ]] || fail "SLURM node $SLURM_NODE not idle after ${TIMEOUT}s (state '$state')" \
        "$dir/start.log" "$dir/slurmctld.log" "$dir/slurmd.log"
    timeout "$TIMEOUT" sbatch --wait --quiet -J hopflow-smoke -o "$dir/jobs/smoke.out" --wrap hostname \
        </dev/null >>"$dir/start.log" 2>&1 && [[ -s $dir/jobs/smoke.out ]] ||
        fail "SLURM smoke job (sbatch --wrap hostname) did not run" "$dir/start.log" "$dir/slurmctld.log" "$dir/slurmd.log"
    echo "export SLURM_CONF='$SLURM_CONF'" >>"$STATE/env.sh.tmp"
    log "SLURM: node $SLURM_NODE idle, smoke job ran on $(head -n1 "$dir/jobs/smoke.out") (slurmctld port $ctld_port)"
}

stop_slurm() {
    local dir=$STATE/slurm ids i pid
    [[ -f $dir/slurm.conf ]] || return 0
    export SLURM_CONF=$dir/slurm.conf
    if alive "$(pidfile_pid "$dir/slurmctld.pid")"; then
        # Cancel jobs first: slurmd's shutdown leaves running job steps (e.g. Dask workers) behind.
        ids=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
        if [[ -n $ids ]]; then
            # shellcheck disable=SC2086
            timeout 10 scancel $ids 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                [[ -z $(timeout 5 squeue -h -t running,completing -o %A 2>/dev/null || true) ]] && break
                sleep 0.2
            done
        fi
        timeout 10 scontrol shutdown >/dev/null 2>&1 || true
    fi
    for pid in "$(pidfile_pid "$dir/slurmd.pid")" "$(pidfile_pid "$dir/slurmctld.pid")"; do
        terminate "$pid" 10
    done
}

stop_munge() {
    terminate "$(pidfile_pid "$STATE/munge/run/munged.pid")" 10
}

# ---------------------------------------------------------------- Prefect server
launch_prefect() {
    local port=$1 pg_port=${2:-} dir=$STATE/prefect prefect
    local -a database=()
    prefect=$(dirname "$PYTHON")/prefect
    [[ -x $prefect ]] || fail "prefect not found at $prefect (install the project into the venv, or set HOPFLOW_PYTHON)"
    mkdir -p "$dir/home"
    if [[ -n $pg_port ]]; then
        as_pg "$(pg_bin)/createdb" -h "$STATE/postgres" -p "$pg_port" -U "$PG_USER" prefect >>"$dir/createdb.log" 2>&1 ||
            fail "PostgreSQL createdb prefect failed" "$dir/createdb.log"
        database=("PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://$PG_USER:$PG_PASSWORD@127.0.0.1:$pg_port/prefect")
        log "Prefect server: database prefect on PostgreSQL"
    fi
    # Own session (setsid) so stop can end the server and its children as one process group.
    env "${database[@]}" PREFECT_HOME="$dir/home" PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_ENABLED=false \
        PREFECT_API_URL= PREFECT_LOGGING_LEVEL=WARNING \
        setsid "$prefect" server start --host 127.0.0.1 --port "$port" </dev/null >"$dir/server.log" 2>&1 9>&- &
    echo $! >"$dir/server.pid"
    echo "$port" >"$dir/port"
}

wait_prefect() {
    local dir=$STATE/prefect port pid i url
    port=$(cat "$dir/port")
    pid=$(pidfile_pid "$dir/server.pid")
    url=http://127.0.0.1:$port/api
    for ((i = 0; i < TIMEOUT * 2; i++)); do
        if "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2).read()' \
            "$url/health" >/dev/null 2>&1; then
            echo "export PREFECT_API_URL='$url'" >>"$STATE/env.sh.tmp"
            log "Prefect server: healthy at $url"
            return 0
        fi
        alive "$pid" || fail "Prefect server exited before becoming healthy" "$dir/server.log"
        sleep 0.5
    done
    fail "Prefect server not healthy at $url after ${TIMEOUT}s" "$dir/server.log"
}

stop_prefect() {
    local pid
    pid=$(pidfile_pid "$STATE/prefect/server.pid")
    [[ -n $pid ]] || return 0
    terminate "-$pid" 20
}

# ---------------------------------------------------------------- commands
running() {
    [[ -f $STATE/env.sh ]] &&
        alive "$(pidfile_pid "$STATE/munge/run/munged.pid")" &&
        alive "$(pidfile_pid "$STATE/slurm/slurmctld.pid")" &&
        alive "$(pidfile_pid "$STATE/slurm/slurmd.pid")" &&
        alive "$(pidfile_pid "$STATE/postgres/data/postmaster.pid")" &&
        alive "$(pidfile_pid "$STATE/prefect/server.pid")"
}

stop_all() {
    [[ -f $STATE/$MARKER ]] || return 0
    stop_prefect
    stop_slurm
    stop_munge
    stop_postgres
}

cmd_start() {
    if running; then
        log "already running in $STATE"
        return 0
    fi
    if [[ -f $STATE/$MARKER ]]; then
        log "stale state in $STATE: cleaning it first"
        stop_all
        rm -rf "$STATE"
    elif [[ -d $STATE && -n $(ls -A "$STATE") ]]; then
        log "ERROR: $STATE exists, is not empty and was not made by this script; set HOPFLOW_SERVICES_DIR elsewhere"
        exit 1
    fi
    [[ -x $PYTHON ]] || {
        log "ERROR: $PYTHON not found (create the venv first, e.g. bash scripts/test.sh, or set HOPFLOW_PYTHON)"
        exit 1
    }
    mkdir -p "$STATE"
    chmod 755 "$STATE"
    touch "$STATE/$MARKER"
    : >"$STATE/env.sh.tmp"
    local t0=$SECONDS pg_port ctld_port slurmd_port prefect_port
    read -r pg_port ctld_port slurmd_port prefect_port <<<"$(free_ports 4)"
    log "starting in $STATE"
    case $PREFECT_DATABASE in
    sqlite)
        launch_prefect "$prefect_port" # slowest: let it boot while the others start
        start_postgres "$pg_port" ;;
    postgres)
        start_postgres "$pg_port"
        launch_prefect "$prefect_port" "$pg_port" ;;
    *) fail "HOPFLOW_PREFECT_DATABASE must be sqlite or postgres, not '$PREFECT_DATABASE'" ;;
    esac
    start_munge
    start_slurm "$ctld_port" "$slurmd_port"
    wait_prefect
    mv "$STATE/env.sh.tmp" "$STATE/env.sh"
    log "all services up in $((SECONDS - t0))s; environment: eval \"\$(scripts/services.sh env)\""
}

cmd_stop() {
    if [[ ! -e $STATE ]]; then
        log "nothing to stop in $STATE"
        return 0
    fi
    if [[ ! -f $STATE/$MARKER ]]; then
        log "ERROR: $STATE was not made by this script; not touching it"
        exit 1
    fi
    stop_all
    rm -rf "$STATE"
    rm -f "$STATE.lock"
    log "stopped; removed $STATE"
}

cmd_env() {
    if ! running; then
        log "ERROR: services are not running in $STATE (run: scripts/services.sh start)"
        exit 1
    fi
    cat "$STATE/env.sh"
}

cmd_status() {
    local rc=0 name pidfile
    for name in munged:munge/run/munged.pid slurmctld:slurm/slurmctld.pid slurmd:slurm/slurmd.pid \
        postgres:postgres/data/postmaster.pid prefect:prefect/server.pid; do
        pidfile=$STATE/${name#*:}
        if alive "$(pidfile_pid "$pidfile")"; then
            printf '%-10s up (pid %s)\n' "${name%%:*}" "$(pidfile_pid "$pidfile")"
        else
            printf '%-10s down\n' "${name%%:*}"
            rc=1
        fi
    done
    return $rc
}

main() {
    local cmd=${1:-}
    case $cmd in
    start | stop | env | status) ;;
    *)
        echo "usage: $0 start|stop|env|status   (state dir: \$HOPFLOW_SERVICES_DIR, now $STATE)" >&2
        exit 2
        ;;
    esac
    # One start/stop at a time per state dir (daemons are started with fd 9 closed so they do not hold the lock).
    exec 9>"$STATE.lock"
    flock -w "$TIMEOUT" 9 || {
        log "ERROR: another services.sh holds $STATE.lock"
        exit 1
    }
    "cmd_$cmd"
}

main "$@"
