#!/usr/bin/env bash
# Idle memory of one pm_cs binary on its embedded defaults (no CGSE services), and where it goes:
#
#   scripts/in-netns.sh bash bench/idle_rss.sh target/release/pm_cs [seconds idle, default 5]
#
# Prints /proc/<pid>/status's VmRSS, RssAnon, RssFile and threads, then the ten largest resident mappings.
# Copy a freshly built binary elsewhere and `sync` first, or its pages count as dirty page cache.
set -euo pipefail
BIN=$(realpath "$1")
IDLE=${2:-5}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export XDG_STATE_HOME=$WORK/state  # the daemon keeps its state (supervisor.json, logs) under it
cd "$WORK"
"$BIN" start >"$WORK/log" 2>&1 &
pid=$!
sleep "$IDLE"
grep -E "VmRSS|RssAnon|RssFile|Threads" "/proc/$pid/status"
awk '/^[0-9a-f]+-[0-9a-f]+ /{perm=$2; name=$6} /^Rss:/{ if ($2 > 0) print $2, "kB", perm, (name == "" ? "[anon]" : name)}' \
    "/proc/$pid/smaps" | sort -rn | head -10
kill "$pid"
wait "$pid" || true
