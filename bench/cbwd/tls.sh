#!/bin/bash
# cbw — bench/cbwd/tls.sh: the cost of TLS on a PIT export read.
# nbdcopy (4 connections, to null:) reads cbwd's PIT export (upstream: an
# nbdkit file plugin on the same image, over a Unix socket) over TCP, plain
# and with TLS-PSK; the peer is qemu-nbd serving the same image over TCP,
# plain and with TLS-PSK (QEMU's TLS NBD).  Rounds rotate through the four
# servers so load drifts hit them alike; medians are reported and the
# figures that mean something are the ratios TLS/plain of each server, and
# cbwd's TLS ratio over qemu-nbd's.  The machine is shared: run it when
# nothing else runs, and read the load average recorded with the result.
#
#   CBW_BUILD=$PWD/build bench/cbwd/tls.sh        # SIZE_MB=1024 ROUNDS=5
set -euo pipefail
CBW_BUILD=${CBW_BUILD:-$PWD/build}
CBWD=${CBWD:-$CBW_BUILD/server/cbwd}
SIZE_MB=${SIZE_MB:-1024}
ROUNDS=${ROUNDS:-5}
OUT=${OUT:-$(dirname "$0")/tls-results.md}
for p in nbdkit nbdcopy qemu-nbd psktool python3; do
  command -v $p >/dev/null || { echo "needs $p" >&2; exit 1; }
done
[ -x "$CBWD" ] || { echo "no cbwd at $CBWD" >&2; exit 1; }
W=$(mktemp -d /tmp/cbw-bench-tls.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 200); do nbdinfo --size "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "no server at $1" >&2; exit 1; }

head -c $((SIZE_MB * 1024 * 1024)) /dev/urandom > $W/disk.img
cat $W/disk.img > /dev/null
mkdir $W/psk; psktool -u bench -p $W/psk/keys.psk >/dev/null 2>&1
PSK="tls-psk-file=$W/psk/keys.psk"

nbdkit -f -r -U $W/up.sock file $W/disk.img & PIDS+=($!)
wait_up "nbd+unix:///?socket=$W/up.sock"
UP="nbd+unix:///?socket=$W/up.sock"
P1=$(port); "$CBWD" --listen tcp:127.0.0.1:$P1 --tls=off \
  --export "name=pit,type=pit,upstream=$UP,connections=8" 2>$W/c1.log & PIDS+=($!)
P2=$(port); "$CBWD" --listen tcp:127.0.0.1:$P2 --tls=require --tls-psk $W/psk/keys.psk \
  --export "name=pit,type=pit,upstream=$UP,connections=8" 2>$W/c2.log & PIDS+=($!)
P3=$(port); qemu-nbd -r -f raw -t -x pit -b 127.0.0.1 -p $P3 $W/disk.img & PIDS+=($!)
P4=$(port); qemu-nbd -r -f raw -t -x pit -b 127.0.0.1 -p $P4 \
  --object tls-creds-psk,id=t0,endpoint=server,dir=$W/psk --tls-creds t0 $W/disk.img & PIDS+=($!)
declare -A URI=(
  [cbwd-plain]="nbd://127.0.0.1:$P1/pit"
  [cbwd-tls]="nbds://bench@127.0.0.1:$P2/pit?$PSK"
  [qemu-nbd-plain]="nbd://127.0.0.1:$P3/pit"
  [qemu-nbd-tls]="nbds://bench@127.0.0.1:$P4/pit?$PSK"
)
NAMES=(cbwd-plain cbwd-tls qemu-nbd-plain qemu-nbd-tls)
for n in "${NAMES[@]}"; do wait_up "${URI[$n]}"; done
# correctness first: every server returns the image
want=$(md5sum < $W/disk.img | cut -d' ' -f1)
for n in "${NAMES[@]}"; do
  got=$(nbdcopy "${URI[$n]}" - | md5sum | cut -d' ' -f1)
  [ "$got" = "$want" ] || { echo "$n: data differs" >&2; exit 1; }
done
declare -A T
load0=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq "$ROUNDS"); do
  for i in 0 1 2 3; do
    n=${NAMES[$(( (i + r) % 4 ))]}
    t0=$(date +%s.%N)
    nbdcopy --connections=4 "${URI[$n]}" null:
    t1=$(date +%s.%N)
    T[$n]+="$(python3 -c "print('%.0f' % ($SIZE_MB / ($t1 - $t0)))") "
  done
  log "round $r done"
done
load1=$(cut -d' ' -f1-3 /proc/loadavg)
med() { python3 -c 'import sys, statistics; print("%.0f" % statistics.median(map(float, sys.argv[1:])))' $1; }
declare -A M
for n in "${NAMES[@]}"; do M[$n]=$(med "${T[$n]}"); done
rc=$(python3 -c "print('%.2f' % (${M[cbwd-tls]} / ${M[cbwd-plain]}))")
rq=$(python3 -c "print('%.2f' % (${M[qemu-nbd-tls]} / ${M[qemu-nbd-plain]}))")
rr=$(python3 -c "print('%.2f' % ($rc / $rq))")
{
  echo "# TLS cost on a PIT export read ($(date -u +%F\ %H:%M) UTC)"
  echo
  echo "nbdcopy --connections=4 to null:, ${SIZE_MB} MiB image in page cache, $ROUNDS rotated rounds,"
  echo "MiB/s median (all rounds).  Load average before: $load0, after: $load1 (shared 2-CPU machine)."
  echo "$(gnutls-cli --version 2>/dev/null | head -1 || true); $(qemu-nbd --version | head -1)"
  echo
  echo "| server | plain | TLS-PSK | TLS / plain |"
  echo "| --- | --- | --- | --- |"
  echo "| cbwd PIT export (nbdkit file upstream) | ${M[cbwd-plain]} | ${M[cbwd-tls]} | $rc |"
  echo "| qemu-nbd (peer) | ${M[qemu-nbd-plain]} | ${M[qemu-nbd-tls]} | $rq |"
  echo
  echo "cbwd's TLS ratio / qemu-nbd's TLS ratio: **$rr**"
  echo
  echo "Rounds (MiB/s):"
  for n in "${NAMES[@]}"; do echo "- $n: ${T[$n]}"; done
} > "$OUT"
cat "$OUT"
