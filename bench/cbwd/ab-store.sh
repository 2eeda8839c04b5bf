#!/bin/bash
# cbw — bench/cbwd/ab-store.sh: back-to-back A/B of store-export writes on ONE
# file: nbdkit's file plugin (the peer of issue 5) against one or two cbwd
# builds, the servers taking turns round by round so machine noise hits all
# of them alike.  Prints IOPS / MiB/s per server (min/median/max over the
# rounds) and the ratio of each cbwd against nbdkit measured in the same run.
#   usage: ab-store.sh [CBWD_B [CBWD_A]]   (B = new build, A = optional old one)
#   env:   ROUNDS (default 3), RUNTIME (s per fio run, default 5),
#          SIZE (default 1G), DIR (default /var/tmp), IODEPTH (default 16)
# Each fio run uses the nbd engine, numjobs=1, like the anchors' case A.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
B=${1:-${CBW_BUILD:-/tmp/build-J}/server/cbwd}
A=${2:-}
ROUNDS=${ROUNDS:-3} RUNTIME=${RUNTIME:-5} SIZE=${SIZE:-1G} IODEPTH=${IODEPTH:-16}
D=$(mktemp -d "${DIR:-/var/tmp}/cbwd-ab.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$D"; }
trap cleanup EXIT
truncate -s "$SIZE" "$D/disk.img"
declare -A CMD
CMD[nbdkit]="nbdkit -f -U $D/nbdkit.sock file $D/disk.img"
CMD[cbwdB]="$B --listen unix:$D/cbwdB.sock --export name=store,type=store,path=$D/disk.img"
NAMES=(nbdkit cbwdB)
if [ -n "$A" ]; then
  CMD[cbwdA]="$A --listen unix:$D/cbwdA.sock --export name=store,type=store,path=$D/disk.img"
  NAMES+=(cbwdA)
fi
uri() { case $1 in nbdkit) echo "nbd+unix:///?socket=$D/nbdkit.sock" ;;
                   *) echo "nbd+unix:///store?socket=$D/$1.sock" ;; esac; }
run_one() { # NAME JOB -> prints metric
  local n=$1 job=$2 out=$D/$1.$2.json
  rm -f "$D/$n.sock"
  ${CMD[$n]} 2>"$D/$n.log" & local p=$!; PIDS+=("$p")
  for _ in $(seq 100); do nbdinfo --size "$(uri "$n")" >/dev/null 2>&1 && break; sleep 0.05; done
  local a=(--name=$job --ioengine=nbd --uri="$(uri "$n")" --iodepth="$IODEPTH" --numjobs=1
           --time_based --runtime="$RUNTIME" --output-format=json --output="$out")
  case $job in
    randwrite4k) a+=(--rw=randwrite --bs=4k) ;;
    seqwrite1m)  a+=(--rw=write --bs=1M) ;;
  esac
  sync
  fio "${a[@]}" >/dev/null 2>"$out.err" || { echo "fio failed: $(cat "$out.err"); server log: $(cat "$D/$n.log")" >&2; kill "$p" 2>/dev/null; return 1; }
  awk '/VmHWM/{print $2}' "/proc/$p/status" >> "$D/$n.hwm"
  kill "$p"; wait "$p" 2>/dev/null || true
  case $job in
    randwrite4k) jq -r '.jobs[0].write.iops' "$out" ;;
    seqwrite1m)  jq -r '.jobs[0].write.bw/1024' "$out" ;;
  esac
}
declare -A V
for job in randwrite4k seqwrite1m; do
  for r in $(seq "$ROUNDS"); do
    for n in "${NAMES[@]}"; do
      V[$n.$job]+="$(run_one "$n" "$job") "
    done
  done
done
stats() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{a[NR]=$1} END{printf "%.0f %.0f %.0f", a[1], a[int((NR+1)/2)], a[NR]}'; }
echo "# store writes, $ROUNDS rounds x ${RUNTIME}s, iodepth $IODEPTH, $SIZE file in ${DIR:-/var/tmp}"
echo "| job | server | min | median | max | ratio vs nbdkit (min/median/max) |"
echo "|---|---|---|---|---|---|"
for job in randwrite4k seqwrite1m; do
  read -r pmn pmd pmx <<<"$(echo "${V[nbdkit.$job]}" | stats)"
  for n in "${NAMES[@]}"; do
    read -r mn md mx <<<"$(echo "${V[$n.$job]}" | stats)"
    # ratio per round (same round = same machine state), then min/median/max
    rr=$(paste <(echo "${V[$n.$job]}" | tr ' ' '\n' | sed '/^$/d') \
               <(echo "${V[nbdkit.$job]}" | tr ' ' '\n' | sed '/^$/d') |
         awk '{printf "%.3f ", $1/$2}' | tr ' ' '\n' | sed '/^$/d' | sort -g |
         awk '{a[NR]=$1} END{printf "%.2f / %.2f / %.2f", a[1], a[int((NR+1)/2)], a[NR]}')
    echo "| $job | $n | $mn | $md | $mx | $rr |"
  done
done
for n in "${NAMES[@]}"; do
  echo "| peak RSS MiB (max over runs) | $n | | | $(sort -n "$D/$n.hwm" | tail -1 | awk '{printf "%d", $1/1024}') | |"
done
