#!/bin/bash
# cbw — client-tests/backup/disk-lifecycle.sh: disks served by supervised
# nbdkit processes.  A killed nbdkit is reported (disk-list "dead" + a
# disk-dead event), never restarted silently; cbwd-orch restarts (SIGTERM
# and kill -9) leave the guests' nbdkit running and adopt them; disk-start
# and disk-remove do what they say.
. "$(dirname "$0")/lib.sh"
need_modules noprobe            # this test never calls a module's control socket
requires qemu-io
requires jq

truncate -s 32M "$T/a.img" "$T/b.img"
start_orchd
expect_rc 0 "$CBW" disk add vda --file "$T/a.img"
expect_rc 0 "$CBW" disk add vdb --file "$T/b.img" --granularity 4096
expect_rc 1 "$CBW" disk add vda --file "$T/b.img"
grep -q "Exists" <<<"$ERR" || fail "duplicate name: $ERR"
expect_rc 1 "$CBW" disk add other --file "$T/a.img"
grep -q "already served as disk vda" <<<"$ERR" || fail "duplicate image: $ERR"

pid_of() { "$CBW" --json disk list | jq -r ".disks[] | select(.name==\"$1\") | .$2"; }
[ "$(pid_of vda state)" = running ] || fail "vda not running"
[ "$(pid_of vdb granularity)" = 4096 ] || fail "vdb granularity"
[ "$(pid_of vda size)" = $((32 << 20)) ] || fail "vda size"

qemu-io -f raw -c "write -P 0x5a 1M 64k" "$(disk_uri vda)" >/dev/null || fail "write vda"
cmp <(head -c $((1024 * 1024 + 65536)) "$T/a.img" | tail -c 65536) \
    <(head -c 65536 /dev/zero | tr '\0' '\132') || fail "write did not reach the image"

# kill -9 the nbdkit of vda: reported dead, not restarted.
PA=$(pid_of vda pid); PB=$(pid_of vdb pid)
kill -9 "$PA"
for _ in $(seq 50); do [ "$(pid_of vda state)" = dead ] && break; sleep 0.1; done
[ "$(pid_of vda state)" = dead ] || fail "killed nbdkit not reported dead"
"$CBW" --json event list | jq -e '.events[] | select(.event=="disk-dead" and .data.disk=="vda")' \
  >/dev/null || fail "no disk-dead event"
sleep 0.5
[ "$(pid_of vda state)" = dead ] || fail "dead disk restarted silently"
nbdinfo --size "$(disk_uri vda)" >/dev/null 2>&1 && fail "vda still answers"

# Operations on a set with a dead disk fail and change nothing.
expect_rc 1 "$CBW" checkpoint create c1
grep -q "not running" <<<"$ERR" || fail "checkpoint on dead disk: $ERR"
expect_rc 0 "$CBW" --json checkpoint list
jq -e '.checkpoints | length == 0' "$T/out" >/dev/null || fail "checkpoint recorded anyway"

# Restart of the daemon (SIGTERM): vdb keeps running and is adopted.
stop_orchd
alive_pid "$PB" || fail "vdb's nbdkit died with cbwd-orch"
start_orchd
[ "$(pid_of vdb state)" = running ] || fail "vdb not adopted"
[ "$(pid_of vdb pid)" = "$PB" ] || fail "vdb pid changed"
[ "$(pid_of vda state)" = dead ] || fail "vda should still be dead"

# disk start brings vda back with its data.
expect_rc 0 "$CBW" disk start vda
[ "$(pid_of vda state)" = running ] || fail "vda not running after start"
qemu-io -f raw -c "read -P 0x5a 1M 64k" "$(disk_uri vda)" >/dev/null || fail "vda data lost"
expect_rc 1 "$CBW" disk start vda
grep -q "already running" <<<"$ERR" || fail "double start: $ERR"

# kill -9 of the daemon: the disks survive and are adopted again.
PA=$(pid_of vda pid)
kill -9 "$ORCHD_PID"; wait "$ORCHD_PID" 2>/dev/null || true
alive_pid "$PA" && alive_pid "$PB" || fail "nbdkit died with a killed cbwd-orch"
qemu-io -f raw -c "write -P 0x77 0 4k" "$(disk_uri vdb)" >/dev/null || fail "guest I/O without cbwd"
start_orchd
[ "$(pid_of vda pid)" = "$PA" ] && [ "$(pid_of vdb pid)" = "$PB" ] || fail "not adopted after kill -9"

# disk remove: nbdkit stopped, directory gone, image kept.
expect_rc 0 "$CBW" disk remove vdb
for _ in $(seq 50); do alive_pid "$PB" || break; sleep 0.1; done
alive_pid "$PB" && fail "vdb's nbdkit still running after remove"
[ -d "$STATE/disks/vdb" ] && fail "vdb's state directory left behind"
[ -f "$T/b.img" ] || fail "image removed"
[ "$("$CBW" --json disk list | jq -r '[.disks[].name] | join(",")')" = vda ] || fail "list after remove"
log "OK"
