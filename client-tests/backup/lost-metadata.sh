#!/bin/bash
# cbw — client-tests/backup/lost-metadata.sh: lost or broken metadata is a
# clear error naming the file, never a silent empty start, and an
# interrupted operation that cannot be finished never wedges cbwd.
#  1. cbwd dies inside `checkpoint create` (CBW_ORCH_CRASH_AT), then disk
#     vda's nbdkit dies and its bitmap descriptor is lost: `disk start vda`
#     fails naming the descriptor; the interrupted operation is recorded as
#     failed at the next checkpoint command (no lasting `Busy`), vda's
#     checkpoints become unusable (status, checkpoint list, event), and disk
#     vdb keeps working (incremental backups, checkpoint create/delete).
#  2. `cbw disk repair vda --reset-bitmaps` brings vda back with every
#     checkpoint bitmap all dirty; an incremental since an unusable
#     checkpoint is refused ("take a full backup"); after a full backup with
#     a new checkpoint, incrementals of vda work again.
#  3. cbwd dies inside `backup begin --checkpoint` and vdb's nbdkit dies: the
#     next backup of vda records the failed recovery (vdb's checkpoints
#     unusable), leaves no backup files, and works; vdb is removed with its
#     mark.
# (The state file itself: lost-state.sh.)
. "$(dirname "$0")/lib.sh"
need_modules
requires jq
requires qemu-io

SIZE=$((8 << 20))
truncate -s $SIZE "$T/a.img" "$T/b.img"

start_orchd
expect_rc 0 "$CBW" disk add vda --file "$T/a.img"
expect_rc 0 "$CBW" disk add vdb --file "$T/b.img"
expect_rc 0 "$CBW" checkpoint create c0
for d in vda vdb; do
  timeout 20 qemu-io -f raw -c "write -P 7 1M 64k" "$(disk_uri $d)" >/dev/null || fail "write $d"
done
stop_orchd

crash_at() {                      # crash_at POINT CMD...: cbwd-orch dies at POINT in CMD
  local point=$1 rc=0; shift
  start_orchd CBW_ORCH_CRASH_AT="$point"
  "$@" >/dev/null 2>&1 || true
  for _ in $(seq 100); do alive_pid "$ORCHD_PID" || break; sleep 0.1; done
  wait "$ORCHD_PID" || rc=$?
  [ "$rc" = 99 ] || fail "$point: the daemon did not stop at the crash point (exit $rc)"
  ORCHD_PID=
}

# -- 1. interrupted checkpoint-create, then vda loses its nbdkit and bitmaps
crash_at rotate:added "$CBW" checkpoint create k1
vda_pid=$(jq -r '.body.disks[] | select(.name == "vda") | .pid' "$STATE/cbwd-state.json")
[ "$vda_pid" -gt 0 ] || fail "no pid of vda's nbdkit in the state file"
kill -9 "$vda_pid"
for _ in $(seq 100); do alive_pid "$vda_pid" || break; sleep 0.1; done
DESC=$STATE/disks/vda/bitmaps.json
[ -f "$DESC" ] || fail "$DESC does not exist"
rm -f "$DESC"

start_orchd
expect_rc 0 "$CBW" --json status
jq -e '.pending == "checkpoint-create"' "$T/out" >/dev/null ||
  fail "the interrupted operation is not pending: $(cat "$T/out")"
expect_rc 1 "$CBW" disk start vda
case $ERR in
  *"$DESC"*missing*) log "disk start refused: $ERR" ;;
  *) cat "$STATE/disks/vda/nbdkit.log" >&2
     fail "disk start vda: the error does not name the missing descriptor: $ERR" ;;
esac
[ ! -e "$DESC" ] || fail "a failed start created $DESC"

# The next checkpoint command finishes what it can and records the rest.
expect_rc 0 "$CBW" checkpoint create k2 --disk vdb
expect_rc 0 "$CBW" --json status
jq -e '.pending == null and .["needs-full-backup"] == ["vda"]' "$T/out" >/dev/null ||
  fail "after the failed recovery: $(cat "$T/out")"
expect_rc 0 "$CBW" --json event list
jq -e '[.events[] | select(.event == "recovery-failed") | .data] |
       length == 1 and .[0].op == "checkpoint-create" and .[0].name == "k1" and
       .[0]["unusable-on"] == ["vda"] and (.[0].message | test("next backup of vda must be full"))' \
  "$T/out" >/dev/null || fail "no recovery-failed event: $(cat "$T/out")"
expect_rc 0 "$CBW" --json checkpoint list
jq -e '[.checkpoints[].name] == ["c0", "k2"] and
       (.checkpoints[0].unusable | length == 1 and .[0].disk == "vda")' "$T/out" >/dev/null ||
  fail "checkpoints after the failed recovery: $(cat "$T/out")"
# vdb is consistent again (the rollback worked there) and keeps working.
got=$(ctl "$(bm_ctl vdb)" '{"execute":"list"}' |
      jq -r '[.return.bitmaps[] | .name + (if .enabled then "+" else "" end)] | join(" ")')
