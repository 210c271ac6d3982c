#!/usr/bin/env bash
# Run CMD inside a new, private network namespace that has only the loopback interface (brought up).
#
#   scripts/in-netns.sh CMD [ARGS...]
#
# The CGSE reference services bind tcp://*:<port> on every interface; in this namespace "every interface" is lo,
# so nothing they open is reachable from outside and nothing collides with services on the host.
#
# Needs `unshare` (util-linux) and `ip` (iproute2). As root it uses `unshare --net`; otherwise it tries an
# unprivileged user namespace (`unshare --map-root-user --net`). Exits 125 when no namespace can be made.
# CMD's exit status is returned unchanged.
set -euo pipefail

if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    [[ $# -eq 0 ]] && exit 2 || exit 0
fi

die() {
    echo "in-netns.sh: $*" >&2
    exit 125
}

command -v unshare >/dev/null 2>&1 || die "'unshare' not found (apt-get install util-linux)"
command -v ip >/dev/null 2>&1 || die "'ip' not found (apt-get install iproute2)"

# Already in a namespace where only lo has addresses (e.g. nested use): just run the command.
if [[ "${PROCMAN_IN_NETNS:-}" == "1" ]] && ! ip -o addr show | awk '{print $2}' | grep -qv '^lo$'; then
    exec "$@"
fi

unshare_args=()
if unshare --net true 2>/dev/null; then
    unshare_args=(--net)
elif unshare --map-root-user --net true 2>/dev/null; then
    unshare_args=(--map-root-user --net)
else
    err=$(unshare --net true 2>&1 || true)
    die "cannot create a network namespace ('unshare --net' failed: ${err:-no message}); run as root or enable unprivileged user namespaces"
fi

# shellcheck disable=SC2016  # $@ is expanded by the inner shell
exec unshare "${unshare_args[@]}" -- bash -c '
    ip link set lo up || { echo "in-netns.sh: ip link set lo up failed" >&2; exit 125; }
    export PROCMAN_IN_NETNS=1
    exec "$@"
' in-netns "$@"
