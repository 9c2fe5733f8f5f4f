#!/usr/bin/env bash
# Start a local Prefect server (SQLite under $PREFECT_HOME) and a process worker, and
# deploy prefect.yaml.  Idempotent enough: stops a previous pair first.
#   PREFECT_HOME  (default: ./.prefect)   PREFECT_PORT  (default: 4200)
# Stop with scripts/prefect_down.sh (make serve-stop).
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
PORT="${PREFECT_PORT:-4200}"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
# the library's module loggers (stage decisions, DVC's output) in the flow-run logs
export PREFECT_LOGGING_EXTRA_LOGGERS=datasetdm
PY="${PYTHON:-$PWD/.venv/bin/python}"
PREFECT="$(dirname "$PY")/prefect"
RUN="$PREFECT_HOME/run"
mkdir -p "$RUN"
scripts/prefect_down.sh >/dev/null 2>&1 || true

# setsid: each gets its own process group, so stopping it stops its children too.
setsid "$PREFECT" server start --host 127.0.0.1 --port "$PORT" >"$RUN/server.log" 2>&1 < /dev/null &
echo $! >"$RUN/server.pid"
echo "prefect server: pid $(cat "$RUN/server.pid"), $PREFECT_API_URL, logs $RUN/server.log"
"$PY" - "$PREFECT_API_URL/health" <<'PYEOF'
import sys, time, urllib.request
deadline = time.time() + 180
while True:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2).read()
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("prefect server did not become healthy in 180 s")
        time.sleep(1)
PYEOF

"$PREFECT" work-pool create datasetdm-process --type process --overwrite >/dev/null
"$PREFECT" --no-prompt deploy --all
setsid "$PREFECT" worker start --pool datasetdm-process >"$RUN/worker.log" 2>&1 < /dev/null &
echo $! >"$RUN/worker.pid"
echo "prefect worker: pid $(cat "$RUN/worker.pid"), pool datasetdm-process, logs $RUN/worker.log"
echo "UI: http://127.0.0.1:$PORT   e.g.  PREFECT_API_URL=$PREFECT_API_URL prefect deployment run 'factory/default'"
