#!/usr/bin/env bash
# Stop what scripts/prefect_up.sh started: the worker with SIGINT (it ignores SIGTERM),
# then the server, each with its whole process group.
set -uo pipefail
cd "$(dirname "$0")/.."
RUN="${PREFECT_HOME:-$PWD/.prefect}/run"
stop() {  # stop NAME SIGNAL: SIGNAL to the process group, again after 20 s, then SIGKILL
    local pidfile="$RUN/$1.pid"
    [[ -f "$pidfile" ]] || return 0
    local pid; pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        local how="stopped"
        # A process worker does not always finish its graceful shutdown after the first
        # SIGINT (seen with Prefect 3.9.1); a second one is Prefect's own "force" path.
        for attempt in 1 2; do
            kill "-$2" -- "-$pid" 2>/dev/null || kill "-$2" "$pid" 2>/dev/null
            for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break 2; sleep 0.5; done
            how="stopped (signal $2 sent twice)"
        done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null; how="killed"; fi
        echo "$1: $how"
    fi
    rm -f "$pidfile"
}
stop worker INT
stop server TERM
