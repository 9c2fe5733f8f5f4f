#!/usr/bin/env bash
# Stop what scripts/prefect_up.sh started: the worker with SIGINT (it ignores SIGTERM),
# then the server, each with its whole process group.
set -uo pipefail
cd "$(dirname "$0")/.."
RUN="${PREFECT_HOME:-$PWD/.prefect}/run"
stop() {  # stop NAME SIGNAL
    local pidfile="$RUN/$1.pid"
    [[ -f "$pidfile" ]] || return 0
    local pid; pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "-$2" -- "-$pid" 2>/dev/null || kill "-$2" "$pid"
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -0 "$pid" 2>/dev/null && { kill -KILL -- "-$pid" 2>/dev/null; echo "$1: killed"; } || echo "$1: stopped"
    fi
    rm -f "$pidfile"
}
stop worker INT
stop server TERM
