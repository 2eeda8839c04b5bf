#!/bin/bash
# cbw — bench/cbwd/ab-pit.sh: back-to-back A/B of the point-in-time read
# path, ONE run, same data, same page cache state, order rotated each round:
#   direct  cbwd PIT export with direct reads (state-file + live-file +
#           store-file: reads the disk image itself, following the cbw
#           session's shared state map) — what cbwd's orchestrator sets up
#   proxy   the same cbwd binary, same session, PIT export proxying the cbw
#           filter's PIT export (two hops; the only path before direct reads)
#   qsd     qemu-storage-daemon: copy-before-write + snapshot-access export of
#           its own copy of the disk (the peer of issue #5, as the anchors'
#           d1-qsd-fleecing-first.sh)
#   old     (optional, 2nd argument) an older cbwd binary as a proxy
# State: a backup session begun with nothing copied yet (reads come from the
# live disk), like case D-fleece-first.  Metric: nbdcopy of the whole export
# to null:, with 4 and 1 connections: MiB/s (wall clock: only meaningful on
# an idle machine) and the CPU time the serving processes used per GiB
# (cbwd + nbdkit, or QSD; from /proc/PID/stat: far less sensitive to other
# load than wall time).  Prints min/median/max and per-round ratios against
# qsd and proxy (> 1: faster / cheaper than the peer).
#   usage: ab-pit.sh [CBWD [CBWD_OLD]]
#   env:   ROUNDS (3), SIZE (1G; random data), DIR (/var/tmp), PIT_CONNS (8),
#          CBW_BUILD (build tree with modules/), MODES (direct proxy qsd [old])
# Quick check while developing: SIZE=512M ROUNDS=3 bench/cbwd/ab-pit.sh
set -euo pipefail
CBW_BUILD=${CBW_BUILD:-/tmp/build-P}
B=${1:-$CBW_BUILD/server/cbwd}
A=${2:-}
FILTER=${CBW_FILTER:-$CBW_BUILD/modules/nbdkit-cbw-filter.so}
ROUNDS=${ROUNDS:-3} SIZE=${SIZE:-1G}
MODES=${MODES:-direct proxy qsd${A:+ old}}
for f in "$B" "$FILTER"; do [ -e "$f" ] || { echo "missing $f (build first)" >&2; exit 1; }; done
command -v qemu-storage-daemon >/dev/null || MODES=${MODES/qsd/}
D=$(mktemp -d "${DIR:-/var/tmp}/cbwd-abpit.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$D"; }
trap cleanup EXIT
waitnbd() { for _ in $(seq 200); do nbdinfo --size "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "no server at $1" >&2; exit 1; }
ctl() {
  python3 - "$1" "$2" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rwb")
f.readline(); f.write(sys.argv[2].encode() + b"\n"); f.flush(); print(f.readline().decode().strip())
EOF
}
cpu_ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }

head -c "$SIZE" /dev/urandom > "$D/disk.img"
cp "$D/disk.img" "$D/qsd.img"
bytes=$(stat -c %s "$D/disk.img")
truncate -s "$bytes" "$D/store.img"

# The cbw stack: store cbwd, nbdkit + cbw filter, session with a state map.
"$B" --listen "unix:$D/store.sock" --export "name=store,type=store,path=$D/store.img" 2>"$D/store.log" &
PIDS+=($!)
nbdkit -f -U "$D/live.sock" --filter="$FILTER" file "$D/disk.img" cbw-control="$D/cbw.ctl" \
  cbw-pit-export=pit 2>"$D/nbdkit.log" &
PN=$!; PIDS+=($PN)
waitnbd "nbd+unix:///store?socket=$D/store.sock"; waitnbd "nbd+unix:///?socket=$D/live.sock"
r=$(ctl "$D/cbw.ctl" "{\"execute\":\"begin\",\"arguments\":{\"target\":\"nbd+unix:///store?socket=$D/store.sock\",\"state-file\":\"$D/states\"}}")
echo "$r" | grep -q '"return"' || { echo "begin failed: $r" >&2; exit 1; }
UP="nbd+unix:///pit?socket=$D/live.sock"
start_pit() {                           # start_pit BINARY EXTRA: sets P, U
  rm -f "$D/pit.sock"
  "$1" --listen "unix:$D/pit.sock" \
    --export "name=snap,type=pit,upstream=$UP,connections=${PIT_CONNS:-8}$2" 2>>"$D/pit.log" &
  P=$!; U="nbd+unix:///snap?socket=$D/pit.sock"; waitnbd "$U"
}
start_qsd() {
  rm -f "$D/qsd.sock" "$D/fleece.raw"; truncate -s "$bytes" "$D/fleece.raw"
  qemu-storage-daemon \
    --blockdev driver=file,node-name=src,filename="$D/qsd.img" \
    --blockdev driver=file,node-name=fleece,filename="$D/fleece.raw" \
    --blockdev driver=copy-before-write,node-name=cbw,file=src,target=fleece \
    --blockdev driver=snapshot-access,node-name=snap,file=cbw \
    --nbd-server addr.type=unix,addr.path="$D/qsd.sock" \
    --export type=nbd,id=snap,node-name=snap,name=snap >>"$D/qsd.log" 2>&1 &
  P=$!; U="nbd+unix:///snap?socket=$D/qsd.sock"; waitnbd "$U"
}
# warm the page cache for both copies
cat "$D/disk.img" "$D/qsd.img" > /dev/null

