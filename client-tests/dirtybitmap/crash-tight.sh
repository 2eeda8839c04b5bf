#!/bin/bash
# cbw — client-tests/dirtybitmap/crash-tight.sh: how much a crash costs the
# next incremental.  A guest doing random writes (dbm-crashwriter's "large"
# profile: writes of 512 B..1 MiB anywhere on a sparse disk, 8 in flight) on
# the filter with its defaults (64 MiB journal regions, 30 s checkpoints),
# nbdkit killed with SIGKILL after 0.3..MAX s, restart, and the bitmap is
# compared with the requests the writer logged before sending them (in-flight
# ones included): every acknowledged request must be dirty (never an
# under-report), and after kill -9 dirty must stay <= 1.25x the granules
# written (the live-bitmap map makes it exact; the journal alone marked whole
# regions, i.e. the whole disk).
# Knobs (the CI defaults are small; docs/design/dirty-bitmaps.md has a run
# with the issue's figures: 64G, 5 rounds, 2500 ms):
#   CBW_DBM_TIGHT_SIZE=8G     disk size (sparse)
#   CBW_DBM_ROUNDS=3          rounds
#   CBW_DBM_TIGHT_MAX_MS=1200 longest write phase before the kill
#   CBW_DBM_TIGHT_MODE=kill9  or powerloss: the power-loss simulation of
#       crash-common.sh (only what was fsynced survives, another boot id);
#       then the factor is reported, not bounded (the journal's regions).
#   CBW_DBM_TIGHT_REGION=64M  journal region size (the power-loss trade-off:
#       journal fdatasyncs, reported per round, vs over-report)
# The disk lives in TMPDIR (default /tmp: on disk, not in RAM, since a round
# writes up to a few GB).
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/sanitize-guard.sh"
requires jq
CW=$CBW_BUILD/client-tests/dirtybitmap/dbm-crashwriter
TOOL=$CBW_BUILD/client-tests/dirtybitmap/dbm-tool
[ -x "$CW" ] && [ -x "$TOOL" ] || fail "dbm-crashwriter / dbm-tool not built"
[ -f "$DIRTYBITMAP_FILTER" ] || fail "$DIRTYBITMAP_FILTER not built"
SIZE=${CBW_DBM_TIGHT_SIZE:-8G}
ROUNDS=${CBW_DBM_ROUNDS:-3}
MAX_MS=${CBW_DBM_TIGHT_MAX_MS:-1200}
MODE=${CBW_DBM_TIGHT_MODE:-kill9}
GRAN=65536

mkdir -p "$T/bm" "$T/pl"
truncate -s "$SIZE" "$T/disk.img"
ARGS=(--filter="$DIRTYBITMAP_FILTER" file "$T/disk.img"
      dirtybitmap-image="$T/disk.img" dirtybitmap="$T/bm/d.json"
      dirtybitmap-control="$T/ctl" dirtybitmap-region-size="${CBW_DBM_TIGHT_REGION:-64M}"
      dirtybitmap-create=true)
if [ "$MODE" = powerloss ]; then export CBW_TEST_POWERLOSS_DIR=$T/pl; fi

wait_ctl() { "$TOOL" wait "$T/ctl" || fail "control socket did not answer"; }
ok() { "$TOOL" ctl "$T/ctl" "$@" >/dev/null || fail "control $* failed"; }

start_nbdkit "$T/s" "${ARGS[@]}"; wait_ctl
ok add "{\"name\":\"b0\",\"granularity\":$GRAN}"

worst=0
for round in $(seq "$ROUNDS"); do
  ok clear '{"name":"b0"}'
  seed=$((RANDOM * 32768 + RANDOM))
  ms=$((300 + seed % (MAX_MS > 300 ? MAX_MS - 300 : 1)))
  rm -f "$T/log"
  DBM_CW_PROFILE=large start_bg "$CW" "nbd+unix:///?socket=$T/s" "$T/log" "$seed" 60 > "$T/cw.out"
  CW_PID=$BG_PID
  for _ in $(seq 200); do [ -s "$T/log" ] && break; sleep 0.05; done
  [ -s "$T/log" ] || fail "round $round: crashwriter sent nothing: $(cat "$T/cw.out")"
  sleep "$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))"
  jw=$("$TOOL" ctl "$T/ctl" info 2>/dev/null | jq -r '."journal-writes"' || echo '?')
  kill9 "$NBDKIT_PID"
  wait "$CW_PID" || fail "round $round: crashwriter failed: $(cat "$T/cw.out")"

  if [ "$MODE" = powerloss ]; then
    [ -L "$T/pl/store.cur" ] && [ -f "$T/pl/journal" ] || fail "round $round: no power-loss mirror"
    mv "$T/bm/d.json.livemap" "$T/livemap" 2>/dev/null || true
    rm -f "$T/bm"/*
    cp "$T/pl/store.cur"/* "$T/bm/"
    cp "$T/pl/journal" "$T/bm/d.json.journal"
    mv "$T/livemap" "$T/bm/d.json.livemap" 2>/dev/null || true
    export CBW_TEST_BOOT_ID="tight-test-boot-$round"
    want_rec=journal
  else
    want_rec=map
  fi
  start_nbdkit "$T/s" "${ARGS[@]}"; wait_ctl
  assert_eq "round $round recovery" "$want_rec" "$("$TOOL" ctl "$T/ctl" info | jq -r .recovery)"
  res=$("$TOOL" check "$T/ctl" b0 "$T/log" - -) ||
    fail "round $round (seed $seed, kill after $ms ms): $res"
  read -r d w < <(jq -r '"\(.dirty_bytes) \(.touched_bytes)"' <<<"$res")
  [ "$w" -gt 0 ] || fail "round $round: nothing written"
  factor=$(awk -v d="$d" -v w="$w" 'BEGIN { printf "%.2f", d / w }')
  log "round $round: $MODE after $ms ms: $(cat "$T/cw.out"); written $w bytes" \
      "(granules of sent requests), dirty $d: factor $factor; journal writes before the kill: $jw"
  worst=$(awk -v a="$worst" -v b="$factor" 'BEGIN { print (b > a ? b : a) }')
  if [ "$MODE" = kill9 ] && [ $((d * 4)) -gt $((w * 5)) ]; then
    fail "round $round: $d bytes dirty after kill -9 for $w bytes written (factor $factor > 1.25)"
  fi
done
log "$MODE, $SIZE disk, $ROUNDS rounds: worst factor dirty/written $worst"
exit 0
