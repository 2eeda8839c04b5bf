#!/bin/bash
# bench/overlay/commit-bench.sh: commit a 1 GiB overlay into a 2 GiB raw base
# with cbw's overlay engine (bench/overlay/ovc-tool) versus `qemu-img commit`
# of the equivalent qcow2 chain, in the same run on the same data.  Both
# overlays get the same writes (1 MiB every 2 MiB, byte patterns as qemu-io
# -P); after both commits the two bases must be identical.
# Prints a ratio: qemu-img time / cbw time (> 1: cbw is faster).
# Knobs: WORK (default /tmp/cbw-bench-overlay), RUNS (default 3), CBW_SRC.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CBW_SRC=${CBW_SRC:-$(cd "$HERE/../.." && pwd)}
WORK=${WORK:-/tmp/cbw-bench-overlay}
RUNS=${RUNS:-3}
SIZE=$((2 * 1024 * 1024 * 1024))
N=1024                                     # 1 MiB writes -> 1 GiB
mkdir -p "$WORK"
trap 'rm -f "$WORK"/b-*.img "$WORK"/*.qcow2 "$WORK"/c.chain* "$WORK"/ovc-tool' EXIT
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

gcc -O2 ${OVC_CFLAGS:-} -D_GNU_SOURCE -D_FILE_OFFSET_BITS=64 -I"$CBW_SRC/common" -I"$CBW_SRC/formats" \
  -I"$CBW_SRC/plugin/chain" -o "$WORK/ovc-tool" "$HERE/ovc-tool.c" \
  "$CBW_SRC/plugin/chain/overlay_chain.c" "$CBW_SRC/formats/overlay.c" \
  "$CBW_SRC/formats/bitmap.c" "$CBW_SRC/common/cbw_err.c" "$CBW_SRC/common/fileutil.c" \
  "$CBW_SRC/common/control.c" -ljson-c -lxxhash -lpthread
T=$WORK/ovc-tool

[ -f "$WORK/base.img" ] && [ "$(stat -c %s "$WORK/base.img")" = $SIZE ] ||
  { log "creating 2 GiB random base"; head -c $SIZE /dev/urandom > "$WORK/base.img"; }
QCMDS=()
for i in $(seq 0 $((N - 1))); do QCMDS+=(-c "write -q -P $(( i % 255 + 1 )) $((i * 2))M 1M"); done

tnow() { date +%s.%N; }
ours=() theirs=()
for r in $(seq "$RUNS"); do
  # cbw
  cp "$WORK/base.img" "$WORK/b-cbw.img"
  rm -f "$WORK"/c.chain*
  "$T" create "$WORK/c.chain" b-cbw.img 65536
  "$T" snapshot "$WORK/c.chain" >/dev/null
  "$T" fill "$WORK/c.chain" $((2 * 1024 * 1024)) $((1024 * 1024)) $N
  sync
  t0=$(tnow); "$T" commit "$WORK/c.chain" 1 1 delete >/dev/null; t1=$(tnow)
  ours+=("$(echo "$t1 - $t0" | bc)")
  # qemu
  cp "$WORK/base.img" "$WORK/b-qemu.img"
  rm -f "$WORK/ov.qcow2"
  qemu-img create -q -f qcow2 -b "$WORK/b-qemu.img" -F raw "$WORK/ov.qcow2"
  qemu-io -f qcow2 "$WORK/ov.qcow2" "${QCMDS[@]}" >/dev/null
  sync
  t0=$(tnow); qemu-img commit -q -f qcow2 "$WORK/ov.qcow2"; t1=$(tnow)
  theirs+=("$(echo "$t1 - $t0" | bc)")
  cmp "$WORK/b-cbw.img" "$WORK/b-qemu.img" || { log "FAIL: bases differ after commit"; exit 1; }
  log "run $r: cbw ${ours[-1]} s, qemu-img commit ${theirs[-1]} s"
done
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mo=$(med "${ours[@]}"); mq=$(med "${theirs[@]}")
echo "commit 1 GiB overlay into 2 GiB base: cbw ${mo} s, qemu-img commit ${mq} s, ratio (qemu/cbw) $(echo "scale=2; $mq / $mo" | bc)"
