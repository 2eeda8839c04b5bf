#!/bin/bash
# cbw — client-tests/cbwd/pit-direct.sh: cbwd's PIT export reading the live
# disk and the store itself (state-file + live-file + store-file), across
# processes: nbdkit + cbw filter (begin with "state-file") writes, cbwd reads.
#  1. stress: concurrent random guest writes / zeroes / trims on the live disk
#     and random PIT reads through cbwd, checked against the copy taken at
#     begin (cbw-io stress); then nbdcopy of the whole PIT view equals it;
#     cbwd's counters prove the direct path served the reads.
#  2. the race, hammered: cbwd's debug delay holds every direct read between
#     its state decision and its file read, and each iteration's guest write
#     lands in that window (cbw-io race): the data must be the old data and
#     the re-check must have fired; the same run with
#     debug-unsafe-no-recheck=on must return wrong data (the test bites).
#  3. end: reads through cbwd fail (EIO), never data; the map is removed.
#  4. nbdkit killed (-9) and the disk changed behind it: reads fail.
#  5. a stale/foreign/garbage state file: cbwd refuses to start, saying why.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/lib.sh"
requires nbdcopy; requires nbdinfo; requires jq
CBW_IO=$CBW_BUILD/client-tests/cbw/cbw-io
[ -x "$CBW_IO" ] || skip "cbw-io not built ($CBW_IO)"
[ -f "$CBW_FILTER" ] || skip "cbw filter not built"
SIZE=$((24 * 1024 * 1024 + 4096 * 3))
GRAN=65536

# setup NAME [PIT-EXPORT-EXTRA]: disk + copy at begin, store cbwd, nbdkit +
# cbw filter, begin with a state file, PIT cbwd with direct reads.
setup() {
  head -c $SIZE /dev/urandom > $T/disk.img
  cp $T/disk.img $T/ref.img
  SOCK=$T/store.sock
  start_cbwd store-$1 --export "name=store,type=store,path=$T/store.img,size=$SIZE"
  STORE_PID=$CBWD_PID
  rm -f $T/states
  start_nbdkit "$T/live.sock" --filter="$CBW_FILTER" file "$T/disk.img" \
    cbw-control="$T/cbw.ctl" cbw-pit-export=pit cbw-granularity=$GRAN
  LIVE_PID=$NBDKIT_PID
  LIVE="nbd+unix:///?socket=$T/live.sock"
  wait_socket "$T/cbw.ctl"
  r=$(timeout 15 "$CBW_IO" ctl "$T/cbw.ctl" "{\"execute\":\"begin\",\"arguments\":{\"target\":\"nbd+unix:///store?socket=$T/store.sock\",\"state-file\":\"$T/states\"}}" || true)
  [ "$(printf '%s' "$r" | jq -r '.return["state-file"] // empty')" = "$T/states" ] ||
    fail "begin with a state file: ${r:-no reply (control socket hung?)}"
  SOCK=$T/pit.sock
  start_cbwd pit-$1 --export "name=pit,type=pit,upstream=nbd+unix:///pit?socket=$T/live.sock,connections=4,state-file=$T/states,live-file=$T/disk.img,store-file=$T/store.img${2:-}"
  PIT=$(uri pit)
}
teardown() {                  # stop cbwd (pit), nbdkit, cbwd (store)
  stop_cbwd
  kill "$LIVE_PID" 2>/dev/null || true; wait "$LIVE_PID" 2>/dev/null || true
  CBWD_PID=$STORE_PID; CBWD_LOG=$T/store-$1.log; stop_cbwd
}
# direct_counters LOG: "DIRECT UPSTREAM RECHECKS" from cbwd's exit line
direct_counters() {
  sed -n "s/.*export 'pit': point-in-time reads: \([0-9]*\) bytes direct, \([0-9]*\) bytes through the upstream, \([0-9]*\) re-checks.*/\1 \2 \3/p" "$1" | tail -1
}

log "1. stress through the direct path"
setup stress
grep -q "export 'pit': direct point-in-time reads" $T/pit-stress.log || fail "direct path not enabled: $(cat $T/pit-stress.log)"
"$CBW_IO" stress "$LIVE" "$PIT" $T/ref.img ${CBW_SEED:-$RANDOM} ${CBW_SECONDS:-2} 3 2 > $T/stress.out ||
  fail "stress: PIT data through cbwd differs from the copy at begin: $(cat $T/stress.out)"
