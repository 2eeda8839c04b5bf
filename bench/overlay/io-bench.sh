#!/bin/bash
# bench/overlay/io-bench.sh: guest I/O through overlay chains of the chain
# plugin versus the same plugin serving the raw disk alone, same run, same
# data.  Reports ratios (per round, min/median/max over ROUNDS rounds):
#   read1 / read8: nbdcopy whole-disk read through a chain of 1 / 8 overlays
#                  (each overlay holds 1/16 of the disk, scattered) vs raw;
#   seqwrite1m:    fio 1 MiB sequential writes into a fresh top overlay vs raw;
#   randwrite4k:   fio 4 KiB random writes (QD16) into the top overlay after
#                  its clusters are allocated vs raw, and on first touch.
# Bars (issue 7): read1 >= 0.95, read8 >= 0.85, writes >= 0.9.
# Knobs: WORK (/tmp/cbw-bench-overlay), CBW_BUILD (build tree with the
# plugin), ROUNDS (5; RUNS is accepted too), FIO_RUNTIME (10), DISK_SIZE (2G).
# Writes io-results.md beside itself (conditions + figures).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CBW_SRC=${CBW_SRC:-$(cd "$HERE/../.." && pwd)}
CBW_BUILD=${CBW_BUILD:-$CBW_SRC/build}
PLUGIN=$CBW_BUILD/modules/nbdkit-chain-plugin.so
WORK=${WORK:-/tmp/cbw-bench-overlay}
RUNS=${ROUNDS:-${RUNS:-5}}
FIO_RUNTIME=${FIO_RUNTIME:-10}
DISK_SIZE=${DISK_SIZE:-2G}
SIZE=$(numfmt --from=iec "$DISK_SIZE")
mkdir -p "$WORK"
S=$WORK/io.sock U="nbd+unix:///?socket=$WORK/io.sock"
PID=
cleanup() { [ -n "$PID" ] && { kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; }; rm -f "$WORK"/io-*.img "$WORK"/io-*.chain* "$WORK"/io-*.json "$WORK"/io.sock "$WORK"/ovc-tool; }
trap cleanup EXIT
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
for p in nbdkit nbdcopy hyperfine fio jq bc; do command -v $p >/dev/null || { log "$p missing"; exit 1; }; done
[ -f "$PLUGIN" ] || { log "no $PLUGIN (set CBW_BUILD)"; exit 1; }

gcc -O2 -D_GNU_SOURCE -D_FILE_OFFSET_BITS=64 -I"$CBW_SRC/common" -I"$CBW_SRC/formats" \
  -I"$CBW_SRC/plugin/chain" -o "$WORK/ovc-tool" "$HERE/ovc-tool.c" \
  "$CBW_SRC/plugin/chain/overlay_chain.c" "$CBW_SRC/plugin/chain/overlay_open.c" \
  "$CBW_SRC/plugin/chain/commit.c" "$CBW_SRC/plugin/chain/overlay_ctl.c" "$CBW_SRC/formats/overlay.c" \
  "$CBW_SRC/formats/bitmap.c" "$CBW_SRC/common/cbw_err.c" "$CBW_SRC/common/fileutil.c" \
  "$CBW_SRC/common/control.c" -ljson-c -lxxhash -lpthread
TOOL=$WORK/ovc-tool

[ -f "$WORK/io-base.src" ] && [ "$(stat -c %s "$WORK/io-base.src")" = "$SIZE" ] ||
  { log "creating $DISK_SIZE random disk"; head -c "$SIZE" /dev/urandom > "$WORK/io-base.src"; }

serve() { rm -f "$S"; nbdkit -f -U "$S" "$PLUGIN" "$@" & PID=$!
  for _ in $(seq 100); do nbdinfo --size "$U" >/dev/null 2>&1 && return; sleep 0.1; done; exit 1; }
stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=; }
read_mibs() {   # MiB/s of one timed nbdcopy whole-disk read (after one warm read)
  local j=$WORK/io-hf.json
  nbdcopy "$U" null:
  hyperfine -N --style none --runs 1 --export-json "$j" "nbdcopy $U null:" >/dev/null 2>&1
  jq -r '.results[0].median' "$j" | awk -v s="$SIZE" '{printf "%.0f", s/1048576/$1}'
}
fio_iops() {    # fio_iops RW BS -> write IOPS of one FIO_RUNTIME-second run over 1 GiB
  sync
  fio --name=b --ioengine=nbd --uri="$U" --iodepth=16 --numjobs=1 --rw="$1" --bs="$2" \
      --size=1G --time_based --runtime="$FIO_RUNTIME" --output-format=json \
      --output="$WORK/io-fio.json" >/dev/null 2>&1
  jq -r '.jobs[0].write.iops' "$WORK/io-fio.json"
}
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# chain NAME NOVERLAYS: fresh copy of the base + chain with n overlays, each
# holding 1/16 of the disk (1 MiB pieces, different places per layer)
mkchain() {
  local name=$1 n=$2 k
  cp "$WORK/io-base.src" "$WORK/io-$name.img"
  rm -f "$WORK/io-$name.chain"*
  "$TOOL" create "$WORK/io-$name.chain" "io-$name.img" 65536
  for k in $(seq "$n"); do
    "$TOOL" snapshot "$WORK/io-$name.chain" >/dev/null
    # 1 MiB every 16 MiB, shifted by k MiB
    "$TOOL" fill "$WORK/io-$name.chain" $((16 << 20)) $((1 << 20)) $((SIZE >> 24)) $((k << 20))
  done
}

