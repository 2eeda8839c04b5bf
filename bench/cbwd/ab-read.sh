#!/bin/bash
# cbw — bench/cbwd/ab-read.sh: every READ-side row of the cbwd performance
# table in ONE run, servers taking turns round by round (order rotated), on
# the same data and the same page-cache state (everything warm: the read path
# is measured, not the disk):
#   null    nbdkit null (the transport alone: the upper bound of any server)
#   file    nbdkit file on disk.img (the peer of the store and PIT rows)
#   store   cbwd type=store on disk.img
#   pit     cbwd type=pit with direct reads (state-file + live-file +
#           store-file) of a cbw session begun on disk.img with nothing
#           copied yet (what cbwd's orchestrator sets up)
#   qsd     qemu-storage-daemon copy-before-write + snapshot-access of its own
#           copy of disk.img (the PIT peer)
#   storeA / pitA   the same with an older cbwd binary (2nd argument): A/B
# Metric per server and connection count: nbdcopy of the whole export to
# null: wall MiB/s (meaningful on an idle machine only), and the CPU time the
# serving processes used per GiB plus their context switches per GiB (from
# /proc: far less sensitive to other load).  Ratios are per round, then
# min/median/max.  Also the dirty map query (nbdinfo --map of a bitmap with
# ~6350 dirty 64 KiB extents: cbwd type=file + raw bitmap vs QSD's bitmap
# export, whole nbdinfo process, in the same rounds).
#   usage: ab-read.sh [CBWD [CBWD_OLD]]
#   env:   ROUNDS (5), SIZE (2G; random data), DIR (/var/tmp), PIT_CONNS (8),
#          CONNS ("4 1"), CBW_BUILD (build tree), MODES (default: all),
#          MAPQ_RUNS (10 nbdinfo runs per server per round; 0: skip)
# Quick check while developing: SIZE=256M ROUNDS=2 bench/cbwd/ab-read.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CBW_BUILD=${CBW_BUILD:-$HERE/../../build}
B=${1:-$CBW_BUILD/server/cbwd}
A=${2:-}
FILTER=${CBW_FILTER:-$CBW_BUILD/modules/nbdkit-cbw-filter.so}
ROUNDS=${ROUNDS:-5} SIZE=${SIZE:-2G} CONNS=${CONNS:-4 1} MAPQ_RUNS=${MAPQ_RUNS:-10}
MODES=${MODES:-null file store pit qsd${A:+ storeA pitA}}
for f in "$B" "$FILTER"; do [ -e "$f" ] || { echo "missing $f (build first)" >&2; exit 1; }; done
command -v qemu-storage-daemon >/dev/null || { MODES=${MODES/qsd/}; MAPQ_RUNS=0; }
D=$(mktemp -d "${DIR:-/var/tmp}/cbwd-abread.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$D"; }
trap cleanup EXIT
waitnbd() { for _ in $(seq 300); do nbdinfo --size "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "no server at $1" >&2; exit 1; }
ctl() {
  python3 - "$1" "$2" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rwb")
f.readline(); f.write(sys.argv[2].encode() + b"\n"); f.flush(); print(f.readline().decode().strip())
EOF
}
# CPU ticks and context switches of processes (all threads)
cpu_ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
ctxsw() {
  local t=0 p f
  for p in "$@"; do
    for f in /proc/"$p"/task/*/status; do
      t=$((t + $(awk '/^(non)?voluntary_ctxt_switches/{s += $2} END{print s + 0}' "$f" 2>/dev/null || echo 0)))
    done
  done
  echo $t
}

head -c "$SIZE" /dev/urandom > "$D/disk.img"
bytes=$(stat -c %s "$D/disk.img")
[[ " $MODES " == *" qsd "* ]] && cp "$D/disk.img" "$D/qsd.img"
truncate -s "$bytes" "$D/store.img"

# The cbw stack for the PIT rows: nbdkit + cbw filter on disk.img, a session
# with a state map and a local store file, nothing copied.
nbdkit -f -U "$D/live.sock" --filter="$FILTER" file "$D/disk.img" cbw-control="$D/cbw.ctl" \
  cbw-pit-export=pit 2>"$D/nbdkit.log" &
PN=$!; PIDS+=($PN)
waitnbd "nbd+unix:///?socket=$D/live.sock"
r=$(ctl "$D/cbw.ctl" "{\"execute\":\"begin\",\"arguments\":{\"target\":\"file://$D/store.img\",\"state-file\":\"$D/states\"}}")
echo "$r" | grep -q '"return"' || { echo "begin failed: $r" >&2; exit 1; }
UP="nbd+unix:///pit?socket=$D/live.sock"

# The bitmap for the map query: 10000 random 4k writes at 64 KiB granularity
# (seed 42), as the anchors' case E; QSD gets the same dirty granules.
python3 - "$D/bm.bits" "$bytes" "$D/bm.writes" <<'EOF'
import random, sys
path, size, wpath = sys.argv[1], int(sys.argv[2]), sys.argv[3]
g = 65536; n = (size + g - 1) // g; b = bytearray((n + 7) // 8); r = random.Random(42)
granules = set()
for _ in range(10000):
    o = r.randrange(size // 4096) * 4096; k = o // g; b[k // 8] |= 1 << (k % 8); granules.add(k)
open(path, "wb").write(b)
with open(wpath, "w") as f:
    for k in sorted(granules): f.write("write %d 4k\n" % (k * g))
EOF

start() {                                   # start MODE: sets P, U, WATCH
  local m=$1 bin=$B
  case $m in *A) bin=$A ;; esac
  rm -f "$D/s.sock"
  case $m in
    null)  nbdkit -f -U "$D/s.sock" null size="$bytes" 2>>"$D/srv.log" & P=$!; U="nbd+unix:///?socket=$D/s.sock" ;;
    file)  nbdkit -f -U "$D/s.sock" file "$D/disk.img" 2>>"$D/srv.log" & P=$!; U="nbd+unix:///?socket=$D/s.sock" ;;
    store*) "$bin" --listen "unix:$D/s.sock" --export "name=e,type=store,path=$D/disk.img" 2>>"$D/srv.log" &
            P=$!; U="nbd+unix:///e?socket=$D/s.sock" ;;
    pit*)  "$bin" --listen "unix:$D/s.sock" --export "name=e,type=pit,upstream=$UP,connections=${PIT_CONNS:-8},state-file=$D/states,live-file=$D/disk.img,store-file=$D/store.img" 2>>"$D/pit.log" &
           P=$!; U="nbd+unix:///e?socket=$D/s.sock" ;;
    qsd)   rm -f "$D/fleece.raw"; truncate -s "$bytes" "$D/fleece.raw"
           qemu-storage-daemon \
             --blockdev driver=file,node-name=src,filename="$D/qsd.img" \
             --blockdev driver=file,node-name=fleece,filename="$D/fleece.raw" \
             --blockdev driver=copy-before-write,node-name=cbw,file=src,target=fleece \
             --blockdev driver=snapshot-access,node-name=snap,file=cbw \
             --nbd-server addr.type=unix,addr.path="$D/s.sock" \
             --export type=nbd,id=snap,node-name=snap,name=snap >>"$D/srv.log" 2>&1 &
           P=$!; U="nbd+unix:///snap?socket=$D/s.sock" ;;
  esac
  WATCH=("$P"); case $m in pit*) WATCH+=("$PN") ;; esac
  NOEXT=; [ "$m" = null ] && NOEXT=--no-extents
  waitnbd "$U"
}
cat "$D/disk.img" "$D/qsd.img" > /dev/null 2>&1 || true    # warm the page cache

declare -A V C X EXT
read -r -a M <<< "$MODES"
for r in $(seq "$ROUNDS"); do
  n=${#M[@]}
  for k in $(seq 0 $((n - 1))); do
    m=${M[$(( (k + r) % n ))]}
    start "$m"
    for c in $CONNS; do
      t0=$(cpu_ticks "${WATCH[@]}"); x0=$(ctxsw "${WATCH[@]}"); s=$(date +%s.%N)
      # nbdkit null reports its whole size as a hole: make nbdcopy read it
      nbdcopy --connections="$c" ${NOEXT:-} "$U" null:
      e=$(date +%s.%N); t1=$(cpu_ticks "${WATCH[@]}"); x1=$(ctxsw "${WATCH[@]}")
      V[$m.$c]+="$(awk -v b="$bytes" -v s="$s" -v e="$e" 'BEGIN{printf "%.1f", b/1048576/(e-s)}') "
      C[$m.$c]+="$(awk -v b="$bytes" -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.0f", t*1000/hz/(b/1073741824)}') "
      X[$m.$c]+="$(awk -v b="$bytes" -v t=$((x1 - x0)) 'BEGIN{printf "%.0f", t/(b/1073741824)}') "
    done
    kill "$P"; wait "$P" 2>/dev/null || true
  done
  # dirty map query: cbwd type=file + raw bitmap vs QSD bitmap export, same granules
  if [ "$MAPQ_RUNS" -gt 0 ]; then
    for who in cbwd qsdmap nullmap; do
      rm -f "$D/m.sock" "$D/q.qmp"
      if [ $who = nullmap ]; then       # the floor: nbdinfo itself, one extent
        nbdkit -f -U "$D/m.sock" null size="$bytes" 2>>"$D/srv.log" &
        P=$!; U="nbd+unix:///?socket=$D/m.sock"; MC=base:allocation
        waitnbd "$U"
      elif [ $who = cbwd ]; then
        "$B" --listen "unix:$D/m.sock" --export "name=frag,type=file,path=$D/disk.img,bitmap=bm1:raw:$D/bm.bits:65536" 2>>"$D/srv.log" &
        P=$!; U="nbd+unix:///frag?socket=$D/m.sock"; MC=qemu:dirty-bitmap:bm1
        waitnbd "$U"
      else
        cp --reflink=auto "$D/disk.img" "$D/qmap.img" 2>/dev/null || true
        qemu-storage-daemon --blockdev driver=file,node-name=file0,filename="$D/qmap.img" \
          --chardev socket,id=qmp0,path="$D/q.qmp",server=on,wait=off --monitor chardev=qmp0 \
          --nbd-server addr.type=unix,addr.path="$D/m.sock" >>"$D/srv.log" 2>&1 &
        P=$!
        for _ in $(seq 100); do [ -S "$D/q.qmp" ] && break; sleep 0.1; done
        python3 /work/shared/bench/anchors/qmp.py "$D/q.qmp" \
          'block-dirty-bitmap-add {"node":"file0","name":"bm1","granularity":65536}' \
          'block-export-add {"type":"nbd","id":"e","node-name":"file0","name":"frag","writable":true,"bitmaps":["bm1"]}' >/dev/null
        U="nbd+unix:///frag?socket=$D/m.sock"; MC=qemu:dirty-bitmap:bm1
        waitnbd "$U"
        mapfile -t W < <(sed 's/^/-c\n/' "$D/bm.writes")
        qemu-io -f raw "${W[@]}" "$U" >/dev/null
      fi
      ext=$(nbdinfo --map=$MC "$U" | awk '$3==1' | wc -l); [ $who = nullmap ] && ext=0
      nbdinfo --map=$MC "$U" >/dev/null
      s=$(date +%s%N)
      for _ in $(seq "$MAPQ_RUNS"); do nbdinfo --map=$MC "$U" >/dev/null; done
      e=$(date +%s%N)
      V[map.$who]+="$(awk -v s="$s" -v e="$e" -v n="$MAPQ_RUNS" 'BEGIN{printf "%.2f", (e-s)/1e6/n}') "
      EXT[$who]=$ext
      kill "$P"; wait "$P" 2>/dev/null || true
      rm -f "$D/qmap.img"
    done
  fi
done
grep -q "bytes direct" "$D/pit.log" 2>/dev/null && direct_line=$(grep "bytes direct" "$D/pit.log" | tail -1)

stats() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{a[NR]=$1} END{printf "%s %s %s", a[1], a[int((NR+1)/2)], a[NR]}'; }
# ratio X Y [inv]: per-round X/Y (inv: Y/X, for costs), min/median/max
ratio() {
  paste <(echo "$1" | tr ' ' '\n' | sed '/^$/d') <(echo "$2" | tr ' ' '\n' | sed '/^$/d') |
    awk -v inv="${3:-0}" '{ if ($1 > 0 && $2 > 0) printf "%.3f\n", inv ? $2/$1 : $1/$2 }' | sort -g |
    awk '{a[NR]=$1} END{ if (NR) printf "%.2f / %.2f / %.2f", a[1], a[int((NR+1)/2)], a[NR]; else printf "-" }'
}
has() { [[ " ${M[*]} " == *" $1 "* ]]; }
peer() { case $1 in store*|pit*) echo file ;; *) echo - ;; esac; }
echo "# cbwd read rows, $ROUNDS rounds, $SIZE random data, page cache warm ($(date -u +%Y-%m-%dT%H:%MZ))"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg), nproc $(nproc)"
echo
echo "(throughput ratios: > 1 = faster than the peer; CPU ratios: > 1 = cheaper than the peer; per round, min / median / max)"
echo
echo "| metric | server | min | median | max | vs nbdkit file | vs qsd | vs old cbwd (A) |"
echo "|---|---|---|---|---|---|---|---|"
for c in $CONNS; do
  for what in V C X; do
    case $what in V) label="nbdcopy MiB/s, $c conn"; inv=0 ;;
                  C) label="server CPU ms/GiB, $c conn"; inv=1 ;;
                  X) label="server ctx switches/GiB, $c conn"; inv=1 ;; esac
    for m in "${M[@]}"; do
      declare -n T=$what
      read -r mn md mx <<<"$(echo "${T[$m.$c]}" | stats)"
      rf=-; rq=-; ra=-
      # nbdkit's per-connection threads exit before we can read their
      # context switches: no ratio against it for that row
      [ $what != X ] && has file && [ "$m" != file ] && [ "$m" != null ] && rf=$(ratio "${T[$m.$c]}" "${T[file.$c]}" $inv)
      has qsd && [[ $m == pit* ]] && rq=$(ratio "${T[$m.$c]}" "${T[qsd.$c]}" $inv)
      case $m in store|pit) has "${m}A" && ra=$(ratio "${T[$m.$c]}" "${T[${m}A.$c]}" $inv) ;; esac
      echo "| $label | $m | $mn | $md | $mx | $rf | $rq | $ra |"
      unset -n T
    done
  done
done
if [ "$MAPQ_RUNS" -gt 0 ]; then
  for who in cbwd qsdmap nullmap; do
    read -r mn md mx <<<"$(echo "${V[map.$who]}" | stats)"
    rq=-; [ $who = cbwd ] && rq="$(ratio "${V[map.cbwd]}" "${V[map.qsdmap]}") (time cbwd/QSD; goal <= 0.8)"
    echo "| dirty map query ms (nbdinfo --map, ${EXT[$who]:-?} dirty extents) | $who | $mn | $md | $mx | | $rq | |"
  done
  echo
  echo "(nullmap: nbdinfo --map of nbdkit null, one extent: the floor, what nbdinfo itself costs)"
fi
echo
[ -n "${direct_line:-}" ] || direct_line="no bytes-direct line in the PIT log (pit not run, or the direct path did not run)"
echo "PIT direct path check: $direct_line"
