#!/bin/bash
# bench/backup/readable.sh — the cost of an incremental backup's readable
# set for the guest: copy-before-write copies per guest write while an
# incremental runs, `--readable all` against `--readable changed`, in ONE
# run on the same data and the same workload.
#
# Two disks (vda, vdb) are copies of one random image, run by cbwd-orch.
# Checkpoint c0, then the same DIRTY_PCT % of their 64 KiB blocks are
# written (the incremental's changed set).  Then, for each mode in turn
# (order alternates between rounds), `backup begin --incremental c0
# --readable MODE` on one disk, the same guest workload (WRITES random
# 4 KiB writes, fixed seed, uniform over the disk, through qemu-io on the
# live disk), the cbw filter's counters from `cbw --json backup status`
# (copied-blocks, copied-bytes), `backup end`.  Each round uses a new
# checkpoint base so both disks stay alike: the modes see identical data,
# changed sets and writes.
#
# Prints, per mode: guest writes, blocks copied, copies per guest write,
# bytes copied per byte written; and the ratio all/changed.  Counters, not
# times: the figures do not depend on the machine's load.
#
# Knobs (env): DISK_SIZE (1G), DIRTY_PCT (5), WRITES (4000), ROUNDS (2),
# CBW_BUILD (../../build), WORK (/tmp/cbw-bench-readable), OUT (stdout).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CBW_BUILD=${CBW_BUILD:-$HERE/../../build}
DISK_SIZE=${DISK_SIZE:-1G}
DIRTY_PCT=${DIRTY_PCT:-5}
WRITES=${WRITES:-4000}
ROUNDS=${ROUNDS:-2}
WORK=${WORK:-/tmp/cbw-bench-readable}
CBW=$CBW_BUILD/server/cli/cbw
ORCHD=$CBW_BUILD/server/orch/cbwd-orch
MODS=$CBW_BUILD/modules
for f in "$CBW" "$ORCHD" "$MODS/nbdkit-cbw-filter.so" "$MODS/nbdkit-dirtybitmap-filter.so"; do
  [ -e "$f" ] || { echo "build first: $f missing" >&2; exit 1; }
done
for p in qemu-io jq python3 nbdkit; do
  command -v $p >/dev/null || { echo "$p not installed" >&2; exit 1; }
done
log() { echo "[$(date +%T)] $*" >&2; }

rm -rf "$WORK"; mkdir -p "$WORK/state"
STATE=$WORK/state
export CBW_SOCKET=$STATE/control.sock
ORCHD_PID=
cleanup() {
  "$CBW" backup end >/dev/null 2>&1 || true
  for d in vda vdb; do "$CBW" disk remove $d >/dev/null 2>&1 || true; done
  [ -n "$ORCHD_PID" ] && { kill "$ORCHD_PID" 2>/dev/null; wait "$ORCHD_PID" 2>/dev/null; } || true
}
trap cleanup EXIT

BYTES=$(numfmt --from=iec "$DISK_SIZE")
log "image: $DISK_SIZE of random data"
head -c "$BYTES" /dev/urandom > "$WORK/vda.img"
cp "$WORK/vda.img" "$WORK/vdb.img"
"$ORCHD" --state-dir "$STATE" --module-dir "$MODS" --start-timeout 60 2>"$WORK/orchd.log" &
ORCHD_PID=$!
for _ in $(seq 100); do [ -S "$CBW_SOCKET" ] && break; sleep 0.1; done
for d in vda vdb; do "$CBW" disk add $d --file "$WORK/$d.img" --granularity 65536 >/dev/null; done
live() { echo "nbd+unix:///?socket=$STATE/disks/$1/nbd.sock"; }

# qemu-io command files: the changed set of round R, the workload of round R
gen() {
  python3 - "$BYTES" "$DIRTY_PCT" "$WRITES" "$1" "$2" <<'PY'
import random, sys
size, pct, writes, rnd, what = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
r = random.Random(1000 * rnd + (1 if what == "dirty" else 2))
n = size // 65536
if what == "dirty":
    for b in sorted(r.sample(range(n), max(1, int(n * pct / 100)))):
        print("write -P %d %d 65536" % (b % 250 + 1, b * 65536))
else:
    for _ in range(writes):
        print("write -P 7 %d 4096" % (r.randrange(size // 4096) * 4096))
PY
}
qio() {        # qio DISK FILE: run FILE's commands on DISK's live export
  local args=() c
  while IFS= read -r c; do args+=(-c "$c"); done < "$2"
  qemu-io -f raw "${args[@]}" "$(live "$1")" >/dev/null
}

declare -A copies bytes
for m in all changed; do copies[$m]=0; bytes[$m]=0; done
for r in $(seq "$ROUNDS"); do
  "$CBW" checkpoint create "c$r" >/dev/null
  gen "$r" dirty > "$WORK/dirty.qio"
  gen "$r" load > "$WORK/load.qio"
  for d in vda vdb; do qio $d "$WORK/dirty.qio"; done
  if [ $((r % 2)) = 1 ]; then order="all:vda changed:vdb"; else order="changed:vda all:vdb"; fi
  for md in $order; do
    m=${md%%:*} d=${md##*:}
    "$CBW" backup begin --disk $d --incremental "c$r" --readable $m >/dev/null
    qio $d "$WORK/load.qio"
    st=$("$CBW" --json backup status)
    c=$(echo "$st" | jq '.disks[0].session."copied-blocks"')
    b=$(echo "$st" | jq '.disks[0].session."copied-bytes"')
    "$CBW" backup end >/dev/null
    log "round $r, $m on $d: $c blocks copied ($b bytes) for $WRITES guest writes"
    copies[$m]=$(( ${copies[$m]} + c )); bytes[$m]=$(( ${bytes[$m]} + b ))
  done
done

W=$((WRITES * ROUNDS))
{
  echo "disk $DISK_SIZE, dirty bitmap granularity 64 KiB, changed set $DIRTY_PCT % of the blocks,"
  echo "$WRITES random 4 KiB guest writes per round, $ROUNDS rounds (sums below)."
  echo
  echo "| readable | guest writes | blocks copied | copies per guest write | bytes copied per byte written |"
  echo "|---|---|---|---|---|"
  for m in all changed; do
    awk -v m=$m -v w=$W -v c=${copies[$m]} -v b=${bytes[$m]} \
      'BEGIN { printf "| %s | %d | %d | %.3f | %.2f |\n", m, w, c, c / w, b / (w * 4096) }'
  done
  echo
  awk -v a=${copies[all]} -v c=${copies[changed]} \
    'BEGIN { if (c > 0) printf "all / changed: %.1f x the copies\n", a / c; else print "changed copied nothing" }'
} | tee ${OUT:+"$OUT"}
