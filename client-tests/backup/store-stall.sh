#!/bin/bash
# cbw — client-tests/backup/store-stall.sh: a failing backup store never
# stalls the guest for long.
#
# The backup store is served over NBD by its own nbdkit (cbwd-orch with
# CBW_ORCH_STORE_TARGET=nbd).  While 4 guest connections write random 4 KiB
# blocks, the store's server is
#   - stopped (SIGSTOP): with the default bound (5 s, no option given), and
#   - killed (SIGKILL): with a per-backup bound (`backup begin --cbw-timeout`).
# Each time: no guest write fails and none waits longer than the bound + 1 s
# (the slowest write as the client saw it); the backup breaks, the event
# `backup-broken` names the disk and the reason and `backup status` says
# broken; the point-in-time export then returns the data of the point in
# time or an error for every 4 KiB block, never other data (the quarter of
# the disk the guest never wrote reads back whole).  Also: the
# per-disk bound (`disk add --cbw-timeout`) is saved, shown, given to the
# disk's nbdkit and used by its sessions; bad values are refused.
. "$(dirname "$0")/lib.sh"
need_modules
requires jq

SIZE=$((256 << 20))
head -c $SIZE /dev/urandom > "$T/a.img"
truncate -s $((16 << 20)) "$T/b.img"
start_orchd CBW_ORCH_STORE_TARGET=nbd

# ---- the bounds: defaults, per disk, per backup, bad values ----
expect_rc 0 "$CBW" --json disk add vda --file "$T/a.img"
jq -e '.["cbw-timeout-ms"] == 5000' "$T/out" >/dev/null || fail "default bound: $(cat "$T/out")"
expect_rc 0 "$CBW" --json disk add vdb --file "$T/b.img" --cbw-timeout 2.5
jq -e '.["cbw-timeout-ms"] == 2500' "$T/out" >/dev/null || fail "disk bound: $(cat "$T/out")"
nbdkit_args() { tr '\0' ' ' < "/proc/$("$CBW" --json disk list | jq -r ".disks[] | select(.name == \"$1\") | .pid")/cmdline"; }
[[ $(nbdkit_args vda) == *" cbw-timeout=5.000 "* ]] || fail "vda's nbdkit: $(nbdkit_args vda)"
[[ $(nbdkit_args vdb) == *" cbw-timeout=2.500 "* ]] || fail "vdb's nbdkit: $(nbdkit_args vdb)"
jq -e '.body.disks[] | select(.name == "vdb") | .["cbw-timeout-ms"] == 2500' \
  "$STATE/cbwd-state.json" >/dev/null || fail "per-disk bound not saved: $(cat "$STATE/cbwd-state.json")"
truncate -s 1M "$T/c.img"
for bad in 0 -1 x 86401; do
  expect_rc 2 "$CBW" disk add vdc --file "$T/c.img" --cbw-timeout "$bad"
done
for bad in 0 86400001; do
  r=$("$BK" ctl "$CBW_SOCKET" "{\"execute\":\"disk-add\",\"arguments\":{\"name\":\"vdc\",\"file\":\"$T/c.img\",\"cbw-timeout-ms\":$bad}}")
  [[ $r == *InvalidParameter* ]] || fail "disk-add cbw-timeout-ms=$bad: $r"
  r=$("$BK" ctl "$CBW_SOCKET" "{\"execute\":\"backup-begin\",\"arguments\":{\"cbw-timeout-ms\":$bad}}")
  [[ $r == *InvalidParameter* ]] || fail "backup-begin cbw-timeout-ms=$bad: $r"
done
expect_rc 0 "$CBW" --json backup begin
expect_rc 0 "$CBW" --json backup status
jq -e '[.disks[] | .session["timeout-ms"]] == [5000, 2500]' "$T/out" >/dev/null ||
  fail "sessions' bounds: $(cat "$T/out")"
expect_rc 0 "$CBW" backup end
expect_rc 0 "$CBW" disk remove vdb

# ---- a stalled or dead store under random guest writes ----
# stall FAULT BOUND_S [begin options]: one backup of vda, FAULT hits its
# store 1 s into 9 s of guest writes.
stall() {
  local fault=$1 bound=$2 r ms pid seq
  shift 2
  seq=$("$CBW" --json event list | jq '.last')
  cp --sparse=always "$T/a.img" "$T/ref.img"       # the point in time
  expect_rc 0 "$CBW" --json backup begin "$@"
  pid=$(jq -r '.disks[0]["store-pid"]' "$T/out")
  [ "$pid" -gt 0 ] && alive_pid "$pid" || fail "no store server: $(cat "$T/out")"
  # 3/4 of the disk are written (more old data than the filter's 64 MiB
  # write-back buffer holds: writes then wait for the store), the rest never
  start_bg "$BK" randwrite "$(disk_uri vda)" 9 4 4096 $((SIZE / 4 * 3)) >"$T/rw.out"
  local writer=$BG_PID
  sleep 1
  case $fault in
    stop) kill -STOP "$pid" ;;
    kill) kill -KILL "$pid" ;;
  esac
  log "$fault: store server $pid hit"
  wait "$writer" || fail "$fault: the guest writer failed: $(cat "$T/rw.out")"
  r=$(cat "$T/rw.out"); log "$fault: guest writes: $r (bound ${bound} s)"
  [[ $r =~ failed=0\  ]] || fail "$fault: guest writes failed: $r"
  [[ $r =~ writes=([0-9]+) ]] && [ "${BASH_REMATCH[1]}" -ge 100 ] || fail "$fault: too few writes: $r"
  ms=${r##*max_ms=}
  [ "$ms" -le $((bound * 1000 + 1000)) ] ||
    fail "$fault: a guest write waited $ms ms (bound $bound s + 1 s)"
  # the backup broke, and says why
  for _ in $(seq 50); do
    "$CBW" --json event list --since "$seq" >"$T/ev" || fail "event list"
    jq -e '.events[] | select(.event == "backup-broken")' "$T/ev" >/dev/null && break
    sleep 0.1
  done
  jq -e '[.events[] | select(.event == "backup-broken")] | length == 1 and
         (.[0].data.disk == "vda") and (.[0].data.error | length > 0)' "$T/ev" >/dev/null ||
    fail "$fault: no backup-broken event with a reason: $(cat "$T/ev")"
  log "$fault: $(jq -c '.events[] | select(.event == "backup-broken") | .data' "$T/ev")"
  expect_rc 0 "$CBW" --json backup status
  jq -e '.broken == true and .disks[0].session.state == "broken"' "$T/out" >/dev/null ||
    fail "$fault: backup status: $(cat "$T/out")"
  [ "$fault" = stop ] && kill -CONT "$pid"
  # the point in time: its data or an error, never newer data
  r=$("$BK" pitcheck "$(pit_uri vda)" "$T/ref.img" 4096) || fail "$fault: pitcheck"
  log "$fault: point-in-time export (4 KiB pieces): $r"
  [[ $r =~ differs=0$ ]] || fail "$fault: the point-in-time export returned wrong data: $r"
  [[ $r =~ eio=[1-9] ]] || fail "vacuous: the broken backup lost no block: $r"
  [[ $r =~ ok=([0-9]+) ]] && [ "${BASH_REMATCH[1]}" -ge $((SIZE / 4 / 4096)) ] ||
    fail "$fault: blocks never written are not all readable: $r"
  expect_rc 0 "$CBW" backup end
}

stall stop 5
stall kill 2 --cbw-timeout 2
log PASS
