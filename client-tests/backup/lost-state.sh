#!/bin/bash
# cbw — client-tests/backup/lost-state.sh: cbwd never starts with an empty
# state over a state directory it used before.
#  - cbwd-state.json removed while the disks' nbdkits run: cbwd-orch refuses
#    to start, naming the file, the disk directories and the running nbdkits
#    (which keep serving); it writes no new state file;
#  - the same once those nbdkits are gone (the disk directories are clue
#    enough);
#  - a truncated state file is refused naming it;
#  - the restored file brings everything back (disks adopted, running);
#  - a new, empty state directory still starts empty.
. "$(dirname "$0")/lib.sh"
need_modules
requires jq

truncate -s 4M "$T/a.img" "$T/b.img"
start_orchd
expect_rc 0 "$CBW" disk add vda --file "$T/a.img"
expect_rc 0 "$CBW" disk add vdb --file "$T/b.img"
expect_rc 0 "$CBW" checkpoint create c0
vda_pid=$(jq -r '.body.disks[] | select(.name == "vda") | .pid' "$STATE/cbwd-state.json")
vdb_pid=$(jq -r '.body.disks[] | select(.name == "vdb") | .pid' "$STATE/cbwd-state.json")
stop_orchd

orchd_must_fail() {               # orchd_must_fail WHAT: cbwd-orch must refuse to start
  local rc=0
  timeout 20 env CBW_NBDKIT="${NBDKIT[*]}" "$ORCHD" --state-dir "$STATE" \
    --module-dir "$CBW_MODULES" --plugin "$PLUGIN" >"$T/orchd.out" 2>&1 || rc=$?
  [ "$rc" != 0 ] && [ "$rc" != 124 ] || fail "$1: cbwd-orch exited $rc: $(cat "$T/orchd.out")"
  ERR=$(cat "$T/orchd.out")
  [ ! -e "$STATE/cbwd-state.json" ] || [ "$1" = truncated ] ||
    fail "$1: a refused start wrote a state file"
}

mv "$STATE/cbwd-state.json" "$T/state.saved"
orchd_must_fail "missing state file, nbdkits running"
case $ERR in
  *"$STATE/cbwd-state.json: missing"*"LOST METADATA"*"disks/vd"*"pid "*"$vda_pid"*)
    log "refused: $ERR" ;;
  *) fail "missing state file: unclear error: $ERR" ;;
esac
alive_pid "$vda_pid" && alive_pid "$vdb_pid" || fail "the disks' nbdkits did not survive"

head -c 100 "$T/state.saved" > "$STATE/cbwd-state.json"
orchd_must_fail truncated
case $ERR in *"$STATE/cbwd-state.json"*JSON*) ;; *) fail "truncated state file: $ERR" ;; esac

cp "$T/state.saved" "$STATE/cbwd-state.json"
start_orchd
expect_rc 0 "$CBW" --json disk list
jq -e '[.disks[] | select(.state == "running") | .name] == ["vda", "vdb"]' "$T/out" >/dev/null ||
  fail "restored state: $(cat "$T/out")"
expect_rc 0 "$CBW" --json checkpoint list
jq -e '[.checkpoints[].name] == ["c0"]' "$T/out" >/dev/null || fail "checkpoints: $(cat "$T/out")"
expect_rc 0 "$CBW" disk stop vda
expect_rc 0 "$CBW" disk stop vdb
stop_orchd

# No nbdkit left: the disk directories alone show the state was lost.
mv "$STATE/cbwd-state.json" "$T/state.saved"
orchd_must_fail "missing state file, disks stopped"
case $ERR in
  *"$STATE/cbwd-state.json: missing"*"disks/vd"*) ;;
  *) fail "missing state file (disks stopped): unclear error: $ERR" ;;
esac

# A new, empty state directory starts empty.
STATE=$T/fresh; CBW_SOCKET=$STATE/control.sock
start_orchd
expect_rc 0 "$CBW" -c "$CBW_SOCKET" --json status
jq -e '.disks == 0 and .checkpoints == 0' "$T/out" >/dev/null || fail "fresh: $(cat "$T/out")"
stop_orchd
log "OK"