# Prepare every disk first, then measure the cases interleaved, ROUNDS
# rounds, the order of the cases reversed every other round, so that
# page-cache and load drift hit all cases alike.  A ratio against the raw
# disk is taken per round; min/median/max of the per-round ratios are
# printed.
cp "$WORK/io-base.src" "$WORK/io-raw.img"
mkchain c1 1
mkchain c8 8
cp "$WORK/io-base.src" "$WORK/io-w.img"; rm -f "$WORK"/io-w.chain*
"$TOOL" create "$WORK/io-w.chain" io-w.img 65536; "$TOOL" snapshot "$WORK/io-w.chain" >/dev/null
sync
declare -A V                 # this round's figures
declare -A RATIOS            # name -> " r1 r2 ..."
case_raw() {
  serve file="$WORK/io-raw.img"; V[raw]=$(read_mibs)
  if [ "$round" = 1 ]; then V[rawfirst]=$(fio_iops randwrite 4k); fi
  V[rawseq]=$(fio_iops write 1M); V[rawrand]=$(fio_iops randwrite 4k); stop
}
case_c1() { serve chain="$WORK/io-c1.chain"; V[c1]=$(read_mibs); stop; }
case_c8() { serve chain="$WORK/io-c8.chain"; V[c8]=$(read_mibs); stop; }
case_w() {
  serve chain="$WORK/io-w.chain"
  if [ "$round" = 1 ]; then V[ovfirst]=$(fio_iops randwrite 4k); fi   # first touch of the overlay
  V[ovseq]=$(fio_iops write 1M); V[ovrand]=$(fio_iops randwrite 4k); stop
}
ratio() { echo "scale=4; $1 / $2" | bc; }
CASES=(case_raw case_c1 case_c8 case_w)
for round in $(seq "$RUNS"); do
  if [ $((round % 2)) = 1 ]; then order=("${CASES[@]}")
  else order=(case_w case_c8 case_c1 case_raw); fi
  for f in "${order[@]}"; do "$f"; done
  RATIOS[read1]+=" $(ratio "${V[c1]}" "${V[raw]}")"
  RATIOS[read8]+=" $(ratio "${V[c8]}" "${V[raw]}")"
  RATIOS[seqw]+=" $(ratio "${V[ovseq]}" "${V[rawseq]}")"
  RATIOS[randw]+=" $(ratio "${V[ovrand]}" "${V[rawrand]}")"
  log "round $round (${order[*]}): read raw ${V[raw]} c1 ${V[c1]} c8 ${V[c8]} MiB/s; seq1M ${V[rawseq]} ${V[ovseq]}; rand4k ${V[rawrand]} ${V[ovrand]} IOPS"
done
stats() { printf '%s\n' $1 | sort -g | awk '{a[NR]=$1} END {m = NR % 2 ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2
    printf "min %.3f median %.3f max %.3f", a[1], m, a[NR]}'; }
out=$(cat <<EOF
overlay I/O vs the raw disk, $RUNS rounds (per-round ratios chain/raw; >1: chain faster)
read  1 overlay : $(stats "${RATIOS[read1]}")   bar 0.95
read  8 overlays: $(stats "${RATIOS[read8]}")   bar 0.85
seqwrite1m top  : $(stats "${RATIOS[seqw]}")   bar 0.9
randwrite4k top : $(stats "${RATIOS[randw]}")   bar 0.9
randwrite4k first touch of a fresh overlay (round 1 only): $(ratio "${V[ovfirst]}" "${V[rawfirst]}")x raw (${V[ovfirst]} vs ${V[rawfirst]} IOPS; 64 KiB copy-up per 4 KiB write)
EOF
)
echo "$out"
{
  echo "# bench/overlay/io-bench.sh — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs; $(uname -r);"
  echo "nbdkit $(nbdkit --version | awk '{print $2}'); work dir $WORK on $(df -T "$WORK" | awk 'NR==2{print $2}');"
  echo "knobs: RUNS=$RUNS FIO_RUNTIME=$FIO_RUNTIME DISK_SIZE=$DISK_SIZE"
  echo
  echo '```'
  echo "$out"
  echo '```'
} > "$HERE/io-results.md"
