#!/usr/bin/env bash
# Seed the libFuzzer corpora from the captured reference frames (not committed: see README.md).
#
#   fuzz/seed-corpus.sh [FIXTURES_DIR]     # default: tests/fixtures of the repository
#
# decode gets every captured pickle (requests, replies, monitoring messages); dispatch gets the requests and
# the monitoring messages. Files are copied under their SHA-1, so running it again adds nothing twice.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fixtures=${1:-$here/../tests/fixtures}
[[ -d "$fixtures" ]] || { echo "seed-corpus.sh: no fixtures directory $fixtures" >&2; exit 1; }
mkdir -p "$here/corpus/decode" "$here/corpus/dispatch"
copy() { # target file
    local sum
    sum=$(sha1sum "$2" | cut -c1-40)
    cp -n "$2" "$here/corpus/$1/$sum"
}
n=0
while IFS= read -r -d '' f; do
    copy decode "$f"
    case "$f" in
        *.rep.pickle) ;;
        *) copy dispatch "$f" ;;
    esac
    n=$((n + 1))
done < <(find "$fixtures" -type f \( -name '*.pickle' -o -name '*.bin' \) -print0)
echo "seed-corpus.sh: $n fixture files; corpus/decode has $(ls "$here/corpus/decode" | wc -l), corpus/dispatch has $(ls "$here/corpus/dispatch" | wc -l) inputs"
