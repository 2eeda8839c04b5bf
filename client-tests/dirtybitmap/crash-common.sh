# cbw — client-tests/dirtybitmap/crash-common.sh: ROUNDS rounds of random
# concurrent writes/zeroes/trims from dbm-crashwriter (libnbd, 16 in flight),
# nbdkit killed with SIGKILL at a random moment, restart, and check.py
# (dbm-tool check) asserts that every acknowledged request and every granule
# whose content changed is dirty.  After kill -9 the bitmaps must come back
# from the live-bitmap map ("map" recovery) and be tight: dirty <= 1.25x the
# granules of the requests logged (sent, in flight included).
# Sourced by crash-kill9.sh (MODE=kill9) and crash-powerloss.sh
# (MODE=powerloss: nbdkit mirrors its durable state with
# CBW_TEST_POWERLOSS_DIR and, after the kill, the bitmap files are replaced
# by the mirror, i.e. everything not yet fsynced is dropped; the live-bitmap
# map file survives, as it could on a real disk, but nbdkit restarts with
# another boot id (CBW_TEST_BOOT_ID), so the map must be ignored and the
# journal used: "journal" recovery).
# CBW_DBM_ROUNDS=N changes the number of rounds (default 20).  USE_CHAIN=1
# puts the filter on the cbw chain plugin instead of nbdkit's file plugin.  The scratch
# directory is on /dev/shm when it is writable (fsync there is cheap, so 20
# rounds fit in the CI budget on a loaded machine; the crash semantics under
# test are the filter's own ordering, and power loss is simulated anyway);
# set TMPDIR to run on another file system.
if [ -z "${TMPDIR:-}" ] && [ -w /dev/shm ]; then export TMPDIR=/dev/shm; fi
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/sanitize-guard.sh"
requires jq
HERE=$(cd "$(dirname "$0")" && pwd)
CW=$CBW_BUILD/client-tests/dirtybitmap/dbm-crashwriter
TOOL=$CBW_BUILD/client-tests/dirtybitmap/dbm-tool
[ -x "$CW" ] && [ -x "$TOOL" ] || fail "dbm-crashwriter / dbm-tool not built"
[ -f "$DIRTYBITMAP_FILTER" ] || fail "$DIRTYBITMAP_FILTER not built"
ROUNDS=${CBW_DBM_ROUNDS:-20}

mkdir -p "$T/bm" "$T/pl"
head -c 64M /dev/urandom > "$T/disk.img"
if [ "${USE_CHAIN:-0}" = 1 ]; then
  [ -f "$CHAIN_PLUGIN" ] || skip "chain plugin not built"
  PLUGIN=("$CHAIN_PLUGIN" file="$T/disk.img")
else
  PLUGIN=(file "$T/disk.img")
fi
ARGS=(--filter="$DIRTYBITMAP_FILTER" "${PLUGIN[@]}"
      dirtybitmap-image="$T/disk.img" dirtybitmap="$T/bm/d.json"
      dirtybitmap-control="$T/ctl" dirtybitmap-checkpoint-interval=1
      dirtybitmap-region-size=1M dirtybitmap-create=true)
if [ "$MODE" = powerloss ]; then
  export CBW_TEST_POWERLOSS_DIR=$T/pl
  export CBW_TEST_JOURNAL_SYNC_DELAY_US=2000
fi

wait_ctl() { "$TOOL" wait "$T/ctl" || fail "control socket did not answer"; }
ok() { "$TOOL" ctl "$T/ctl" "$@" >/dev/null || fail "control $* failed"; }

start_nbdkit "$T/s" "${ARGS[@]}"; wait_ctl
ok add '{"name":"b0","granularity":65536}'

dropped=0; unsynced_rounds=0; total_over=0; total_dirty=0
for round in $(seq "$ROUNDS"); do
  ok clear '{"name":"b0"}'
  cp "$T/disk.img" "$T/before.img"
  seed=$((RANDOM * 32768 + RANDOM))
  delay=$(printf '0.%03d' $((100 + seed % 800)))
  # with the control socket, the writer also forces a fine checkpoint every
  # 20 ms: the journal shrinks and regions are re-marked all the time
  rm -f "$T/log"
  start_bg "$CW" "nbd+unix:///?socket=$T/s" "$T/log" "$seed" 10 "$T/ctl" > "$T/cw.out"
  CW_PID=$BG_PID
  # the random delay counts from the first request (the writer connected):
  # on a loaded machine its start-up alone can exceed the delay
  for _ in $(seq 200); do [ -s "$T/log" ] && break; sleep 0.05; done
  [ -s "$T/log" ] || fail "round $round: crashwriter sent nothing: $(cat "$T/cw.out")"
  sleep "$delay"
  last_info=$("$TOOL" ctl "$T/ctl" info 2>/dev/null || echo '{"checkpoints":"?"}')
  kill9 "$NBDKIT_PID"
  wait "$CW_PID" || fail "round $round: crashwriter failed: $(cat "$T/cw.out")"

  if [ "$MODE" = powerloss ]; then
    # Power cut: only what was fsynced survives.  Count rounds where that
    # differs from what the filter had written (the simulation had teeth).
    [ -L "$T/pl/store.cur" ] || fail "round $round: no power-loss mirror of the store"
    [ -f "$T/pl/journal" ] || fail "round $round: no power-loss mirror of the journal"
    if ! cmp -s "$T/pl/journal" "$T/bm/d.json.journal"; then unsynced_rounds=$((unsynced_rounds + 1)); fi
    [ -f "$T/bm/d.json.livemap" ] || fail "round $round: no live-bitmap map"
    mv "$T/bm/d.json.livemap" "$T/livemap"
    rm -f "$T/bm"/*
    cp "$T/pl/store.cur"/* "$T/bm/"
    cp "$T/pl/journal" "$T/bm/d.json.journal"
    mv "$T/livemap" "$T/bm/d.json.livemap"
    export CBW_TEST_BOOT_ID="powerloss-test-boot-$round"   # rebooted
    want_rec=journal
  else
    want_rec=map
  fi

  start_nbdkit "$T/s" "${ARGS[@]}"; wait_ctl
  rec=$("$TOOL" ctl "$T/ctl" info | jq -r .recovery)
  assert_eq "round $round recovery" "$want_rec" "$rec"
  res=$("$TOOL" check "$T/ctl" b0 "$T/log" "$T/before.img" "$T/disk.img") ||
    fail "round $round (seed $seed, kill after ${delay}s): $res"
  ckpts=$(jq .checkpoints <<<"$last_info")
  log "round $round: kill after ${delay}s, $ckpts checkpoints: $(cat "$T/cw.out"); $res"
  read -r o d w < <(jq -r '"\(.over_reported_bytes) \(.dirty_bytes) \(.touched_bytes)"' <<<"$res")
  total_over=$((total_over + o)); total_dirty=$((total_dirty + d))
  # exact after a process crash: dirty <= 1.25 x written (d*4 <= w*5)
  if [ "$MODE" = kill9 ] && [ $((d * 4)) -gt $((w * 5)) ]; then
    fail "round $round: $d bytes dirty after kill -9 for $w bytes written (> 1.25x)"
  fi
done
log "$MODE: $ROUNDS rounds OK; over-reported $total_over of $total_dirty dirty bytes" \
    "($((total_dirty ? total_over * 100 / total_dirty : 0))%)"
[ "$MODE" = powerloss ] && log "powerloss: the journal on disk differed from its synced mirror in $unsynced_rounds/$ROUNDS rounds"
exit 0
