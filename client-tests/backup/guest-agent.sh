#!/bin/bash
# cbw — client-tests/backup/guest-agent.sh: guest freeze through the
# qemu-guest-agent protocol (backup begin --freeze-qga SOCKET), against a
# stand-in agent (fake_qga.py) whose freeze writes to the disk first, as a
# real guest's fsfreeze flushes its file systems.
#  - ok: guest-sync (a stale reply is skipped), freeze, thaw, in that order;
#    the flush write made while freezing is IN the backup (the freeze comes
#    before the point in time) and did not wait for the quiesce timeout
#    (the freeze runs before the disks are quiesced);
#  - the agent answers an error: --freeze-required fails naming the agent's
#    message, and nothing is left; without it the backup is crash-consistent
#    with a freeze-failed event;
#  - a mute agent: --freeze-timeout bounds the wait, guest writes go on;
#  - no agent at that socket; hook and agent together: clear errors.
. "$(dirname "$0")/lib.sh"
need_modules
requires qemu-io
requires jq
PY=/usr/bin/python3
SIZE=$((16 << 20))
truncate -s $SIZE "$T/a.img"
start_orchd
expect_rc 0 "$CBW" disk add vda --file "$T/a.img"
QGA=$T/qga.sock
echo ok > "$T/mode"
start_bg $PY "$(dirname "$0")/fake_qga.py" "$QGA" "$T/mode" "$T/qga.log" "$(disk_uri vda)"
wait_socket "$QGA" 20

log "section: agent freezes and thaws"
t0=$(date +%s)
expect_rc 0 "$CBW" backup begin --freeze-qga "$QGA" --checkpoint q1
t1=$(date +%s)
cmds=$(grep -v '^flush' "$T/qga.log" | tr '\n' ' ')
[ "$cmds" = "guest-sync guest-fsfreeze-freeze guest-sync guest-fsfreeze-thaw " ] ||
  fail "agent saw: $cmds"
grep -q '^flush rc=0' "$T/qga.log" || fail "the guest's flush write during freeze failed: $(cat "$T/qga.log")"
[ $((t1 - t0)) -lt 8 ] || fail "backup begin with a freeze took $((t1 - t0)) s (flush held by a quiesce?)"
qemu-io -r -f raw -c "read -P 9 0 64k" "$(pit_uri vda)" >/dev/null ||
  fail "the write made while the guest froze is not in the backup"
"$CBW" --json event list | jq -e '.events[] | select(.event == "freeze-failed")' >/dev/null &&
  fail "freeze-failed event although the agent froze"
expect_rc 0 "$CBW" backup end

log "section: agent answers an error"
echo error > "$T/mode"
expect_rc 1 "$CBW" backup begin --freeze-qga "$QGA" --freeze-required
grep -q "failed at step freeze" <<<"$ERR" && grep -q "fsfreeze is disabled" <<<"$ERR" ||
  fail "agent error, required: $ERR"
expect_rc 0 "$CBW" --json status
jq -e '.backup == null' "$T/out" >/dev/null || fail "failed begin left a backup"
expect_rc 0 "$CBW" backup begin --freeze-qga "$QGA"
"$CBW" --json event list | jq -e '.events[] | select(.event == "freeze-failed") | select(.data.error // .error | tostring | test("fsfreeze is disabled"))' >/dev/null ||
  "$CBW" --json event list | grep -q "fsfreeze is disabled" || fail "no freeze-failed event naming the agent's error"
expect_rc 0 "$CBW" backup end

log "section: mute agent"
echo mute > "$T/mode"
t0=$(date +%s)
expect_rc 0 "$CBW" backup begin --freeze-qga "$QGA" --freeze-timeout 1
t1=$(date +%s)
[ $((t1 - t0)) -lt 8 ] || fail "a mute agent held backup begin for $((t1 - t0)) s"
timeout 10 qemu-io -f raw -c "write -P 5 1M 64k" "$(disk_uri vda)" >/dev/null ||
  fail "guest writes held after a mute agent"
expect_rc 0 "$CBW" backup end

log "section: bad requests"
expect_rc 1 "$CBW" backup begin --freeze-qga "$T/nothing.sock" --freeze-required
grep -q "nothing.sock" <<<"$ERR" || fail "missing agent socket: $ERR"
expect_rc 1 "$CBW" backup begin --freeze-qga "$QGA" --freeze-hook /bin/true
grep -q "exclusive" <<<"$ERR" || fail "hook + agent: $ERR"
expect_rc 0 "$CBW" --json status
jq -e '.backup == null' "$T/out" >/dev/null || fail "a refused begin left a backup"
log "guest agent freeze ok"
