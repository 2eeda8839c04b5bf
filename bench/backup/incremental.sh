#!/bin/bash
# bench/backup/incremental.sh — incremental backup of a disk with 1 % of its
# 64 KiB blocks dirty: cbwd against qemu-storage-daemon, in ONE run on the
# same data and the same dirty blocks (ratios only hold inside one run).
# Issue 6 bar: cbwd's incremental pull wall time <= QSD's.
#
#   cbwd-pull  cbwd (with its orchestrator): `backup begin --incremental c0
#              --readable changed` (the mode the recorded results were taken
#              in; nothing is written during the reads, so `all` reads the
#              same),
#              then client-tests/cbwd/incremental_reader (virtnbdbackup-style:
#              block status of qemu:dirty-bitmap:backup-DISK + base:allocation
#              in 32 MiB steps, reads only the dirty data) on cbwd's PIT export
#   cbwd-push  the same backup pushed by a job (`cbw job start`, incremental,
#              onto a raw copy); time = the job's elapsed-ms
#   qsd-pull   qemu-storage-daemon, file node with dirty bitmap bm0 (added
#              before the writes), exported with the bitmap (as the anchors'
#              e-qsd-dirty-bitmap.sh); the same incremental_reader
# Both disks get the same writes (one 64 KiB write per chosen block, blocks
# drawn with a fixed seed).  Timed: the reader process / the job only, not
# backup begin/end.  Rounds alternate the order.  Prints min/median/max of
# each and of the ratios qsd/cbwd (> 1: cbwd faster).
#
# Knobs (env): ROUNDS (3), DISK_SIZE (2G), DIRTY_PCT (1), CBW_BUILD, WORK
# (/tmp/cbw-bench-incr), DROP_CACHES (lib.sh), OUT (default
# bench/backup/incremental-results.md).
# Quick check: DISK_SIZE=256M ROUNDS=1 DROP_CACHES=0 bench/backup/incremental.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ANCHORS=${ANCHORS:-$HERE/../../../shared/bench/anchors}
[ -f "$ANCHORS/lib.sh" ] || ANCHORS=/work/shared/bench/anchors
CBW_BUILD=${CBW_BUILD:-$HERE/../../build}
ROUNDS=${ROUNDS:-3}
DIRTY_PCT=${DIRTY_PCT:-1}
OUT=${OUT:-$HERE/incremental-results.md}
export WORK=${WORK:-/tmp/cbw-bench-incr}
export RES=${RES:-$WORK/results}
export DISK=${DISK:-$WORK/disk.img}
rm -rf "$RES"
. "$ANCHORS/lib.sh"
CBW=$CBW_BUILD/server/cli/cbw
CBWD=$CBW_BUILD/server/cbwd
READER=$CBW_BUILD/client-tests/cbwd/incremental_reader
MODS=$CBW_BUILD/modules
for f in "$CBW" "$CBWD" "$READER" "$MODS/nbdkit-cbw-filter.so" "$MODS/nbdkit-dirtybitmap-filter.so"; do
  [ -e "$f" ] || { log "build first: $f missing"; exit 1; }
done
ensure_disk
SIZE=$(stat -c %s "$DISK")
CB=$WORK/cbwd-disk.img QD=$WORK/qsd-disk.img COPY=$WORK/copy.img
log "copying $DISK for cbwd and QSD"
cp "$DISK" "$CB"; cp "$DISK" "$QD"
warm_cache

# The dirty blocks: DIRTY_PCT % of the 64 KiB blocks, fixed seed.
"$PY" - "$SIZE" "$DIRTY_PCT" > "$RES/writes.txt" <<'EOF'
import random, sys
size, pct = int(sys.argv[1]), float(sys.argv[2])
n = size // 65536
r = random.Random(42)
for b in sorted(r.sample(range(n), max(1, int(n * pct / 100)))):
    print("-c", "write -P %d %d 65536" % (b % 250 + 1, b * 65536))
EOF
NDIRTY=$(wc -l < "$RES/writes.txt")
# writes_args URI: every write of writes.txt in one qemu-io
writes_args() {
  local a=() l
  while IFS= read -r l; do a+=(-c "${l#-c }"); done < "$RES/writes.txt"
  qemu-io -f raw "${a[@]}" "$1" >/dev/null
}

# ---- cbwd ----
STATE=$WORK/state S=$SOCKDIR/cbwd.sock
rm -rf "$STATE"; mkdir -p "$STATE"
export CBW_SOCKET=$STATE/control.sock
# the disk's nbdkit is detached (survives cbwd): remove the disk on any exit
trap '"$CBW" disk remove bench >/dev/null 2>&1 || true; cleanup' EXIT
srv "$CBWD" --listen "unix:$S" --state-dir "$STATE" --module-dir "$MODS" > "$RES/cbwd.log" 2>&1
register_pid $!
for _ in $(seq 100); do [ -S "$CBW_SOCKET" ] && break; sleep 0.1; done
"$CBW" disk add bench --file "$CB" >/dev/null
"$CBW" checkpoint create c0 >/dev/null
writes_args "nbd+unix:///?socket=$STATE/disks/bench/nbd.sock"

