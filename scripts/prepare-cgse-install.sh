#!/usr/bin/env bash
# Inputs of tests/python/test_cgse_install.py (our wheel installed next to cgse-core 0.25.11), built once:
#
#   target/cgse-install/wheelhouse/   cgse-core==0.25.11 and its dependencies (pinned by ref-venv-constraints.txt)
#   target/cgse-install/dist/         our wheel (maturin build --release)
#
# The download needs PyPI, so scripts/test-all.sh runs this in the host network before the namespaced tests; the
# test calls it again (then offline: a complete wheelhouse is not downloaded twice, and pip's cache serves repeats).
# Usage: scripts/prepare-cgse-install.sh [--offline]   Prints the wheel's path on its last line.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${PROCMAN_CGSE_INSTALL_DIR:-$ROOT/target/cgse-install}
PY=${PYTHON:-python3}
WHEELHOUSE=$OUT/wheelhouse
DIST=$OUT/dist
log() { echo "prepare-cgse-install: $*" >&2; }

mkdir -p "$WHEELHOUSE" "$DIST"
if [ ! -e "$WHEELHOUSE/.complete" ]; then
    if [ "${1:-}" = "--offline" ]; then
        log "no wheelhouse in $WHEELHOUSE and --offline: run this script once with network access"
        exit 2
    fi
    log "downloading cgse-core 0.25.11 and its dependencies into $WHEELHOUSE"
    "$PY" -m pip download -q --only-binary=:all: cgse-core==0.25.11 \
        -c "$ROOT/scripts/ref-venv-constraints.txt" -d "$WHEELHOUSE"
    touch "$WHEELHOUSE/.complete"
fi

# maturin: on PATH, else the one of the test venv (the test extra installs it).
if command -v maturin >/dev/null 2>&1; then
    MATURIN=(maturin)
elif [ -x "$ROOT/.venv/bin/maturin" ]; then
    MATURIN=("$ROOT/.venv/bin/maturin")
else
    log "maturin not found (pip install maturin, or '.[test]' into .venv)"
    exit 2
fi
log "building our wheel (${MATURIN[*]} build --release)"
rm -f "$DIST"/cgse_procman-*.whl
(cd "$ROOT" && "${MATURIN[@]}" build --release --quiet --manifest-path Cargo.toml -o "$DIST" >&2)
ls "$DIST"/cgse_procman-*.whl
