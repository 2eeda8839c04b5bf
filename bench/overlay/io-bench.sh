#!/bin/bash
# bench/overlay/io-bench.sh: guest I/O through overlay chains of the chain
# plugin versus the same plugin serving the raw disk alone, same run, same
# data.  Reports ratios:
#   read1 / read8: nbdcopy whole-disk read through a chain of 1 / 8 overlays
#                  (each overlay holds 1/16 of the disk, scattered) vs raw;
#   seqwrite1m:    fio 1 MiB sequential writes into a fresh top overlay vs raw;
#   randwrite4k:   fio 4 KiB random writes (QD16) into the top overlay after
#                  its clusters are allocated vs raw, and on first touch.
# Bars (issue 7): read1 >= 0.95, read8 >= 0.85, writes >= 0.9.
# Knobs: WORK (/tmp/cbw-bench-overlay), CBW_BUILD (build tree with the
# plugin), RUNS (5), FIO_RUNTIME (10), DISK_SIZE (2G).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CBW_SRC=${CBW_SRC:-$(cd "$HERE/../.." && pwd)}
CBW_BUILD=${CBW_BUILD:-$CBW_SRC/build}
PLUGIN=$CBW_BUILD/modules/nbdkit-chain-plugin.so
WORK=${WORK:-/tmp/cbw-bench-overlay}
RUNS=${RUNS:-5}
FIO_RUNTIME=${FIO_RUNTIME:-10}
DISK_SIZE=${DISK_SIZE:-2G}
SIZE=$(numfmt --from=iec "$DISK_SIZE")
mkdir -p "$WORK"
S=$WORK/io.sock U="nbd+unix:///?socket=$WORK/io.sock"
PID=
cleanup() { [ -n "$PID" ] && { kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; }; rm -f "$WORK"/io-*.img "$WORK"/io-*.chain* "$WORK"/io-*.json "$WORK"/io.sock "$WORK"/ovc-tool; }
trap cleanup EXIT
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
for p in nbdkit nbdcopy hyperfine fio jq; do command -v $p >/dev/null || { log "$p missing"; exit 1; }; done
[ -f "$PLUGIN" ] || { log "no $PLUGIN (set CBW_BUILD)"; exit 1; }

gcc -O2 -D_GNU_SOURCE -D_FILE_OFFSET_BITS=64 -I"$CBW_SRC/common" -I"$CBW_SRC/formats" \
  -I"$CBW_SRC/plugin/chain" -o "$WORK/ovc-tool" "$HERE/ovc-tool.c" \
  "$CBW_SRC/plugin/chain/overlay_chain.c" "$CBW_SRC/formats/overlay.c" \
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

# Prepare every disk first, then measure the cases interleaved, RUNS rounds,
# so that page-cache and load drift hit all cases alike; medians are compared.
cp "$WORK/io-base.src" "$WORK/io-raw.img"
mkchain c1 1
mkchain c8 8
cp "$WORK/io-base.src" "$WORK/io-w.img"; rm -f "$WORK"/io-w.chain*
"$TOOL" create "$WORK/io-w.chain" io-w.img 65536; "$TOOL" snapshot "$WORK/io-w.chain" >/dev/null
sync
declare -A R
for round in $(seq "$RUNS"); do
  serve file="$WORK/io-raw.img"; R[raw]+=" $(read_mibs)"
  if [ "$round" = 1 ]; then R[rawfirst]=$(fio_iops randwrite 4k); fi
  R[rawseq]+=" $(fio_iops write 1M)"; R[rawrand]+=" $(fio_iops randwrite 4k)"; stop
  serve chain="$WORK/io-c1.chain"; R[c1]+=" $(read_mibs)"; stop
  serve chain="$WORK/io-c8.chain"; R[c8]+=" $(read_mibs)"; stop
  serve chain="$WORK/io-w.chain"
  if [ "$round" = 1 ]; then R[ovfirst]=$(fio_iops randwrite 4k); fi   # first touch of the overlay
  R[ovseq]+=" $(fio_iops write 1M)"; R[ovrand]+=" $(fio_iops randwrite 4k)"; stop
  log "round $round: ${R[raw]##* } ${R[c1]##* } ${R[c8]##* } MiB/s; seq ${R[rawseq]##* } ${R[ovseq]##* }; rand ${R[rawrand]##* } ${R[ovrand]##* }"
done
ratio() { echo "scale=3; $1 / $2" | bc; }
r_raw=$(med ${R[raw]}) r_1=$(med ${R[c1]}) r_8=$(med ${R[c8]})
w_raw=$(med ${R[rawseq]}) w_ov=$(med ${R[ovseq]})
rw_raw=$(med ${R[rawrand]}) rw_ov=$(med ${R[ovrand]})
echo "read  1 overlay : $(ratio "$r_1" "$r_raw")x raw ($r_1 vs $r_raw MiB/s)   bar 0.95"
echo "read  8 overlays: $(ratio "$r_8" "$r_raw")x raw ($r_8 vs $r_raw MiB/s)   bar 0.85"
echo "seqwrite1m top  : $(ratio "$w_ov" "$w_raw")x raw ($w_ov vs $w_raw IOPS)   bar 0.9"
echo "randwrite4k top : $(ratio "$rw_ov" "$rw_raw")x raw ($rw_ov vs $rw_raw IOPS)   bar 0.9"
echo "randwrite4k first touch of a fresh overlay: $(ratio "${R[ovfirst]}" "${R[rawfirst]}")x raw (${R[ovfirst]} vs ${R[rawfirst]} IOPS; 64 KiB copy-up per 4 KiB write)"
