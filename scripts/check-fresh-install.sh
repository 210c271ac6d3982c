#!/usr/bin/env bash
# Fresh-install check of the Python package, as a new user would do it:
#   a new venv, `pip install .` (builds the Rust extension), the import every CGSE script does, and the
#   CLI round trip `start-bg` / `status` / `stop` on free loopback ports (a temporary local settings file).
# Fails on any error. Stops the daemon it started (by pid) and removes its scratch directory on exit
# (PROCMAN_KEEP_FRESH=1 keeps it). Needs python3 (>= 3.10) with venv, cargo, and access to PyPI for maturin.
#
# Usage: scripts/check-fresh-install.sh   (PYTHON=python3.12 picks the interpreter). It needs PyPI for maturin,
# so it runs in the host network; the daemon binds 127.0.0.1 only (BIND_ADDRESS in the temporary settings).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/procman-fresh.XXXXXX")
VENV="$WORK/venv"
PY="$VENV/bin/python"
SETTINGS="$WORK/local_settings.yaml"

log() { printf '[fresh-install %5ss] %s\n' "$SECONDS" "$*"; }
fail() { log "FAILED: $*"; exit 1; }

# Daemons of this check: `procman_cs start` processes whose environment names our settings file.
our_daemons() {
    [ -x "$PY" ] || return 0
    "$PY" - "$SETTINGS" <<'EOF'
import pathlib, sys
settings = sys.argv[1].encode()
for entry in pathlib.Path("/proc").iterdir():
    if not entry.name.isdigit():
        continue
    try:
        argv = (entry / "cmdline").read_bytes().split(b"\0")
        environ = (entry / "environ").read_bytes()
    except OSError:
        continue
    if b"egse.procman.procman_cs" in argv and b"start" in argv and settings in environ:
        print(entry.name)
EOF
}

cleanup() {
    local rc=$?
    for pid in $(our_daemons); do
        log "stopping leftover daemon $pid"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [ -n "${PROCMAN_KEEP_FRESH:-}" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT

log "venv with $($PYTHON --version 2>&1) in $WORK"
"$PYTHON" -m venv "$VENV"
log "pip install $ROOT (builds the extension)"
"$PY" -m pip install --quiet "$ROOT"
[ -x "$VENV/bin/procman_cs" ] || fail "no procman_cs console script in $VENV/bin"
[ ! -e "$VENV/bin/pm_cs" ] || fail "a pm_cs script: that name is cgse-core's (README, Installing into a CGSE environment)"

# Everything below runs outside the source tree, on loopback, with the CGSE environment of this check only.
cd "$WORK"
for var in $(env | sed -n 's/^\(CGSE_[A-Za-z0-9_]*\)=.*/\1/p'); do unset "$var"; done
unset SITE_ID COLUMNS PYTHONPATH
read -r CMD MON SVC < <("$PY" - <<'EOF'
import random, socket
ports = []
while len(ports) < 3:
    port = random.randint(20000, 30999)
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            continue
    if port not in ports:
        ports.append(port)
print(*ports)
EOF
)
cat >"$SETTINGS" <<EOF
Process Manager Control Server:
    COMMANDING_PORT: $CMD
    MONITORING_PORT: $MON
    SERVICE_PORT: $SVC
Procman:
    BIND_ADDRESS: 127.0.0.1
    STATE_DIR: $WORK/state
EOF
export PROJECT=CGSE CGSE_LOCAL_SETTINGS="$SETTINGS" CGSE_LOG_FILE_LOCATION="$WORK/log"
log "ports $CMD/$MON/$SVC"

"$PY" -c "from egse.procman import ProcessManagerProxy" || fail "import"
"$PY" - <<'EOF' || fail "installed package"
import egse, egse.procman
assert "site-packages/_cgse_procman/" in egse.procman.__file__, egse.procman.__file__
assert getattr(egse, "__file__", None) is None, "egse must stay a namespace package"
EOF
log "import OK"

out=$("$PY" -m egse.procman.procman_cs start-bg) || fail "start-bg exited with $?"
[ -z "$out" ] || fail "start-bg printed: $out"
for _ in $(seq 100); do
    "$PY" -c "import sys, egse.procman as m; sys.exit(0 if m.is_process_manager_active(0.2) else 1)" && break
    sleep 0.1
done
log "start-bg OK (daemon $(our_daemons | tr '\n' ' '))"

out=$("$PY" -m egse.procman.procman_cs status) || fail "status exited with $?"
expected="Process Manager:
    Status: active"
case "$out" in
    "$expected"*"Commanding port: $CMD"*"Service port: $SVC"*) ;;
    *) fail "status printed: $out" ;;
esac
log "status OK"

out=$("$PY" -m egse.procman.procman_cs stop) || fail "stop exited with $?: $out"
[ "$out" = "Sending 'quit' command to process manager.." ] || fail "stop printed: $out"
for _ in $(seq 100); do [ -z "$(our_daemons)" ] && break; sleep 0.1; done
[ -z "$(our_daemons)" ] || fail "the daemon is still running after stop"
[ -s "$WORK/log/pm_cs.start-bg.log" ] || fail "no daemon output in $WORK/log/pm_cs.start-bg.log"
log "stop OK"
log "fresh install: OK"
