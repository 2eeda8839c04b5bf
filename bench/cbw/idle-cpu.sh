#!/bin/bash
# bench/cbw/idle-cpu.sh — what the idle cbw filter costs, in CPU rather than
# throughput.  The timed 1 MiB write case of run.sh moves by +-15 % from one
# 10 s run to the next on a small VM, which hides a 2 % bar; the CPU time the
# nbdkit process spends on a fixed amount of writes does not depend on how
# fast the machine happened to be.  Three servers on the same disk image,
# rounds rotated: nbdkit file (base), + cbw filter with no session (idle),
# + nbdkit's own pass-through filter (fua fuamode=pass, any filter's floor).
# Each round writes IO_SIZE (default 16G) of 1 MiB sequential writes with
# fio (iodepth 16) and reads the server's utime+stime from /proc.
# Prints per-round figures and the ratios of the means to base.
# Knobs: CBW_BUILD, DISK (default: run.sh's disk, created if missing, 2G),
# ROUNDS (default 4), IO_SIZE, NBDKIT_THREADS (default CPUs, at most 16).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CBW_BUILD=${CBW_BUILD:-$HERE/../../build}
FILTER=$CBW_BUILD/modules/nbdkit-cbw-filter.so
[ -f "$FILTER" ] || { echo "build first: $FILTER missing" >&2; exit 1; }
DISK=${DISK:-/tmp/cbw-bench/disk.img}
[ -f "$DISK" ] || { mkdir -p "$(dirname "$DISK")"; truncate -s 2G "$DISK"; }
ROUNDS=${ROUNDS:-4} IO_SIZE=${IO_SIZE:-16G}
T=${NBDKIT_THREADS:-$(n=$(nproc); [ "$n" -gt 16 ] && n=16; echo "$n")}
D=$(mktemp -d); P=
trap '[ -z "$P" ] || kill $P 2>/dev/null; rm -rf "$D"' EXIT
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
CASES=(base idle fua)
declare -A SUM
for r in $(seq "$ROUNDS"); do
  for k in 0 1 2; do
    c=${CASES[$(( (r - 1 + k) % 3 ))]} S=$D/$c.sock
    rm -f "$S" "$D/ctl.sock"
    case $c in
      base) nbdkit -t "$T" -f -U "$S" file "$DISK" & ;;
      idle) nbdkit -t "$T" -f -U "$S" --filter="$FILTER" file "$DISK" cbw-control="$D/ctl.sock" & ;;
      fua)  nbdkit -t "$T" -f -U "$S" --filter=fua file "$DISK" fuamode=pass & ;;
    esac
    P=$!
    for _ in $(seq 200); do [ -S "$S" ] && break; sleep 0.05; done
    sync; a=$(ticks $P)
    fio --name=w --ioengine=nbd --uri="nbd+unix:///?socket=$S" --rw=write --bs=1M \
        --iodepth=16 --size="$(stat -c %s "$DISK")" --io_size="$IO_SIZE" \
        --output=/dev/null > /dev/null
    b=$(ticks $P)
    kill $P; wait $P 2>/dev/null || true; P=
    echo "round $r $c: $((b - a)) CPU ticks for $IO_SIZE"
    SUM[$c]=$(( ${SUM[$c]:-0} + b - a ))
  done
done
echo "idle cbw filter / no filter, nbdkit CPU per byte written: $(echo "scale=3; ${SUM[idle]} / ${SUM[base]}" | bc)"
echo "pass-through fua filter / no filter: $(echo "scale=3; ${SUM[fua]} / ${SUM[base]}" | bc)"
