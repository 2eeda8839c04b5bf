#!/bin/bash
# cbw — bench/scale/run.sh: how the cost of cbw grows with the work.  One
# command, one run; every curve is a table of points in OUT (default
# bench/scale/results.md), with the slope between points so that "linear"
# and "flat" can be read off:
#   1. quiesce pause: `cbw backup begin` -> `backup end` for 1, 8 and 32 disks
#      at once, under a writer on each disk timing every 4 KiB write (the
#      same 16 blocks: after their first copy a backup adds no copy, what is
#      left is the atomic quiesce of all disks).  Per point: begin wall time,
#      and the write latency inside the begin windows: max and p99, against
#      p99 outside them.
#   2. memory per served disk: PSS and RSS of the idle nbdkit stacks (chain
#      or file plugin + cbw + dirtybitmap filters) of 1, 8, 32 disks, per disk.
#   3. memory per checkpoint: PSS of one disk's nbdkit after K checkpoints
#      (backup begin --checkpoint + end), on a large sparse disk, split into
#      anonymous and file pages (the live-bitmap map is a shared file map).
#   4. dirty map query: block status of a qemu:dirty-bitmap context served
#      by cbwd, whole disk, for 1 k / 100 k / 1 M dirty extents (alternate
#      64 KiB blocks dirty, so extents = 2 x dirty blocks).
#   5. bitmap save: one save of a store with one bitmap (64 KiB granularity)
#      on disks of 1 GiB to 16 TiB (only the bitmaps exist: no image).
#
# Knobs (env): QUICK=1 (fewer rounds and points: < 2 minutes on an idle
# 2-CPU VM; used by ctest, which also sets CHECK=1), CBW_BUILD (build tree),
# WORK (scratch dir, default /var/tmp/cbw-bench-scale: ext4, fsyncs real),
# OUT, ROUNDS (begin/end rounds per disk count), DISKS ("1 8 32"),
# PARTS (default "quiesce checkpoints map save"; quiesce includes the
# memory per disk).  CHECK=1: fail (exit 1) when a curve is worse than
# linear: map query time at 1 M extents > MAP_K (default 50) x the time at
# 100 k (linear is 10 x, quadratic 100 x; minimum times of the repetitions:
# a loaded machine stretches single runs of 50 ms).  ctest runs PARTS=map
# QUICK=1 CHECK=1 (bench-scale-map).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
CBW_BUILD=${CBW_BUILD:-$SRC/build}
QUICK=${QUICK:-0}
WORK=${WORK:-/var/tmp/cbw-bench-scale}
OUT=${OUT:-$HERE/results.md}
CHECK=${CHECK:-0}
MAP_K=${MAP_K:-50}
CBW=$CBW_BUILD/server/cli/cbw
ORCHD=$CBW_BUILD/server/orch/cbwd-orch
CBWD=$CBW_BUILD/server/cbwd
TOOL=$CBW_BUILD/client-tests/backup/scale-tool
SAVE=$CBW_BUILD/formats/bitmap-store-save-bench
MODS=$CBW_BUILD/modules
for f in "$CBW" "$ORCHD" "$CBWD" "$TOOL" "$SAVE" "$MODS/nbdkit-cbw-filter.so"; do
  [ -e "$f" ] || { echo "build first: $f missing" >&2; exit 77; }
done
command -v nbdkit >/dev/null || { echo "nbdkit not installed" >&2; exit 77; }
if [ "$QUICK" = 1 ]; then
  ROUNDS=${ROUNDS:-3}; DISKS=${DISKS:-"1 8 32"}; CKPTS="1 4 16"
  SAVE_GIB="1 64 1024 16384"; SAVE_ROUNDS=3; CK_DISK=256G
else
  ROUNDS=${ROUNDS:-10}; DISKS=${DISKS:-"1 8 32"}; CKPTS="1 4 16 64"
  SAVE_GIB="1 16 256 4096 16384"; SAVE_ROUNDS=10; CK_DISK=1T
fi
EXTENTS="1000 100000 1000000"
PARTS=${PARTS:-quiesce checkpoints map save}
part() { case " $PARTS " in *" $1 "*) return 0 ;; esac; return 1; }

