#!/usr/bin/env bash
# CPU profiles of the daemon for the figures BENCHMARKS.md reports as missed: `Ping` one after the other,
# `list_processes` of 100 running processes, and `start_process` of 100 processes one after the other. The
# daemon runs on its embedded defaults (no CGSE services) with a process table of 100 `sleep`s;
# examples/wire_bench sends a fixed number of requests while perf watches; the starts are sent by
# bench/pyclient.py (the reference interpreter, as bench/bench.py does), perf recording only while they run.
#
#   scripts/in-netns.sh bash bench/profile.sh [target/release/pm_cs] [requests, default 20000] [start rounds, default 10]
#
# Writes bench/results/profile-<workload>.txt: `perf stat` software counts (this VM has no hardware counters),
# per request, and the top of `perf report` (cpu-clock sampling, call graphs). Needs `perf`, the release
# build of examples/wire_bench and, for the starts, the reference venv (PROCMAN_REF_VENV, default .venv-ref).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$(realpath "${1:-$ROOT/target/release/pm_cs}")
N=${2:-20000}
ROUNDS=${3:-10}
REF_PY=$(realpath "${PROCMAN_REF_VENV:-$ROOT/.venv-ref}")/bin/python
WIRE=$ROOT/target/release/examples/wire_bench
OUT=$ROOT/bench/results
WORK=$(mktemp -d)
pid=
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
export XDG_STATE_HOME=$WORK/state  # the daemon keeps its state (supervisor.json, logs) under it
{
    echo "python: python3"
    echo "allowed_programs: []"
    echo "defaults: {restart: never, autostart: true, stop_timeout: 2}"
    echo "core_services:"
    for i in $(seq -w 0 99); do echo "  P$i: {argv: [sleep, \"1000.$i\"]}"; done
} >"$WORK/table.yaml"
printf 'Procman:\n    PROCESS_TABLE: %s\n' "$WORK/table.yaml" >"$WORK/settings.yaml"
cd "$WORK"
"$BIN" start --settings "$WORK/settings.yaml" >"$WORK/log" 2>&1 &
pid=$!
running() { "$BIN" ps --json --settings "$WORK/settings.yaml" 2>/dev/null | grep -o '"state": *"RUNNING"' | wc -l; }
for _ in $(seq 300); do
    [ "$(running)" -ge 100 ] && break
    sleep 0.1
done
[ "$(running)" -ge 100 ] || { cat "$WORK/log"; echo "the 100 processes never ran" >&2; exit 1; }

profile() { # name, then the wire_bench arguments
    local name=$1
    shift
    local report=$OUT/profile-$name.txt
    perf stat -e task-clock,context-switches,cpu-migrations,page-faults -p "$pid" -o "$WORK/stat" &
    local stat=$!
    perf record -q -e cpu-clock -F 2999 -g -p "$pid" -o "$WORK/perf.data" >/dev/null 2>&1 &
    local rec=$!
    sleep 0.5
    local result
    result=$("$WIRE" --port 6120 "$@" | tail -1)
    kill -INT "$stat" "$rec"
    wait "$stat" "$rec" || true
    {
        echo "# $name: wire_bench $* against $(basename "$BIN") ($("$BIN" --version 2>/dev/null || true)), 100 processes running"
        echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "# wire_bench: $result"
        echo
        cat "$WORK/stat"
        echo
        perf report -i "$WORK/perf.data" --stdio --no-children --sort dso,symbol --percent-limit 1.5 -g none 2>/dev/null |
            grep -v '^$' | head -60
    } >"$report"
    echo "$report"
}
profile ping --ping "$N" --clients 1 --duration 0.1
profile list_processes --ping 10 --clients 1 --duration 0.1 --call list_processes --calls "$((N / 10))"

# start_process × 100, ROUNDS times (each followed by a stop of all, not recorded): perf is started disabled
# and switched on and off by the client through its control FIFOs.
ids=$(printf '"P%s",' $(seq -w 0 99))
spec="{\"phase\": \"sup_start_rounds\", \"cmd_port\": 6120, \"mon_port\": 6121, \"ids\": [${ids%,}], \"rounds\": $ROUNDS"
"$REF_PY" "$ROOT/bench/pyclient.py" "{\"phase\": \"stop_processes\", \"port\": 6120, \"ids\": [${ids%,}]}" >/dev/null
mkfifo "$WORK/ctl" "$WORK/ack"
report=$OUT/profile-start.txt
perf record -q -e cpu-clock -F 2999 -g -p "$pid" -o "$WORK/perf.data" -D -1 --control "fifo:$WORK/ctl,$WORK/ack" \
    >/dev/null 2>&1 &
rec=$!
sleep 0.5
result=$("$REF_PY" "$ROOT/bench/pyclient.py" "$spec, \"ctl\": \"$WORK/ctl\", \"ack\": \"$WORK/ack\"}" | tail -1)
kill -INT "$rec"
wait "$rec" || true
comms=$(perf report -i "$WORK/perf.data" --stdio --no-children --sort comm -g none 2>/dev/null |
    awk '!/^#/ && NF == 2 && $2 != "sleep" {print $2}' | paste -sd, -)
{
    echo "# start: $ROUNDS rounds of start_process × 100 (bench/pyclient.py sup_start_rounds) against $(basename "$BIN") ($("$BIN" --version 2>/dev/null || true))"
    echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "# pyclient (µs): $result"
    echo
    echo "# CPU by command: the daemon's threads, and the children it spawned (after their exec; before it, a"
    echo "# child still has the name of the daemon thread that cloned it)"
    perf report -i "$WORK/perf.data" --stdio --no-children --sort comm -g none 2>/dev/null | grep -v '^#' | grep -v '^$'
    echo
    echo "# the daemon's threads only"
    perf report -i "$WORK/perf.data" --stdio --no-children --comms "$comms" --percentage relative --sort dso,symbol --percent-limit 1 \
        -g none 2>/dev/null | grep -v '^$' | head -60
    echo
    echo "# the daemon's threads only, by caller chain (children included), top entries"
    perf report -i "$WORK/perf.data" --stdio --children --comms "$comms" --percentage relative --sort symbol --percent-limit 4 -g none \
        2>/dev/null | grep -v '^$' | head -60
} >"$report"
[ -n "${PROFILE_KEEP:-}" ] && cp "$WORK/perf.data" "$PROFILE_KEEP"
echo "$report"
