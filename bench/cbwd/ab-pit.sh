#!/bin/bash
# cbw — bench/cbwd/ab-pit.sh: back-to-back A/B of cbwd's PIT export (the
# read side of the fleecing stack): one upstream (nbdkit file -r on a data
# file), cbwd B (new) and optionally cbwd A (old) as type=pit proxies taking
# turns round by round; nbdcopy to null: with 4 and 1 connections, and the
# peak RSS (VmHWM) of each cbwd.  Prints min/median/max MiB/s per server and
# the per-round ratio B/A (min/median/max).  The full comparison against
# QSD's snapshot-access is run.sh (case G vs D-fleece-first).
#   usage: ab-pit.sh [CBWD_B [CBWD_A]]
#   env:   ROUNDS (3), SIZE (1G; random data, so nbdcopy copies it all),
#          DIR (/var/tmp), PIT_CONNS (8)
set -euo pipefail
B=${1:-${CBW_BUILD:-/tmp/build-J}/server/cbwd}
A=${2:-}
ROUNDS=${ROUNDS:-3} SIZE=${SIZE:-1G}
D=$(mktemp -d "${DIR:-/var/tmp}/cbwd-abpit.XXXXXX")
PN=
cleanup() { [ -n "$PN" ] && kill "$PN" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$D"; }
trap cleanup EXIT
head -c "$SIZE" /dev/urandom > "$D/disk.img"
bytes=$(stat -c %s "$D/disk.img")
nbdkit -f -U "$D/up.sock" -r file "$D/disk.img" & PN=$!
for _ in $(seq 100); do nbdinfo --size "nbd+unix:///?socket=$D/up.sock" >/dev/null 2>&1 && break; sleep 0.05; done
NAMES=(B); [ -n "$A" ] && NAMES+=(A)
declare -A V HWM
for r in $(seq "$ROUNDS"); do
  for n in "${NAMES[@]}"; do
    bin=$B; [ "$n" = A ] && bin=$A
    rm -f "$D/pit.sock"
    "$bin" --listen "unix:$D/pit.sock" \
      --export "name=snap,type=pit,upstream=nbd+unix:///?socket=$D/up.sock,connections=${PIT_CONNS:-8}" \
      2>"$D/$n.log" & P=$!
    U="nbd+unix:///snap?socket=$D/pit.sock"
    for _ in $(seq 100); do nbdinfo --size "$U" >/dev/null 2>&1 && break; sleep 0.05; done
    for c in 4 1; do
      s=$(date +%s.%N); nbdcopy --connections=$c "$U" null:; e=$(date +%s.%N)
      V[$n.$c]+="$(awk -v b="$bytes" -v s="$s" -v e="$e" 'BEGIN{printf "%.1f", b/1048576/(e-s)}') "
    done
    h=$(awk '/VmHWM/{print $2}' "/proc/$P/status")
    HWM[$n]+="$((h / 1024)) "
    kill "$P"; wait "$P" 2>/dev/null || true
  done
done
stats() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{a[NR]=$1} END{printf "%s %s %s", a[1], a[int((NR+1)/2)], a[NR]}'; }
ratio() { paste <(echo "$1" | tr ' ' '\n' | sed '/^$/d') <(echo "$2" | tr ' ' '\n' | sed '/^$/d') |
          awk '{printf "%.3f\n", $1/$2}' | sort -g | awk '{a[NR]=$1} END{printf "%.2f / %.2f / %.2f", a[1], a[int((NR+1)/2)], a[NR]}'; }
echo "# cbwd PIT proxy, $ROUNDS rounds, $SIZE of random data, upstream nbdkit file"
echo "| metric | server | min | median | max | ratio B/A (min/median/max) |"
echo "|---|---|---|---|---|---|"
for m in 4 1; do
  for n in "${NAMES[@]}"; do
    read -r mn md mx <<<"$(echo "${V[$n.$m]}" | stats)"
    rr=-; [ -n "$A" ] && [ "$n" = B ] && rr=$(ratio "${V[B.$m]}" "${V[A.$m]}")
    echo "| nbdcopy MiB/s, $m conn | $n | $mn | $md | $mx | $rr |"
  done
done
for n in "${NAMES[@]}"; do
  read -r mn md mx <<<"$(echo "${HWM[$n]}" | stats)"
  rr=-; [ -n "$A" ] && [ "$n" = B ] && rr=$(ratio "${HWM[B]}" "${HWM[A]}")
  echo "| peak RSS MiB | $n | $mn | $md | $mx | $rr |"
done