[ "$got" = "cp-c0 cp-k2+" ] || fail "vdb bitmaps: [$got], expected [cp-c0 cp-k2+]"
expect_rc 0 "$CBW" backup begin --disk vdb --incremental c0
expect_rc 0 "$CBW" backup end
expect_rc 0 "$CBW" checkpoint delete k2
expect_rc 1 "$CBW" backup begin --disk vda
log "failed recovery recorded, vdb unaffected"

# -- 2. explicit repair
expect_rc 1 "$CBW" disk repair vda
case $ERR in *reset-bitmaps*) ;; *) fail "repair without --reset-bitmaps: $ERR" ;; esac
expect_rc 0 "$CBW" disk repair vda --reset-bitmaps
case $(cat "$T/out") in *"next backup of vda must be full"*) ;;
  *) fail "repair said: $(cat "$T/out")" ;; esac
expect_rc 0 "$CBW" disk start vda
expect_rc 1 "$CBW" disk repair vda --reset-bitmaps
case $ERR in *"is running"*) ;; *) fail "repair of a running disk: $ERR" ;; esac
got=$(ctl "$(bm_ctl vda)" '{"execute":"list"}' |
      jq -r '[.return.bitmaps[] | .name + (if .enabled then "+" else "" end)] | join(" ")')
[ "$got" = "cp-c0+" ] || fail "vda bitmaps after repair: [$got], expected [cp-c0+]"
dirty=$("$BK" extents "$(bm_ctl vda)" cp-c0 $SIZE | awk '{ s += $2 } END { print s + 0 }')
[ "$dirty" = $SIZE ] || fail "vda cp-c0 after repair: $dirty dirty bytes, expected all $SIZE"
expect_rc 1 "$CBW" backup begin --disk vda --incremental c0
case $ERR in
  *"checkpoint c0 of disk vda is unusable since"*"take a full backup"*) ;;
  *) fail "incremental since an unusable checkpoint: $ERR" ;;
esac
expect_rc 0 "$CBW" checkpoint list
grep -q "unusable on vda" "$T/out" || fail "checkpoint list does not say unusable: $(cat "$T/out")"
expect_rc 0 "$CBW" backup begin --checkpoint c1
expect_rc 0 "$CBW" backup end
timeout 20 qemu-io -f raw -c "write -P 9 3M 64k" "$(disk_uri vda)" >/dev/null || fail "write vda"
expect_rc 0 "$CBW" backup begin --incremental c1
dirty=$("$BK" extents "$(bm_ctl vda)" backup-vda $SIZE | awk '{ s += $2 } END { print s + 0 }')
[ "$dirty" -ge 65536 ] && [ "$dirty" -lt $SIZE ] ||
  fail "incremental of vda since c1: $dirty dirty bytes"
expect_rc 0 "$CBW" backup end
expect_rc 0 "$CBW" --json status
jq -e '.["needs-full-backup"] == []' "$T/out" >/dev/null || fail "status: $(cat "$T/out")"
log "repair: all dirty, unusable checkpoints refused, incrementals again after a full"

# -- 3. an interrupted backup-begin (with a checkpoint) whose disk vdb died
stop_orchd
crash_at backup-begin:begun "$CBW" backup begin --incremental c1 --checkpoint b1
vdb_pid=$(jq -r '.body.disks[] | select(.name == "vdb") | .pid' "$STATE/cbwd-state.json")
kill -9 "$vdb_pid"
for _ in $(seq 100); do alive_pid "$vdb_pid" || break; sleep 0.1; done
start_orchd
expect_rc 0 "$CBW" backup begin --disk vda --incremental c1
expect_rc 0 "$CBW" backup end
expect_rc 0 "$CBW" --json event list
jq -e '[.events[] | select(.event == "recovery-failed") | .data] |
       length == 1 and .[0].op == "backup-begin" and .[0]["unusable-on"] == ["vdb"]' \
  "$T/out" >/dev/null || fail "no recovery-failed event for the backup: $(cat "$T/out")"
expect_rc 0 "$CBW" --json checkpoint list
jq -e '[.checkpoints[].name] == ["c0", "c1"] and
       ([.checkpoints[1].unusable[].disk] == ["vdb"])' "$T/out" >/dev/null ||
  fail "checkpoints after the failed backup recovery: $(cat "$T/out")"
[ -z "$(ls -A "$STATE/backups" 2>/dev/null)" ] || fail "backup files left: $(ls -R "$STATE/backups")"
got=$(ctl "$(bm_ctl vda)" '{"execute":"list"}' |
      jq -r '[.return.bitmaps[] | .name + (if .enabled then "+" else "" end)] | join(" ")')
[ "$got" = "cp-c0 cp-c1+" ] || fail "vda bitmaps: [$got], expected [cp-c0 cp-c1+]"
expect_rc 0 "$CBW" disk start vdb
expect_rc 1 "$CBW" backup begin --disk vdb --incremental c1
expect_rc 0 "$CBW" disk remove vdb
expect_rc 0 "$CBW" --json status
jq -e '.pending == null and .backup == null and .["needs-full-backup"] == []' "$T/out" \
  >/dev/null || fail "status at the end: $(cat "$T/out")"
log "failed backup recovery recorded, vda unaffected, vdb removed with the mark"

stop_orchd
log "OK"
