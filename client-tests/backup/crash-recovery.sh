#!/bin/bash
# cbw — client-tests/backup/crash-recovery.sh: cbwd-orch dies (exit at a
# chosen step through the CBW_ORCH_CRASH_AT test hook: no cleanup, like
# kill -9) inside checkpoint create/delete and backup begin/end; after a
# restart the state must be consistent and the next incremental correct:
#  - no pending operation, no half backup (an interrupted begin is rolled
#    back, an interrupted end finished), no leftover store process or file;
#  - on every disk the cp-* bitmaps are exactly those of the checkpoints
#    that cover it, only the latest enabled; no backup-* bitmap; no session;
#  - an incremental since the base checkpoint c0 contains every granule the
#    test wrote since c0 (its own log is the model; more is allowed, less
#    never: invariant 2);
#  - guest writes go through after recovery.
# By default one crash point per operation step kind (CI budget); with
# CBW_SOAK=1 every crash point, 5 rounds.
. "$(dirname "$0")/lib.sh"
need_modules
requires qemu-io
requires jq

G=65536
SIZE=$((8 << 20))
truncate -s $SIZE "$T/a.img" "$T/b.img"
start_orchd
expect_rc 0 "$CBW" disk add vda --file "$T/a.img"
expect_rc 0 "$CBW" disk add vdb --file "$T/b.img"
expect_rc 0 "$CBW" checkpoint create c0
stop_orchd

RANDOM=777
: > "$T/log"
writes() {                         # writes DISK: 4 random writes, logged as granules
  local cmds=() i off len
  for i in 1 2 3 4; do
    off=$(( (RANDOM * 32768 + RANDOM) % (SIZE - 100000) )); len=$(( RANDOM % 90000 + 1 ))
    cmds+=(-c "write -P $((RANDOM % 200 + 1)) $off $len")
    echo "$1 $((off / G)) $(((off + len - 1) / G))" >> "$T/log"
  done
  timeout 20 qemu-io -f raw "${cmds[@]}" "$(disk_uri "$1")" >/dev/null || fail "writes on $1"
}
expected() { awk -v d="$1" '$1 == d { for (g = $2; g <= $3; g++) print g }' "$T/log" | sort -n -u; }
actual() {
  "$BK" extents "$(bm_ctl "$1")" "backup-$1" $SIZE |
    awk -v G=$G '{ for (g = int($1 / G); g < ($1 + $2) / G; g++) print g }' | sort -n -u
}

check_consistent() {              # check_consistent LABEL
  local d want got
  expect_rc 0 "$CBW" --json status
  jq -e '.pending == null and .backup == null' "$T/out" >/dev/null ||
    fail "$1: not recovered: $(cat "$T/out")"
  for d in vda vdb; do
    want=$("$CBW" --json checkpoint list --disk $d | jq -r '[.checkpoints[].name | "cp-" + .] | join(" ")')
    got=$(ctl "$(bm_ctl $d)" '{"execute":"list"}' | jq -r '[.return.bitmaps[].name] | join(" ")')
    [ "$want" = "$got" ] || fail "$1: $d bitmaps [$got], checkpoints say [$want]"
    want=$("$CBW" --json checkpoint list --disk $d | jq -r '.checkpoints[-1].name | "cp-" + .')
    got=$(ctl "$(bm_ctl $d)" '{"execute":"list"}' | jq -r '[.return.bitmaps[] | select(.enabled) | .name] | join(" ")')
    [ "$want" = "$got" ] || fail "$1: $d enabled bitmaps [$got], expected [$want]"
    ctl "$(cbw_ctl $d)" '{"execute":"status"}' | jq -e '.return.state == "idle"' >/dev/null ||
      fail "$1: a copy-before-write session survived on $d"
  done
  [ -z "$(ls -A "$STATE/backups" 2>/dev/null)" ] || fail "$1: backup files left: $(ls -R "$STATE/backups")"
  [ -z "$(grep -lF -- "$STATE/backups/" /proc/[0-9]*/cmdline 2>/dev/null)" ] ||
    fail "$1: a backup store process survived"
  # The next incremental since c0 has every granule written since c0.
  writes vda; writes vdb
  expect_rc 0 "$CBW" backup begin --incremental c0
  for d in vda vdb; do
    missing=$(comm -23 <(expected $d) <(actual $d))
    [ -z "$missing" ] || fail "$1: $d: incremental since c0 lost granules: $missing"
  done
  expect_rc 0 "$CBW" backup end
}

crash() {                         # crash POINT CMD...: run CMD on a daemon that dies at POINT
  local point=$1; shift
  start_orchd CBW_ORCH_CRASH_AT="$point"
  "$@" >/dev/null 2>&1 || true
  local rc=0
  for _ in $(seq 100); do alive_pid "$ORCHD_PID" || break; sleep 0.1; done
  wait "$ORCHD_PID" || rc=$?
  [ "$rc" = 99 ] || fail "$point: the daemon did not stop at the crash point (exit $rc)"
  start_orchd
}

rounds=1
CP_POINTS="rotate:added"
BEGIN_POINTS="backup-begin:begun"
if [ "${CBW_SOAK:-0}" = 1 ]; then
  rounds=5
  CP_POINTS="checkpoint-create:recorded checkpoint-create:quiesced rotate:added
             checkpoint-create:rotated checkpoint-create:resumed"
  BEGIN_POINTS="backup-begin:recorded backup-begin:begun backup-begin:resumed"
fi
n=0
start_orchd; writes vda; writes vdb; stop_orchd
for r in $(seq $rounds); do
  for point in $CP_POINTS; do
    n=$((n + 1))
    crash "$point" "$CBW" checkpoint create "k$n"
    check_consistent "$point"; stop_orchd
  done
  n=$((n + 1))
  start_orchd; expect_rc 0 "$CBW" checkpoint create "d$n"; writes vda; stop_orchd
  crash checkpoint-delete:merged "$CBW" checkpoint delete "d$n"
  "$CBW" --json checkpoint list | jq -e "[.checkpoints[].name] | index(\"d$n\") == null" >/dev/null ||
    fail "interrupted delete of d$n not finished"
  check_consistent checkpoint-delete:merged; stop_orchd
  for point in $BEGIN_POINTS; do
    n=$((n + 1))
    crash "$point" "$CBW" backup begin --incremental c0 --checkpoint "b$n"
    check_consistent "$point"; stop_orchd
  done
  start_orchd; expect_rc 0 "$CBW" backup begin --checkpoint "e$n"; stop_orchd
  crash backup-end:recorded "$CBW" backup end
  check_consistent backup-end:recorded; stop_orchd
  log "round $r done"
done
log "OK"
