#!/usr/bin/env bash
# quit_server -> process exit of one pm_cs binary on its embedded defaults (no CGSE services), N runs.
#
#   scripts/in-netns.sh bash bench/quit_exit.sh target/release/pm_cs [N]
#
# Prints one `exit_ms` per run (bench/pyclient.py's quit phase, run by the reference interpreter). The full
# side-by-side figure, with the CGSE services up, is bench/bench.py's "quit_server → process exit".
set -euo pipefail
BIN=$(realpath "$1")
N=${2:-10}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PROCMAN_REF_VENV:-$ROOT/.venv-ref}/bin/python
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export XDG_STATE_HOME=$WORK/state  # the daemon keeps its state (supervisor.json, logs) under it
cd "$WORK"
for _ in $(seq "$N"); do
    "$BIN" start >"$WORK/log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do
        "$PY" -c "
import pickle, sys, zmq
s = zmq.Context().socket(zmq.REQ); s.setsockopt(zmq.LINGER, 0); s.connect('tcp://127.0.0.1:6120')
s.send(pickle.dumps('Ping')); sys.exit(0 if s.poll(200) else 1)" && break
    done
    "$PY" "$ROOT/bench/pyclient.py" "{\"phase\": \"quit\", \"svc_port\": 6122, \"pid\": $pid}" 2>/dev/null |
        grep -o '"exit_ms": [0-9.]*' || { kill "$pid"; cat "$WORK/log"; exit 1; }
    wait "$pid"
done
