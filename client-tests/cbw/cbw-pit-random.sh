#!/bin/bash
# cbw-pit-random: randomised point-in-time correctness.  Per round: a fresh
# random image (64-96 MiB by default, --max-mib 256 for the full range; with a hole), begin, concurrent random
# guest writes / write-zeroes / trims on the live export and concurrent PIT
# reads checked against a copy taken at begin (cbw-io stress), then the whole
# PIT view must equal that copy (cmp), and the live disk must have changed.
# The target is an NBD server or, one round in three, a local file (file:///),
# half of those with target-direct (O_DIRECT copies).
# Usage: cbw-pit-random.sh [--rounds N] [--seconds S] [--max-mib M]
# (CI: 20 rounds; env CBW_SEED fixes the seed.)
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/cbw-lib.sh"
rounds=${CBW_ROUNDS:-20} secs=1 maxmib=96
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --seconds) secs=$2; shift 2 ;;
    --max-mib) maxmib=$2; shift 2 ;;
    *) fail "unknown option $1" ;;
  esac
done
seed=${CBW_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
log "seed $seed, $rounds rounds"
RANDOM=$seed
grans=(4096 65536 512 16384)
for r in $(seq "$rounds"); do
  rs=$((seed + r))
  mib=$(( 64 + RANDOM % (maxmib - 64 + 1) ))
  tail=$(( (RANDOM % 64) * 512 ))          # sizes not a multiple of the block
  size=$(( mib * 1048576 + tail ))
  gran=${grans[$((RANDOM % 4))]}
  buffer=$(( RANDOM % 2 ? 64 : 0 ))M           # write-back buffer or synchronous copies
  random_disk "$T/disk.img" "$size"
  # a hole, so old data that reads as zero exists
  fallocate -p -o $(( (RANDOM % mib) * 1048576 )) -l 4194304 "$T/disk.img" 2>/dev/null || true
  cp "$T/disk.img" "$T/ref.img"
  direct=
  if [ $((RANDOM % 3)) = 0 ]; then kind=file; start_file_target tgt "$size"
    # half of the local targets with target-direct (O_DIRECT copies)
    if [ $((RANDOM % 2)) = 0 ] && [ "${direct_ok:-yes}" = yes ]; then
      kind=file-direct direct=',"target-direct":true'
    fi
  else kind=nbd; start_target tgt "$size"; fi
  start_live "$T/disk.img" cbw-granularity=$gran cbw-buffer=$buffer
  if [ -n "$direct" ]; then
    b=$(cctl "$CTL" '{"execute":"begin","arguments":{"target":"'"$TGT_URI"'"'"$direct"'}}')
    if [ "$(jget "$b" 'has("return")')" != true ]; then
      case $(jget "$b" .error.desc) in
        *"no direct I/O"*) log "no direct I/O here, local targets without it: $b"
                           direct_ok=no kind=file; begin_full ;;
        *) fail "round $r: begin with target-direct failed: $b" ;;
      esac
    fi
  else
    begin_full
  fi
  "$CBW_IO" stress "$LIVE" "$PIT" "$T/ref.img" "$rs" "$secs" 3 2 > "$T/stress.out" ||
    fail "round $r (seed $rs, size $size, gran $gran, buffer $buffer, target $kind): stress failed: $(cat "$T/stress.out")"
  st=$(ok_ctl '{"execute":"status"}')
  [ "$(jget "$st" .return.errors)" = 0 ] || fail "round $r: errors: $st"
  [ "$(jget "$st" .return.state)" = active ] || fail "round $r: state: $st"
  nbdcopy "$PIT" "$T/pit.img" || fail "round $r: nbdcopy of the PIT view failed"
  cmp "$T/ref.img" "$T/pit.img" || fail "round $r (seed $rs, size $size, gran $gran, buffer $buffer, target $kind): PIT view differs from the copy at begin"
  cmp -s "$T/ref.img" "$T/disk.img" && fail "round $r: live disk did not change (test is not testing)"
  copied=$(jget "$st" '.return["copied-blocks"]'); needed=$(jget "$st" '.return["needed-blocks"]')
  [ "$copied" -gt 0 ] && [ "$copied" -le "$needed" ] || fail "round $r: copied=$copied needed=$needed"
  ok_ctl '{"execute":"end"}' >/dev/null
  log "round $r ok: size $size gran $gran buffer $buffer target $kind $(cat "$T/stress.out") copied $copied/$needed blocks, $(jget "$st" '.return["direct-bytes"]') bytes direct"
  kill "$LIVE_PID" $TGT_PID; wait "$LIVE_PID" $TGT_PID 2>/dev/null || true
  rm -f "$T"/*.img
done
log "PASS: $rounds rounds"