rm -rf "$WORK"; mkdir -p "$WORK"
STATE=$WORK/state
export CBW_SOCKET=$STATE/control.sock
ORCHD_PID= CBWD_PID=
log() { echo "[$(date +%T) scale] $*" >&2; }
# Stop only what this run started: the daemons by pid, and the nbdkits the
# orchestrator detached, found by the scratch directory in their command line.
cleanup() {
  local f p pids=()
  [ -z "$CBWD_PID" ] || kill "$CBWD_PID" 2>/dev/null || true
  if [ -n "$ORCHD_PID" ]; then kill "$ORCHD_PID" 2>/dev/null || true; wait "$ORCHD_PID" 2>/dev/null || true; fi
  for f in $(grep -lF -- "$WORK/" /proc/[0-9]*/cmdline 2>/dev/null); do
    p=${f#/proc/}; p=${p%/cmdline}; [ "$p" = $$ ] || pids+=("$p")
  done
  [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2>/dev/null || true
  sleep 0.2; rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' TERM INT HUP
ns() { date +%s%N; }
PLUGIN=file; [ -f "$MODS/nbdkit-chain-plugin.so" ] && PLUGIN=chain

start_orchd() {
  mkdir -p "$STATE"; rm -f "$CBW_SOCKET"
  "$ORCHD" --state-dir "$STATE" --module-dir "$MODS" --plugin "$PLUGIN" \
    --start-timeout 60 >> "$WORK/orchd.log" 2>&1 &
  ORCHD_PID=$!
  for _ in $(seq 300); do [ -S "$CBW_SOCKET" ] && return 0; sleep 0.1; done
  log "cbwd-orch did not start"; tail "$WORK/orchd.log" >&2; exit 1
}
disk_uri() { echo "nbd+unix:///?socket=$STATE/disks/$1/nbd.sock"; }
# disk_pids: the nbdkit of each disk (pid files or command lines)
disk_pids() {
  local f
  for f in $(grep -lF -- "$STATE/disks/" /proc/[0-9]*/cmdline 2>/dev/null); do
    case $({ tr '\0' ' ' < "$f"; } 2>/dev/null) in *nbdkit*) f=${f#/proc/}; echo "${f%/cmdline}" ;; esac
  done
}
# mem PIDS...: "PSS_KiB RSS_KiB" summed over the processes
mem() {
  local p pss=0 rss=0 a b
  for p in "$@"; do
    a=$(awk '/^Pss:/{print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0)
    b=$(awk '/^Rss:/{print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0)
    pss=$((pss + ${a:-0})); rss=$((rss + ${b:-0}))
  done
  echo "$pss $rss"
}
# mem_split PID: "PSS_KiB RSS_KiB PSS_anon_KiB PSS_file_KiB" of one process
# (anonymous memory: malloc'd copies; file: the MAP_SHARED live-bitmap map)
mem_split() {
  awk '/^Pss:/{p=$2} /^Rss:/{r=$2} /^Pss_Anon:/{a=$2} /^Pss_File:/{f=$2}
       END{print p+0, r+0, a+0, f+0}' "/proc/$1/smaps_rollup" 2>/dev/null || echo "0 0 0 0"
}

R=$WORK/rows; mkdir -p "$R"
START_ALL=$(ns)

# ---- 1 + 2: quiesce pause and memory per served disk -------------------
start_orchd
added=0
part quiesce || DISKS=
for n in $DISKS; do
  while [ $added -lt "$n" ]; do
    truncate -s 1G "$WORK/d$added.img"
    "$CBW" disk add "d$added" --file "$WORK/d$added.img" > /dev/null
    added=$((added + 1))
  done
  sleep 1                                    # idle: let start-up settle
  mapfile -t P < <(disk_pids)
  read -r pss rss < <(mem "${P[@]}")
  echo "$n ${#P[@]} $pss $rss $(mem "$ORCHD_PID")" >> "$R/mem"
  uris=(); for i in $(seq 0 $((n - 1))); do uris+=("$(disk_uri "d$i")"); done
  rm -f "$WORK/stop"
  "$TOOL" writers "$WORK/stop" "$R/lat.$n" "${uris[@]}" &
  WP=$!
  sleep 1                                    # first copies + baseline
  for r in $(seq "$ROUNDS"); do
    t0=$(ns)
    "$CBW" backup begin --mode none > /dev/null
    t1=$(ns)
    sleep 0.3
    "$CBW" backup end > /dev/null
    echo "$t0 $t1" >> "$R/win.$n"
    sleep 0.3
  done
  touch "$WORK/stop"; wait $WP
  log "$n disks: done"
done

# ---- 3: memory per checkpoint ------------------------------------------
if part checkpoints; then
truncate -s "$CK_DISK" "$WORK/big.img"
"$CBW" disk add big --file "$WORK/big.img" > /dev/null
sleep 1
bigpid() { local f; for f in $(grep -lF -- "$STATE/disks/big/" /proc/[0-9]*/cmdline 2>/dev/null); do
  case $({ tr '\0' ' ' < "$f"; } 2>/dev/null) in *nbdkit*) f=${f#/proc/}; echo "${f%/cmdline}"; return ;; esac; done; }
BP=$(bigpid)
echo "0 $(mem_split "$BP")" >> "$R/ckpt"
k=0
for want in $CKPTS; do
  while [ $k -lt "$want" ]; do
    k=$((k + 1))
    "$CBW" backup begin --disk big --mode none --checkpoint "c$k" > /dev/null
    "$CBW" backup end > /dev/null
  done
  echo "$k $(mem_split "$BP")" >> "$R/ckpt"
done
fi
kill "$ORCHD_PID"; wait "$ORCHD_PID" 2>/dev/null || true; ORCHD_PID=
for f in $(grep -lF -- "$WORK/" /proc/[0-9]*/cmdline 2>/dev/null); do
  p=${f#/proc/}; p=${p%/cmdline}; [ "$p" = $$ ] || kill "$p" 2>/dev/null || true
done
log "checkpoints: done"

# ---- 4: dirty map query ------------------------------------------------
part map || EXTENTS=
for e in $EXTENTS; do
  blocks=$((e / 2))                      # every other block dirty
  size=$((blocks * 2 * 65536))
  rm -f "$WORK/m.img"; truncate -s "$size" "$WORK/m.img"
  python3 - "$WORK/m.bits" "$blocks" <<'PY'
import sys
open(sys.argv[1], "wb").write(b"\x55" * ((int(sys.argv[2]) * 2 + 7) // 8))
PY
  S=$WORK/m.sock; rm -f "$S"
  "$CBWD" --listen "unix:$S" --export "name=m,type=file,path=$WORK/m.img,bitmap=bm:raw:$WORK/m.bits:65536" \
    >> "$WORK/cbwd.log" 2>&1 &
  CBWD_PID=$!
  for _ in $(seq 100); do [ -S "$S" ] && break; sleep 0.05; done
  U="nbd+unix:///m?socket=$S"
  reps=5; [ "$QUICK" = 1 ] || reps=9
  for i in $(seq $reps); do
    "$TOOL" map "$U" qemu:dirty-bitmap:bm >> "$R/map.$e"
  done
  echo "$(mem "$CBWD_PID")" > "$R/mapmem.$e"
  kill "$CBWD_PID"; wait "$CBWD_PID" 2>/dev/null || true; CBWD_PID=
done
log "map query: done"

# ---- 5: bitmap save ----------------------------------------------------
mkdir -p "$WORK/bs"
part save || SAVE_GIB=
for g in $SAVE_GIB; do
  "$SAVE" "$WORK/bs" "$g" "$SAVE_ROUNDS" 1 | awk -v g="$g" -F'|' '$2+0==1{print g, $3+0, $4+0}' >> "$R/save"
done
log "bitmap save: done"

SECS=$(( ($(ns) - START_ALL) / 1000000000 ))
python3 - "$R" "$OUT" "$QUICK" "$SECS" "$CHECK" "$MAP_K" "$PLUGIN" <<'PY'
import sys, os, glob, statistics, bisect
R, out, quick, secs, check, K, plugin = sys.argv[1:8]
K = float(K)
def pct(xs, p):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")
L = ["# bench/scale — how cbw's costs grow with the work", "",
     f"Run: `bench/scale/run.sh` {'QUICK=1 ' if quick == '1' else ''}in {secs} s; "
     f"load average at the end: {open('/proc/loadavg').read().split()[0]} "
     f"({os.cpu_count()} CPUs); disks on the `{plugin}` plugin.", ""]
# 1. quiesce
L += ["## 1. Quiesce: `backup begin` for N disks at once, under a 4 KiB writer on each disk", "",
      "| disks | begin wall ms (median / max) | write latency in begin windows: p99 ms | max ms | outside windows: p99 ms | writes in windows |",
      "|---|---|---|---|---|---|"]
for f in sorted(glob.glob(f"{R}/win.*"), key=lambda p: int(p.rsplit(".", 1)[1])):
    n = int(f.rsplit(".", 1)[1])
    wins = sorted(tuple(map(int, l.split())) for l in open(f))
    starts = [a for a, b in wins]
    lat_in, lat_out = [], []
    for l in open(f"{R}/lat.{n}"):
        d, s, lat = map(int, l.split())
        e = s + lat
        # the windows do not overlap: only the last one starting before the
        # write ends can overlap it
        k = bisect.bisect_left(starts, e) - 1
        (lat_in if k >= 0 and s < wins[k][1] else lat_out).append(lat / 1e6)
    walls = [(b - a) / 1e6 for a, b in wins]
    L.append(f"| {n} | {statistics.median(walls):.1f} / {max(walls):.1f} | {pct(lat_in, .99):.2f} | "
             f"{max(lat_in) if lat_in else float('nan'):.2f} | {pct(lat_out, .99):.2f} | {len(lat_in)} |")
# 2. memory per disk
L += ["", "## 2. Memory of the idle served disks (nbdkit + cbw + dirtybitmap filters, 1 GiB sparse images)", "",
      "| disks | nbdkit processes | PSS total MiB | PSS per disk MiB | RSS per disk MiB | cbwd-orch PSS MiB |",
      "|---|---|---|---|---|---|"]
for l in (open(f"{R}/mem") if os.path.exists(f"{R}/mem") else []):
    n, np_, pss, rss, opss, orss = map(int, l.split())
    L.append(f"| {n} | {np_} | {pss/1024:.1f} | {pss/1024/max(np_,1):.2f} | {rss/1024/max(np_,1):.2f} | {opss/1024:.1f} |")
# 3. per checkpoint
rows = [tuple(map(int, l.split())) for l in open(f"{R}/ckpt")] if os.path.exists(f"{R}/ckpt") else []
L += ["", "## 3. Memory per checkpoint (one disk, sparse image, 64 KiB bitmap granularity)", "",
      "| checkpoints | nbdkit PSS MiB | RSS MiB | PSS anon MiB | PSS file MiB | PSS growth per checkpoint since the previous point KiB (anon / file) |",
      "|---|---|---|---|---|---|"]
prev = None
for k, pss, rss, anon, fil in rows:
    g = "" if prev is None or k == prev[0] else \
        f"{(pss - prev[1]) / (k - prev[0]):.0f} ({(anon - prev[2]) / (k - prev[0]):.0f} / {(fil - prev[3]) / (k - prev[0]):.0f})"
    L.append(f"| {k} | {pss/1024:.1f} | {rss/1024:.1f} | {anon/1024:.1f} | {fil/1024:.1f} | {g} |"); prev = (k, pss, anon, fil)
# 4. map query
L += ["", "## 4. Dirty map query (cbwd, `qemu:dirty-bitmap`, whole disk, block status in 1 GiB requests)", "",
      "| dirty extents | extents in reply | median ms | min ms | us per extent | time ratio to the previous point (extents x10) |",
      "|---|---|---|---|---|---|"]
prevt = None; prevmin = None; ratio_1m = None
for e in (1000, 100000, 1000000):
    p = f"{R}/map.{e}"
    if not os.path.exists(p): continue
    rs = [l.split() for l in open(p)]
    ts = [float(r[2]) * 1000 for r in rs]; ext = int(rs[0][0])
    m = statistics.median(ts)
    r = "" if prevt is None else f"{m / prevt:.1f}"
    # the check compares minimum times: a hiccup of a loaded machine only
    # ever adds time, a quadratic map multiplies every run
    if e == 1000000 and prevmin: ratio_1m = min(ts) / prevmin
    prevmin = min(ts)
    L.append(f"| {e} | {ext} | {m:.2f} | {min(ts):.2f} | {m * 1000 / ext:.3f} | {r} |")
    prevt = m
# 5. save
L += ["", "## 5. Bitmap save: one bitmap (64 KiB granularity), one save after 4 bits set", "",
      "| disk GiB | bitmap KiB | median save ms | max ms |", "|---|---|---|---|"]
for l in (open(f"{R}/save") if os.path.exists(f"{R}/save") else []):
    g, med, mx = l.split(); g = int(g)
    L.append(f"| {g} | {g * 16384 // 8 // 1024} | {float(med):.2f} | {float(mx):.2f} |")
open(out, "w").write("\n".join(L) + "\n")
print("\n".join(L))
if check == "1" and ratio_1m is not None and ratio_1m > K:
    print(f"FAIL: map query at 1 M extents took {ratio_1m:.1f} x the time at 100 k (limit {K:g}; linear is 10)")
    sys.exit(1)
PY
