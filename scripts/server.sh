#!/usr/bin/env bash
# A team tracking server on this machine: PostgreSQL as MLflow's backend store, and `mlflow server` with a
# proxied artifact root, both bound to 127.0.0.1 only. Everything lives under .server/ in the project:
#
#   .server/pgdata/       PostgreSQL data directory (owned by the database's OS user)
#   .server/artifacts/    artifact root served by the tracking server
#   .server/pgpass        the database password (libpq password file, mode 600)
#   .server/*.log         postgres.log, mlflow.log
#   .server/mlflow.pid    the mlflow server's process (and process group) id
#
# Usage: scripts/server.sh start|stop|status      (or: make server / make server-stop)
#
# Settings (environment): KDTRACK_SERVER_PORT (mlflow, default 5000), KDTRACK_PG_PORT (default 5433, so a
# system cluster on 5432 is left alone), KDTRACK_PG_BIN (default: the newest /usr/lib/postgresql/<ver>/bin),
# KDTRACK_PG_USER (the OS user PostgreSQL runs as when this script runs as root; default postgres),
# MLFLOW (the mlflow executable; default .venv/bin/mlflow). PostgreSQL refuses to run as root, so as root
# its binaries run as KDTRACK_PG_USER through runuser; otherwise they run as the calling user.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STATE="$ROOT/.server"
PGDATA="$STATE/pgdata"
PGPASS="$STATE/pgpass"
PID_FILE="$STATE/mlflow.pid"
HOST=127.0.0.1
PORT="${KDTRACK_SERVER_PORT:-5000}"
PG_PORT="${KDTRACK_PG_PORT:-5433}"
DB=mlflow
DB_USER=mlflow
MLFLOW="${MLFLOW:-$ROOT/.venv/bin/mlflow}"
URL="http://$HOST:$PORT"

die() { echo "error: $*" >&2; exit 1; }

pg_bin() {
    if [[ -n "${KDTRACK_PG_BIN:-}" ]]; then echo "$KDTRACK_PG_BIN"; return; fi
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    [[ -x "$dir/initdb" ]] || die "PostgreSQL not found — install it with: apt-get install -y postgresql (or set KDTRACK_PG_BIN)"
    echo "$dir"
}

# Runs a PostgreSQL binary as the database's OS user (never as root).
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        runuser -u "$PG_USER" -- "$@"
    else
        "$@"
    fi
}

pg_running() { [[ -f "$PGDATA/PG_VERSION" ]] && as_pg "$BIN/pg_ctl" status -D "$PGDATA" >/dev/null 2>&1; }

mlflow_running() { [[ -f "$PID_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; }

init_pg() {
    echo "creating the PostgreSQL cluster in $PGDATA"
    mkdir -p "$PGDATA"
    chmod 700 "$PGDATA"
    (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$STATE/pgpassword")
    [[ $EUID -eq 0 ]] && chown "$PG_USER:" "$PGDATA" "$STATE/pgpassword"
    as_pg "$BIN/initdb" -D "$PGDATA" -U "$DB_USER" --pwfile="$STATE/pgpassword" --auth-host=scram-sha-256 \
        --auth-local=peer --encoding=UTF8 --no-instructions > "$STATE/initdb.log"
    (umask 077; echo "$HOST:$PG_PORT:*:$DB_USER:$(cat "$STATE/pgpassword")" > "$PGPASS")
    rm -f "$STATE/pgpassword"
}

start_pg() {
    [[ -f "$PGDATA/PG_VERSION" ]] || init_pg
    touch "$STATE/postgres.log"
    [[ $EUID -eq 0 ]] && chown "$PG_USER:" "$STATE/postgres.log"
    # No unix socket: the server is reached over 127.0.0.1 only.
    as_pg "$BIN/pg_ctl" start -D "$PGDATA" -l "$STATE/postgres.log" -w \
        -o "-c listen_addresses=$HOST -c port=$PG_PORT -c unix_socket_directories=''" >/dev/null
    export PGPASSFILE="$PGPASS"
    if [[ -z "$("$BIN/psql" -h "$HOST" -p "$PG_PORT" -U "$DB_USER" -d postgres -tAc \
            "SELECT 1 FROM pg_database WHERE datname = '$DB'")" ]]; then
        "$BIN/createdb" -h "$HOST" -p "$PG_PORT" -U "$DB_USER" "$DB"
    fi
    echo "PostgreSQL started on $HOST:$PG_PORT (log: $STATE/postgres.log)"
}

start_mlflow() {
    [[ -x "$MLFLOW" ]] || die "$MLFLOW not found — run make install first (or set MLFLOW)"
    mkdir -p "$STATE/artifacts"
    # setsid: the server and its workers form one process group, which stop ends as a whole.
    PGPASSFILE="$PGPASS" setsid "$MLFLOW" server --host "$HOST" --port "$PORT" \
        --backend-store-uri "postgresql+psycopg2://$DB_USER@$HOST:$PG_PORT/$DB" \
        --artifacts-destination "$STATE/artifacts" >> "$STATE/mlflow.log" 2>&1 < /dev/null &
    echo $! > "$PID_FILE"
    for _ in $(seq 120); do
        if curl -fsS "$URL/health" >/dev/null 2>&1; then
            echo "mlflow server started at $URL (log: $STATE/mlflow.log)"
            return
        fi
        mlflow_running || die "mlflow server exited; see $STATE/mlflow.log"
        sleep 0.5
    done
    die "mlflow server not healthy after 60 s; see $STATE/mlflow.log"
}

start() {
    mkdir -p "$STATE"
    if pg_running; then echo "PostgreSQL already running on $HOST:$PG_PORT"; else start_pg; fi
    if mlflow_running; then echo "mlflow server already running at $URL (pid $(cat "$PID_FILE"))"; else start_mlflow; fi
    echo
    echo "export MLFLOW_TRACKING_URI=$URL"
}

stop() {
    if mlflow_running; then
        local pgid
        pgid="$(cat "$PID_FILE")"
        kill -TERM -- "-$pgid" 2>/dev/null || true
        for _ in $(seq 40); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pgid" 2>/dev/null || true
        echo "mlflow server stopped"
    else
        echo "mlflow server not running"
    fi
    rm -f "$PID_FILE"
    if pg_running; then
        as_pg "$BIN/pg_ctl" stop -D "$PGDATA" -m fast -w >/dev/null
        echo "PostgreSQL stopped"
    else
        echo "PostgreSQL not running"
    fi
}

status() {
    if pg_running; then echo "PostgreSQL running on $HOST:$PG_PORT"; else echo "PostgreSQL not running"; fi
    if mlflow_running; then echo "mlflow server running at $URL"; else echo "mlflow server not running"; fi
}

BIN="$(pg_bin)"
PG_USER="${KDTRACK_PG_USER:-postgres}"
if [[ $EUID -eq 0 ]] && ! id -u "$PG_USER" >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin "$PG_USER"
fi

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
