#!/bin/bash
# bench/overlay/commit-bench.sh: commit a 1 GiB overlay into a 2 GiB raw base
# with cbw's overlay engine (bench/overlay/ovc-tool, mode delete) versus
# `qemu-img commit` of the equivalent qcow2 chain, in the same run on the
# same data.  Both overlays get the same writes (1 MiB every 2 MiB, byte
# patterns as qemu-io -P); after both commits the two bases must be
# identical (cmp), every round.
#
# Two measures per tool and round (wall clock, files in the page cache after
# `sync`, as a user would run them):
#   commit : until the data is merged into the base, durable (fdatasync) and
#            the chain switched.  cbw: ovc-tool start -> ovc_commit_wait
#            returned (includes opening the chain); qemu: `qemu-img commit
#            -d` (no emptying of the overlay), process wall time.
#   +free  : commit plus giving the overlay's space back.  cbw: until
#            ovc_close returned (the deleted layer's data file closed, its
#            blocks freed); qemu: the same `qemu-img commit -d` plus `rm` of
#            the overlay.  (Freeing a sparse 1 GiB data file with 1024
#            extents costs seconds on ext4 mounted with `discard`.)
# The order of the two tools alternates every round; a ratio (qemu time /
# cbw time, > 1: cbw is faster) is taken per round, and min/median/max of
# the per-round ratios are printed.  Bar (issue 7): commit ratio > 1.
#
# Knobs: WORK (/tmp/cbw-bench-overlay), ROUNDS (5; RUNS is accepted too),
#        DISK_MIB (2048: the bar's size; smaller for a quick check),
#        CBW_SRC (source tree), OVC_CHUNK / OVC_WORKERS / OVC_FLAGS (engine
#        tuning passed to ovc-tool, for A/B runs; unset = defaults).
# Writes commit-results.md beside itself (conditions + figures).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CBW_SRC=${CBW_SRC:-$(cd "$HERE/../.." && pwd)}
WORK=${WORK:-/tmp/cbw-bench-overlay}
ROUNDS=${ROUNDS:-${RUNS:-5}}
DISK_MIB=${DISK_MIB:-2048}
SIZE=$((DISK_MIB * 1024 * 1024))
N=$((DISK_MIB / 2))                        # 1 MiB writes every 2 MiB -> half the disk
mkdir -p "$WORK"
trap 'rm -f "$WORK"/b-*.img "$WORK"/*.qcow2 "$WORK"/c.chain* "$WORK"/ovc-tool' EXIT
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
for p in gcc qemu-img qemu-io bc; do command -v $p >/dev/null || { log "$p missing"; exit 1; }; done

gcc -O2 ${OVC_CFLAGS:-} -D_GNU_SOURCE -D_FILE_OFFSET_BITS=64 -I"$CBW_SRC/common" -I"$CBW_SRC/formats" \
  -I"$CBW_SRC/plugin/chain" -o "$WORK/ovc-tool" "$HERE/ovc-tool.c" \
  "$CBW_SRC/plugin/chain/overlay_chain.c" "$CBW_SRC/plugin/chain/overlay_open.c" \
  "$CBW_SRC/plugin/chain/commit.c" "$CBW_SRC/plugin/chain/overlay_ctl.c" "$CBW_SRC/formats/overlay.c" \
  "$CBW_SRC/formats/bitmap.c" "$CBW_SRC/common/cbw_err.c" "$CBW_SRC/common/fileutil.c" \
  "$CBW_SRC/common/control.c" -ljson-c -lxxhash -lpthread
T=$WORK/ovc-tool

[ -f "$WORK/base.img" ] && [ "$(stat -c %s "$WORK/base.img")" = $SIZE ] ||
  { log "creating $DISK_MIB MiB random base"; head -c $SIZE /dev/urandom > "$WORK/base.img"; }
QCMDS=()
for i in $(seq 0 $((N - 1))); do QCMDS+=(-c "write -q -P $(( i % 255 + 1 )) $((i * 2))M 1M"); done

tnow() { date +%s.%N; }
run_cbw() {     # sets cbw_c, cbw_t
  cp "$WORK/base.img" "$WORK/b-cbw.img"
  rm -f "$WORK"/c.chain*
  "$T" create "$WORK/c.chain" b-cbw.img 65536
  "$T" snapshot "$WORK/c.chain" >/dev/null
  "$T" fill "$WORK/c.chain" $((2 * 1024 * 1024)) $((1024 * 1024)) $N
  sync
  read -r cbw_c cbw_t < <("$T" commit "$WORK/c.chain" 1 1 delete)
}
run_qemu() {    # sets q_c, q_t
  cp "$WORK/base.img" "$WORK/b-qemu.img"
  rm -f "$WORK/ov.qcow2"
  qemu-img create -q -f qcow2 -b "$WORK/b-qemu.img" -F raw "$WORK/ov.qcow2"
  qemu-io -f qcow2 "$WORK/ov.qcow2" "${QCMDS[@]}" >/dev/null
  sync
  local t0 t1 t2
  t0=$(tnow); qemu-img commit -q -d -f qcow2 "$WORK/ov.qcow2"; t1=$(tnow)
  rm -f "$WORK/ov.qcow2"; t2=$(tnow)
  q_c=$(echo "$t1 - $t0" | bc); q_t=$(echo "$t2 - $t0" | bc)
}

rc=() rt=() tc=() tq=()
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then run_cbw; run_qemu; else run_qemu; run_cbw; fi
  cmp "$WORK/b-cbw.img" "$WORK/b-qemu.img" || { log "FAIL: bases differ after commit"; exit 1; }
  rc+=("$(echo "scale=4; $q_c / $cbw_c" | bc)")
  rt+=("$(echo "scale=4; $q_t / $cbw_t" | bc)")
  tc+=("$cbw_c"); tq+=("$q_c")
  log "round $r: commit cbw ${cbw_c}s qemu ${q_c}s (x${rc[-1]}); +free cbw ${cbw_t}s qemu ${q_t}s (x${rt[-1]})"
done
stats() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {m = NR % 2 ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2
    printf "min %.2f median %.2f max %.2f", a[1], m, a[NR]}'; }
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print NR % 2 ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
out=$(cat <<EOF
commit $N MiB overlay into $DISK_MIB MiB base, $ROUNDS rounds (ratio = qemu-img time / cbw time, >1: cbw faster)
  commit (merged+durable+switched): $(stats "${rc[@]}")   median times cbw $(med "${tc[@]}") s, qemu-img commit -d $(med "${tq[@]}") s   bar >1
  commit + free overlay space     : $(stats "${rt[@]}")
EOF
)
echo "$out"
{
  echo "# bench/overlay/commit-bench.sh — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs; $(uname -r);"
  echo "$(qemu-img --version | head -1); work dir $WORK on $(df -T "$WORK" | awk 'NR==2{print $2}');"
  echo "knobs: ROUNDS=$ROUNDS OVC_CHUNK=${OVC_CHUNK:-default} OVC_WORKERS=${OVC_WORKERS:-default} OVC_FLAGS=${OVC_FLAGS:-0}"
  echo
  echo '```'
  echo "$out"
  echo '```'
} > "$HERE/commit-results.md"
