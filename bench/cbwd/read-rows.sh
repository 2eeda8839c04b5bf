#!/bin/bash
# cbw — bench/cbwd/read-rows.sh: every READ-side row of the cbwd performance
# table (store and PIT sequential reads vs nbdkit file, PIT vs QSD
# snapshot-access, nbdkit null as the transport bound, dirty map query vs QSD,
# incremental pull vs QSD) with its peers measured in the same run, one
# command.  Writes read-rows-results.md beside itself (or OUT).
#   usage: read-rows.sh [CBWD_OLD]    (an older cbwd binary: adds A/B rows)
#   env:   CBW_BUILD (build tree), SIZE (2G), ROUNDS (5), plus the knobs of
#          ab-read.sh and ../backup/incremental.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export CBW_BUILD=${CBW_BUILD:-$HERE/../../build}
OUT=${OUT:-$HERE/read-rows-results.md}
SIZE=${SIZE:-2G} ROUNDS=${ROUNDS:-5}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
{
  echo "# cbwd read rows ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) vCPUs, load average at start $(cut -d' ' -f1-3 /proc/loadavg))"
  echo
  echo "cbwd: $CBW_BUILD/server/cbwd ($(git -C "$HERE" rev-parse --short HEAD 2>/dev/null || echo '?'))${1:+, old: $1}; $(nbdkit --version | head -1); $(qemu-storage-daemon --version | head -1)"
  echo
} > "$T/head.md"
SIZE=$SIZE ROUNDS=$ROUNDS "$HERE/ab-read.sh" "$CBW_BUILD/server/cbwd" ${1:+"$1"} > "$T/read.md"
DISK_SIZE=$SIZE ROUNDS=$ROUNDS OUT="$T/incr.md" "$HERE/../backup/incremental.sh" >/dev/null
cat "$T/head.md" "$T/read.md" <(echo) "$T/incr.md" | tee "$OUT"