log "  $(cat $T/stress.out)"
nbdcopy --connections=4 "$PIT" $T/pit.img || fail "nbdcopy of the PIT export"
cmp $T/ref.img $T/pit.img || fail "PIT view through cbwd differs from the copy at begin"
cmp -s $T/ref.img $T/disk.img && fail "the live disk did not change: the test is not testing"
st=$("$CBW_IO" ctl "$T/cbw.ctl" '{"execute":"status"}')
[ "$(printf '%s' "$st" | jq -r '.return["copied-blocks"]')" -gt 0 ] || fail "no copies: $st"
teardown stress
read -r direct upstream rechecks <<< "$(direct_counters $T/pit-stress.log)"
log "  cbwd: $direct bytes direct, $upstream through the upstream, $rechecks re-checks"
[ -n "$direct" ] && [ "$direct" -ge "$SIZE" ] ||
  fail "the direct path served $direct bytes, less than one whole copy ($SIZE): speed-up lost"

log "2. the race, with and without the re-check"
iters=${CBW_RACE_ITERS:-30}
setup race ",debug-delay-us=20000"
rc=0; "$CBW_IO" race "$LIVE" "$PIT" $T/ref.img $iters $GRAN > $T/race.out 2>&1 || rc=$?
teardown race
read -r direct upstream rechecks <<< "$(direct_counters $T/pit-race.log)"
log "  safe: $(tail -1 $T/race.out), re-checks $rechecks, direct $direct"
[ $rc = 0 ] || fail "PIT through cbwd returned data written after begin: $(cat $T/race.out)"
[ "$rechecks" -ge $((iters / 2)) ] || fail "only $rechecks re-checks in $iters iterations: the window was not hit"
setup unsafe ",debug-delay-us=20000,debug-unsafe-no-recheck=on"
rc=0; "$CBW_IO" race "$LIVE" "$PIT" $T/ref.img $iters $GRAN > $T/race.out 2>&1 || rc=$?
teardown unsafe
log "  unsafe: $(tail -1 $T/race.out)"
[ $rc = 1 ] && grep -q 'wrong=[1-9]' $T/race.out || fail "the unsafe reader was not caught: $(cat $T/race.out)"

log "3. end: errors, never data"
setup end
"$CBW_IO" pread "$PIT" 0 65536 $T/ref.img | grep -qx ok || fail "read before end"
qemu-io -f raw "$LIVE" -c "write -P 9 65536 65536" >/dev/null 2>&1 || fail "guest write"
"$CBW_IO" ctl "$T/cbw.ctl" '{"execute":"end"}' | grep -q '"return"' || fail "end"
[ -e $T/states ] && fail "the state map was not removed at end"
qemu-io -f raw "$LIVE" -c "write -P 8 0 65536" >/dev/null 2>&1 || fail "guest write after end"
for off in 0 65536 $((GRAN * 7)); do
  out=$("$CBW_IO" pread "$PIT" $off 4096 $T/ref.img)
  case $out in error*) ;; *) fail "read at $off after end: $out (expected an error)";; esac
done
teardown end

log "4. nbdkit killed, disk changed behind its back"
setup kill
"$CBW_IO" pread "$PIT" $((GRAN * 3)) 65536 $T/ref.img | grep -qx ok || fail "read before the kill"
kill9 "$LIVE_PID"
printf 'XXXXXXXX' | dd of=$T/disk.img bs=1 seek=$((GRAN * 3)) conv=notrunc status=none
out=$("$CBW_IO" pread "$PIT" $((GRAN * 3)) 65536 $T/ref.img)
case $out in error*) ;; *) fail "read with the filter's nbdkit dead: $out (expected an error)";; esac
[ -e $T/states ] && cp $T/states $T/states.stale
stop_cbwd
CBWD_PID=$STORE_PID; CBWD_LOG=$T/store-kill.log; stop_cbwd

log "5. cbwd refuses bad state files"
SOCK=$T/bad.sock
refuse() {                    # refuse WHY EXPORT-KEYS: cbwd must exit, saying WHY
  local rc=0
  timeout 20 "$CBWD" --listen "unix:$SOCK" --export "name=pit,type=pit,upstream=nbd+unix:///?socket=$T/up.sock,$2" \
    2> $T/bad.log || rc=$?
  [ $rc != 0 ] && [ $rc != 124 ] || fail "cbwd started with $1 (rc $rc)"
  grep -q "$1" $T/bad.log || fail "cbwd's error does not say '$1': $(cat $T/bad.log)"
  log "  refused: $(grep -m1 "$1" $T/bad.log)"
}
start_nbdkit "$T/up.sock" -r file "$T/ref.img"
D="live-file=$T/ref.img,store-file=$T/ref.img"
head -c 8192 /dev/urandom > $T/garbage
refuse "bad magic" "state-file=$T/garbage,$D"
refuse "No such file" "state-file=$T/nonexistent,$D"
refuse "go together" "state-file=$T/garbage"
if [ -e $T/states.stale ]; then
  refuse "not active" "state-file=$T/states.stale,$D"
fi
log PASS
