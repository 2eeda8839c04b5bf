#!/bin/bash
# cbw-race: the classic point-in-time race, hammered.  A PIT reader decides a
# block is not copied yet and reads the live disk; meanwhile a guest write
# copies the block and overwrites it.  The filter's debug delay
# (cbw-debug-pit-delay-us) holds every PIT live read between the decision and
# the read, so each iteration's guest write lands exactly in that window.
#  1. With the filter's re-check the PIT data must always be the old data, and
#     status must show the re-check fired (pit-rechecks > 0).
#  2. With cbw-debug-unsafe-no-recheck=true the same run must return wrong
#     data: proof that this test detects the race.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/cbw-lib.sh"
iters=${CBW_RACE_ITERS:-100}
size=$((16 * 1048576)) gran=65536

run() {                                   # run EXTRA-FILTER-ARGS...
  random_disk "$T/disk.img" $size; cp "$T/disk.img" "$T/ref.img"
  start_target tgt $size
  start_live "$T/disk.img" cbw-granularity=$gran cbw-debug-pit-delay-us=20000 "$@"
  begin_full
  rc=0; "$CBW_IO" race "$LIVE" "$PIT" "$T/ref.img" "$iters" $gran > "$T/race.out" 2>"$T/race.err" || rc=$?
  rechecks=$(status_field pit-rechecks)
  copied=$(status_field copied-blocks)
  ok_ctl '{"execute":"end"}' >/dev/null
  kill "$LIVE_PID" "$TGT_PID"; wait "$LIVE_PID" "$TGT_PID" 2>/dev/null || true
  log "  $(cat "$T/race.out") rechecks=$rechecks copied=$copied rc=$rc"
}

log "1. safe filter: $iters iterations"
run
[ $rc = 0 ] || fail "PIT returned data written after begin: $(cat "$T/race.out" "$T/race.err")"
[ "$copied" -ge "$iters" ] || fail "guest writes did not copy ($copied < $iters): the race was not exercised"
[ "$rechecks" -ge $((iters / 2)) ] || fail "only $rechecks re-checks: the race window was not hit"

log "2. unsafe filter (no re-check) must be caught"
run cbw-debug-unsafe-no-recheck=true
[ $rc = 1 ] && grep -q 'wrong=[1-9]' "$T/race.out" || fail "the unsafe filter was not caught: $(cat "$T/race.out")"
log PASS
