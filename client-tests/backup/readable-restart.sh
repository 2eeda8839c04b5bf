#!/bin/bash
# cbw — client-tests/backup/readable-restart.sh: an incremental backup's
# readable set survives a restart of the orchestrator.  `backup begin
# --incremental c0` (default: readable all), cbwd-orch stopped and started
# again: `backup status` still says all, and the point-in-time export (the
# cbw filter's, in the disk's nbdkit that kept running) is still readable
# whole while the guest writes after the restart: nbdcopy equals the exact
# copy of the disk taken at the point in time.  Then the same with
# --readable changed: status says changed after the restart, and an
# unchanged block still fails.  A state file that lost "readable" would load
# an incremental as changed (the older behaviour): the first check catches it.
. "$(dirname "$0")/lib.sh"
need_modules
requires qemu-io
requires nbdcopy
requires jq

SIZE=$((8 << 20))
head -c $SIZE /dev/urandom > "$T/a.img"
start_orchd
expect_rc 0 "$CBW" disk add vda --file "$T/a.img" --granularity 65536
expect_rc 0 "$CBW" checkpoint create c0
qemu-io -f raw -c "write -P 0x11 1M 64k" "$(disk_uri vda)" >/dev/null || fail "guest write"

for readable in all changed; do
  log "section: readable $readable"
  sync
  cp "$T/a.img" "$T/pit.img"                       # the disk at the point in time
  if [ $readable = all ]; then
    expect_rc 0 "$CBW" backup begin --incremental c0      # the default
  else
    expect_rc 0 "$CBW" backup begin --incremental c0 --readable $readable
  fi
  stop_orchd
  start_orchd
  got=$("$CBW" --json backup status | jq -r .readable)
  [ "$got" = $readable ] || fail "after a restart: readable $got, begun with $readable"
  # guest writes after the restart: a changed block and an unchanged one
  # (all: 1M holds 0x11 at the point in time, 4M is unchanged; changed: 1M
  # holds 0x22 from the first round, 6M was never written)
  if [ $readable = all ]; then unchanged=4; else unchanged=6; fi
  qemu-io -f raw -c "write -P 0x22 1M 64k" -c "write -P 0x33 ${unchanged}M 128k" \
    "$(disk_uri vda)" >/dev/null || fail "guest writes after the restart"
  if [ $readable = all ]; then
    nbdcopy "$(pit_uri vda)" "$T/copy.img" || fail "nbdcopy of the PIT export after a restart"
    cmp "$T/pit.img" "$T/copy.img" || fail "after a restart: the copy differs from the disk at its point in time"
    cmp -s "$T/pit.img" "$T/a.img" && fail "the guest writes did not change the disk: test not testing"
  else
    qemu-io -r -f raw -c "read -P 0x22 1M 64k" "$(pit_uri vda)" > "$T/qio" 2>&1 &&
      ! grep -q 'verification failed' "$T/qio" || fail "changed block after a restart: $(cat "$T/qio")"
    "$BK" readat "$(pit_uri vda)" $((6 << 20)) 4096 2>/dev/null &&
      fail "readable changed, after a restart: an unchanged block was served"
  fi
  expect_rc 0 "$CBW" backup end
done
expect_rc 0 "$CBW" disk remove vda
log PASS