# ---- QSD ----
Q=$SOCKDIR/qmp.sock QS=$SOCKDIR/qsd.sock
srv qemu-storage-daemon --blockdev driver=file,node-name=file0,filename="$QD" \
  --chardev socket,id=qmp0,path="$Q",server=on,wait=off --monitor chardev=qmp0 \
  --nbd-server addr.type=unix,addr.path="$QS" > "$RES/qsd.log" 2>&1
register_pid $!
for _ in $(seq 100); do [ -S "$Q" ] && break; sleep 0.1; done
QMP() { "$PY" "$ANCHORS/qmp.py" "$Q" "$@"; }
QMP 'block-dirty-bitmap-add {"node":"file0","name":"bm0","granularity":65536}' \
    'block-export-add {"type":"nbd","id":"exp0","node-name":"file0","name":"disk","writable":true,"bitmaps":["bm0"]}' >/dev/null
QU="nbd+unix:///disk?socket=$QS"; wait_nbd "$QU"
writes_args "$QU"

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
fresh_copy() { rm -f "$COPY"; truncate -s "$SIZE" "$COPY"; }
run_cbwd_pull() {
  "$CBW" backup begin --incremental c0 --readable changed >/dev/null
  local uri; uri=$("$CBW" --json backup status | jq -r '.disks[0]."pit-uri"')
  fresh_copy; local t0; t0=$(now_ms)
  "$READER" "$uri" backup-bench "$COPY" > "$RES/reader-cbwd.txt"
  echo $(( $(now_ms) - t0 ))
  "$CBW" backup end >/dev/null
}
run_cbwd_push() {
  "$CBW" backup begin --incremental c0 --readable changed >/dev/null
  fresh_copy
  "$CBW" job start --target "raw:$COPY" --id push >/dev/null
  "$CBW" job wait push >/dev/null || { log "job failed: $("$CBW" job status push)"; exit 1; }
  "$CBW" --json job status push | jq '."elapsed-ms"'
  "$CBW" backup end >/dev/null
}
run_qsd_pull() {
  fresh_copy; local t0; t0=$(now_ms)
  "$READER" "$QU" bm0 "$COPY" > "$RES/reader-qsd.txt"
  echo $(( $(now_ms) - t0 ))
}
: > "$RES/cbwd-pull.ms"; : > "$RES/cbwd-push.ms"; : > "$RES/qsd-pull.ms"
: > "$RES/ratio-pull"; : > "$RES/ratio-push"
for r in $(seq "$ROUNDS"); do
  order="cbwd_pull qsd_pull cbwd_push"; [ $((r % 2)) = 0 ] && order="qsd_pull cbwd_push cbwd_pull"
  declare -A t=()
  for who in $order; do sync; t[$who]=$(run_$who); done
  echo "${t[cbwd_pull]}" >> "$RES/cbwd-pull.ms"; echo "${t[cbwd_push]}" >> "$RES/cbwd-push.ms"
  echo "${t[qsd_pull]}" >> "$RES/qsd-pull.ms"
  awk -v q="${t[qsd_pull]}" -v c="${t[cbwd_pull]}" 'BEGIN{printf "%.3f\n", q/(c>0?c:1)}' >> "$RES/ratio-pull"
  awk -v q="${t[qsd_pull]}" -v c="${t[cbwd_push]}" 'BEGIN{printf "%.3f\n", q/(c>0?c:1)}' >> "$RES/ratio-push"
  log "round $r: cbwd pull ${t[cbwd_pull]} ms, cbwd push ${t[cbwd_push]} ms, QSD pull ${t[qsd_pull]} ms" \
      "(reader: cbwd $(cat "$RES/reader-cbwd.txt"); qsd $(cat "$RES/reader-qsd.txt"))"
  unset t
done
# both readers must have seen the same dirty data (else the comparison is void)
cut -d' ' -f1-2 "$RES/reader-cbwd.txt" > "$RES/a"; cut -d' ' -f1-2 "$RES/reader-qsd.txt" > "$RES/b"
cmp -s "$RES/a" "$RES/b" || log "WARNING: the readers saw different dirty sizes: $(cat "$RES/a") vs $(cat "$RES/b")"
rm -f "$COPY" "$QD"
row() { read -r a b c _ < <(stats < "$RES/$1"); echo "| $2 | $a | $b | $c |"; }
{
  echo "# incremental backup, $DIRTY_PCT % of 64 KiB blocks dirty: cbwd vs QSD ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "disk $DISK_SIZE random, $NDIRTY dirty blocks, rounds $ROUNDS,"
  echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg), nproc $(nproc)"
  echo
  echo "| | min | median | max |"
  echo "|---|---|---|---|"
  row cbwd-pull.ms "cbwd pull (incremental_reader on the PIT export) ms"
  row cbwd-push.ms "cbwd push job (incremental, raw target) ms"
  row qsd-pull.ms "QSD pull (incremental_reader on the bitmap export) ms"
  row ratio-pull "ratio QSD / cbwd pull (> 1: cbwd faster)"
  row ratio-push "ratio QSD pull / cbwd push"
  echo
  echo "bar: cbwd pull wall time <= QSD (ratio >= 1)"
} | tee "$OUT"
"$CBW" disk remove bench >/dev/null || true
rm -f "$CB"