declare -A V C
read -r -a M <<< "$MODES"
for r in $(seq "$ROUNDS"); do
  n=${#M[@]}
  for k in $(seq 0 $((n - 1))); do
    m=${M[$(( (k + r) % n ))]}
    case $m in
      direct) start_pit "$B" ",state-file=$D/states,live-file=$D/disk.img,store-file=$D/store.img"; watch=("$P" "$PN") ;;
      proxy)  start_pit "$B" ""; watch=("$P" "$PN") ;;
      old)    start_pit "$A" ""; watch=("$P" "$PN") ;;
      qsd)    start_qsd; watch=("$P") ;;
    esac
    for c in 4 1; do
      t0=$(cpu_ticks "${watch[@]}"); s=$(date +%s.%N)
      nbdcopy --connections=$c "$U" null:
      e=$(date +%s.%N); t1=$(cpu_ticks "${watch[@]}")
      V[$m.$c]+="$(awk -v b="$bytes" -v s="$s" -v e="$e" 'BEGIN{printf "%.1f", b/1048576/(e-s)}') "
      C[$m.$c]+="$(awk -v b="$bytes" -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.0f", t*1000/hz/(b/1073741824)}') "
    done
    kill "$P"; wait "$P" 2>/dev/null || true
  done
done
grep -q "bytes direct" "$D/pit.log" && direct_line=$(grep "bytes direct" "$D/pit.log" | tail -1)

stats() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{a[NR]=$1} END{printf "%s %s %s", a[1], a[int((NR+1)/2)], a[NR]}'; }
# ratio X Y [inv]: per-round X/Y (inv: Y/X, for costs), min/median/max
ratio() {
  paste <(echo "$1" | tr ' ' '\n' | sed '/^$/d') <(echo "$2" | tr ' ' '\n' | sed '/^$/d') |
    awk -v inv="${3:-0}" '{ if ($1 > 0 && $2 > 0) printf "%.3f\n", inv ? $2/$1 : $1/$2 }' | sort -g |
    awk '{a[NR]=$1} END{ if (NR) printf "%.2f / %.2f / %.2f", a[1], a[int((NR+1)/2)], a[NR]; else printf "-" }'
}
has() { [[ " ${M[*]} " == *" $1 "* ]]; }
echo "# PIT read path, $ROUNDS rounds, $SIZE random data, nothing copied yet"
echo "(throughput ratios: > 1 = faster than the peer; CPU ratios: > 1 = cheaper than the peer)"
echo "| metric | server | min | median | max | ratio vs qsd (min/med/max) | ratio vs proxy |"
echo "|---|---|---|---|---|---|---|"
for c in 4 1; do
  for m in "${M[@]}"; do
    read -r mn md mx <<<"$(echo "${V[$m.$c]}" | stats)"
    rq=-; rp=-
    has qsd && [ "$m" != qsd ] && rq=$(ratio "${V[$m.$c]}" "${V[qsd.$c]}")
    has proxy && [ "$m" != proxy ] && rp=$(ratio "${V[$m.$c]}" "${V[proxy.$c]}")
    echo "| nbdcopy MiB/s, $c conn | $m | $mn | $md | $mx | $rq | $rp |"
  done
  for m in "${M[@]}"; do
    read -r mn md mx <<<"$(echo "${C[$m.$c]}" | stats)"
    rq=-; rp=-
    has qsd && [ "$m" != qsd ] && rq=$(ratio "${C[$m.$c]}" "${C[qsd.$c]}" 1)
    has proxy && [ "$m" != proxy ] && rp=$(ratio "${C[$m.$c]}" "${C[proxy.$c]}" 1)
    echo "| server CPU ms/GiB, $c conn | $m | $mn | $md | $mx | $rq | $rp |"
  done
done
echo
[ -n "${direct_line:-}" ] || direct_line="NO bytes-direct line in the log of cbwd: the direct path did not run"
echo "direct path check: $direct_line"
