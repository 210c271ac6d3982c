#!/usr/bin/env bash
# Create (or check) the reference venv with the original CGSE services: cgse-core==0.25.11 from PyPI.
#
#   scripts/setup-ref-venv.sh            -> prints the reference interpreter path on stdout (last line)
#
# Environment:
#   PROCMAN_REF_VENV         venv directory (default: <repo>/.venv-ref)
#   PROCMAN_REF_BASE_PYTHON  interpreter to create it with (default: python3.11, 3.12, 3.10, 3.13, python3; >= 3.10)
#   PROCMAN_REF_UNPINNED=1   do not apply scripts/ref-venv-constraints.txt (newer dependency versions)
#   PROCMAN_REF_RECREATE=1   remove and recreate the venv
#
# Idempotent: when the venv exists and `import egse.procman, egse.registry.server` works with cgse-core 0.25.11 it
# only prints the path. Progress goes to stderr.
set -euo pipefail

CGSE_CORE_VERSION=0.25.11
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${PROCMAN_REF_VENV:-$repo/.venv-ref}
constraints=$repo/scripts/ref-venv-constraints.txt

log() { echo "setup-ref-venv: $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# The check runs with a neutral CGSE environment: a stale CGSE_LOCAL_SETTINGS would make every import fail.
check() {
    [[ -x "$venv/bin/python" ]] || return 1
    (
        cd /
        env -u CGSE_LOCAL_SETTINGS -u PYTHONPATH -u PYTHONHOME PROJECT=CGSE SITE_ID=XXXX CGSE_DOTENV_DISABLED=1 \
            timeout 120 "$venv/bin/python" -W ignore -c "
import importlib.metadata as md, sys
import egse.procman, egse.registry.server
assert md.version('cgse-core') == '$CGSE_CORE_VERSION', md.version('cgse-core')
assert sys.version_info >= (3, 10)
" >/dev/null 2>&1
    )
}

if [[ "${PROCMAN_REF_RECREATE:-}" != "1" ]] && check; then
    echo "$venv/bin/python"
    exit 0
fi

pick_python() {
    local candidates=() c
    if [[ -n "${PROCMAN_REF_BASE_PYTHON:-}" ]]; then
        candidates=("$PROCMAN_REF_BASE_PYTHON")
    else
        candidates=(python3.11 python3.12 python3.10 python3.13 python3)
    fi
    for c in "${candidates[@]}"; do
        if command -v "$c" >/dev/null 2>&1 &&
            "$c" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

# Serialise concurrent runs (two pytest sessions starting at once).
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
if command -v flock >/dev/null 2>&1; then
    timeout 900 flock 9 || die "could not lock $venv.lock"
fi
if [[ "${PROCMAN_REF_RECREATE:-}" != "1" ]] && check; then # made by a concurrent run meanwhile
    echo "$venv/bin/python"
    exit 0
fi

if [[ "${PROCMAN_REF_RECREATE:-}" == "1" ]] || ! { [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c '' 2>/dev/null; }; then
    base=$(pick_python) || die "no Python >= 3.10 with the venv and ensurepip modules found (set PROCMAN_REF_BASE_PYTHON; on Debian: apt-get install python3-venv)"
    log "creating $venv with $base ($("$base" --version 2>&1))"
    rm -rf "$venv"
    "$base" -m venv "$venv" || die "python -m venv failed"
fi

pip_args=(--disable-pip-version-check --no-input --quiet)
if [[ "${PROCMAN_REF_UNPINNED:-}" != "1" && -f "$constraints" ]]; then
    pip_args+=(--constraint "$constraints")
fi
log "installing cgse-core==$CGSE_CORE_VERSION into $venv (a few minutes on a new machine)"
PIP_REQUIRE_VIRTUALENV=1 timeout 1500 "$venv/bin/python" -m pip install "${pip_args[@]}" "cgse-core==$CGSE_CORE_VERSION" >&2 ||
    die "pip install cgse-core==$CGSE_CORE_VERSION failed (with PROCMAN_REF_UNPINNED=1 the version pins are dropped)"

check || die "cgse-core is installed but 'import egse.procman, egse.registry.server' fails in $venv"
log "ready"
echo "$venv/bin/python"
