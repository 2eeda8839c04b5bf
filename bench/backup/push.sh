#!/bin/bash
# bench/backup/push.sh — a push job's full copy against nbdcopy of the same
# point-in-time export, in ONE run on the same data (ratios only hold inside
# one run).  Issue 6 bar: job >= 0.9x nbdcopy.
#
# Setup: cbwd-orch with one disk (the anchors' DISK: DISK_SIZE random,
# non-sparse, default 2 GiB) on the chain plugin + cbw + dirtybitmap
# filters.  Each round begins a full backup, then, alternating which goes
# first, measures
#   job      `cbw job start --target raw:FILE` until completed; time =
#            the job's own elapsed-ms (copy thread start to end, fsync
#            included; target created sparse at start)
#   nbdcopy  `nbdcopy --flush PIT-URI FILE` (a new sparse file), wall time
# and ends the backup (a job releases what it copied: the PIT cannot be read
# twice).  No guest writes.  Prints per-round times, then
# throughput ratio job/nbdcopy (= nbdcopy time / job time) min/median/max.
#
# Knobs (env): ROUNDS (3), DISK_SIZE (2G), REQUESTS / REQUEST_SIZE (job
# tuning, default 0 = automatic / 256K), CBW_BUILD (build tree), WORK (/tmp/cbw-bench-push),
# DROP_CACHES (lib.sh), OUT (results file, default bench/backup/push-results.md).
# Quick check while developing: DISK_SIZE=256M ROUNDS=1 DROP_CACHES=0 bench/backup/push.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ANCHORS=${ANCHORS:-$HERE/../../../shared/bench/anchors}
[ -f "$ANCHORS/lib.sh" ] || ANCHORS=/work/shared/bench/anchors
CBW_BUILD=${CBW_BUILD:-$HERE/../../build}
ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-0}
REQUEST_SIZE=${REQUEST_SIZE:-256K}
OUT=${OUT:-$HERE/push-results.md}
export WORK=${WORK:-/tmp/cbw-bench-push}
export RES=${RES:-$WORK/results}
export DISK=${DISK:-$WORK/disk.img}
rm -rf "$RES"
. "$ANCHORS/lib.sh"
CBW=$CBW_BUILD/server/cli/cbw
ORCHD=$CBW_BUILD/server/orch/cbwd-orch
MODS=$CBW_BUILD/modules
for f in "$CBW" "$ORCHD" "$MODS/nbdkit-cbw-filter.so" "$MODS/nbdkit-dirtybitmap-filter.so"; do
  [ -e "$f" ] || { log "build first: $f missing"; exit 1; }
done
PLUGIN=file; [ -f "$MODS/nbdkit-chain-plugin.so" ] && PLUGIN=chain
ensure_disk; warm_cache

STATE=$WORK/state; OUTF=$WORK/out.img
rm -rf "$STATE"; mkdir -p "$STATE"
export CBW_SOCKET=$STATE/control.sock
"$ORCHD" --state-dir "$STATE" --module-dir "$MODS" --plugin "$PLUGIN" --stop-disks \
  > "$RES/orchd.log" 2>&1 & ORCH_PID=$!; register_pid $ORCH_PID
for _ in $(seq 100); do [ -S "$CBW_SOCKET" ] && break; sleep 0.1; done
"$CBW" disk add bench --file "$DISK" >/dev/null
PIT="nbd+unix:///pit?socket=$STATE/disks/bench/nbd.sock"

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
run_job() {
  rm -f "$OUTF"
  local id
  id=$("$CBW" --json job start --target "raw:$OUTF" --requests "$REQUESTS" \
       --request-size "$REQUEST_SIZE" | jq -r .id)
  "$CBW" job wait "$id" >/dev/null || { log "job failed: $("$CBW" job status "$id")"; exit 1; }
  "$CBW" --json job status "$id" | jq '."elapsed-ms"'
}
run_nbdcopy() {
  rm -f "$OUTF"; truncate -s "$(stat -c %s "$DISK")" "$OUTF"
  local t0; t0=$(now_ms)
  nbdcopy --flush "$PIT" "$OUTF"
  echo $(( $(now_ms) - t0 ))
}
: > "$RES/job.ms"; : > "$RES/nbdcopy.ms"; : > "$RES/ratio"
for r in $(seq "$ROUNDS"); do
  order="job nbdcopy"; [ $((r % 2)) = 0 ] && order="nbdcopy job"
  declare -A t=()
  for who in $order; do
    "$CBW" backup begin >/dev/null
    sync
    t[$who]=$(run_$who)
    "$CBW" backup end >/dev/null
  done
  echo "${t[job]}" >> "$RES/job.ms"; echo "${t[nbdcopy]}" >> "$RES/nbdcopy.ms"
  ratio=$(awk -v a="${t[nbdcopy]}" -v b="${t[job]}" 'BEGIN{printf "%.3f", a/b}')
  echo "$ratio" >> "$RES/ratio"
  log "round $r ($order): job ${t[job]} ms, nbdcopy ${t[nbdcopy]} ms, ratio $ratio"
  unset t
done
rm -f "$OUTF"
read -r jmin jmed jmax n < <(stats < "$RES/job.ms")
read -r cmin cmed cmax _ < <(stats < "$RES/nbdcopy.ms")
read -r rmin rmed rmax _ < <(stats < "$RES/ratio")
{
  echo "# push job vs nbdcopy ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "disk $DISK_SIZE random, plugin $PLUGIN, rounds $n, job requests ${REQUESTS/#0/auto} x $REQUEST_SIZE,"
  echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg), nproc $(nproc)"
  echo
  echo "| | min | median | max |"
  echo "|---|---|---|---|"
  echo "| job ms | $jmin | $jmed | $jmax |"
  echo "| nbdcopy ms | $cmin | $cmed | $cmax |"
  echo "| ratio (job throughput / nbdcopy) | $rmin | $rmed | $rmax |"
  echo
  echo "bar: ratio >= 0.9"
} | tee "$OUT"
"$CBW" disk remove bench >/dev/null || true
