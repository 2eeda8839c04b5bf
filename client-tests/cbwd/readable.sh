#!/bin/bash
# cbw — client-tests/cbwd/readable.sh: what an incremental backup's
# point-in-time export serves, through cbwd and real clients.
#   --readable all (the default): while a guest writes (to changed AND
#     unchanged blocks), nbdcopy of the whole export equals the disk at the
#     point in time (an exact copy taken then); nbdinfo's map of
#     qemu:dirty-bitmap:backup-vda lists exactly the changed blocks;
#     base:allocation keeps the disk's holes.
#   --readable changed: the changed blocks read right (qemu-io pattern
#     check); reading an unchanged block (also one the guest overwrote since)
#     fails, never data, and the structured error reply says why (libnbd's
#     debug output carries the server's message); base:allocation reports
#     unreadable blocks as data, never as a hole (a copying reader would
#     write zeroes there); nbdcopy of the whole export fails.
# `cbw backup status --json` names the mode; a bad value is refused.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/lib.sh"
requires nbdcopy
requires nbdinfo
requires qemu-io
requires jq
CBW=$CBW_BUILD/server/cli/cbw
[ -x "$CBW" ] || skip "cbw CLI not built"
[ -f "$CBW_FILTER" ] && [ -f "$DIRTYBITMAP_FILTER" ] || skip "cbw/dirtybitmap filters not built"
[ -f "$CHAIN_PLUGIN" ] || skip "chain plugin not built (cbwd's orchestrator uses it)"

STATE=$T/state
mkdir -p "$STATE" "$T/run"; chmod 700 "$T/run"
export CBW_SOCKET=$STATE/control.sock XDG_RUNTIME_DIR=$T/run CBW_NBDKIT="${NBDKIT[*]}"
WRITER_PID=
_orch_exit() {
  local rc=$? f p
  [ -z "$WRITER_PID" ] || kill "$WRITER_PID" 2>/dev/null || true
  "$CBW" disk remove vda >/dev/null 2>&1 || true
  for f in $(grep -lF -- "$T/" /proc/[0-9]*/cmdline 2>/dev/null); do
    p=${f#/proc/}; p=${p%/cmdline}
    [ "$p" != $$ ] && kill "$p" 2>/dev/null || true
  done
  [ $rc != 0 ] && [ -f "$STATE/disks/vda/nbdkit.log" ] && tail -20 "$STATE/disks/vda/nbdkit.log" >&2
  _cbw_cleanup
}
trap _orch_exit EXIT

M=$((1024 * 1024)); G=65536
SIZE=$((24 * M))
# 16 MiB of data, then an 8 MiB hole (base:allocation must tell it apart).
head -c $((16 * M)) /dev/urandom > $T/a.img
truncate -s $SIZE $T/a.img
SOCK=$T/cbwd.sock
start_cbwd cbwd --state-dir "$STATE" --module-dir "$CBW_MODULES"
for _ in $(seq 100); do [ -S "$CBW_SOCKET" ] && break; sleep 0.1; done
"$CBW" disk add vda --file $T/a.img --granularity $G >/dev/null || fail "disk add"
LIVE="nbd+unix:///?socket=$STATE/disks/vda/nbd.sock"
"$CBW" checkpoint create c1 >/dev/null || fail "checkpoint create"

# guest_write OFF LEN BYTE: a guest write through the live disk.
guest_write() {
  qemu-io -f raw -c "write -P $3 $1 $2" "$LIVE" >/dev/null || fail "guest write at $1"
}
# The changes since c1: two granule-aligned ranges (bitmap = exactly these).
guest_write $((1 * M)) $((2 * G)) 0x11
guest_write $((5 * M)) $G 0x22
EXPECT_DIRTY="$((1 * M)) $((2 * G))
$((5 * M)) $G"

# dirty_map URI: the dirty ranges of qemu:dirty-bitmap:backup-vda, "OFF LEN".
dirty_map() {
  nbdinfo --json --map=qemu:dirty-bitmap:backup-vda "$1" |
    jq -r '.[] | select(.type == 1) | "\(.offset) \(.length)"'
}

# ---- readable all (default) ----
sync
cp --sparse=always $T/a.img $T/pit1.img          # the disk at the point in time
"$CBW" backup begin --incremental c1 > $T/begin.out || fail "backup begin: $(cat $T/begin.out)"
PIT=$(uri vda)
mode=$("$CBW" --json backup status | jq -r .readable)
[ "$mode" = all ] || fail "default readable: $mode (expected all)"
# Overwrite after the point in time: an unchanged block, a changed one, the hole.
guest_write $((9 * M)) $((3 * G)) 0x33
guest_write $((1 * M)) $G 0x44
guest_write $((20 * M)) $G 0x55
# ... and keep writing while nbdcopy reads.
( i=0; while :; do
    qemu-io -f raw -c "write -P 0x66 $(( (i * 7 % 380) * G )) $G" "$LIVE" >/dev/null 2>&1
    i=$((i + 1)); done ) &
WRITER_PID=$!
nbdcopy --connections=4 "$PIT" $T/copy1.img || fail "nbdcopy of an incremental (readable all)"
kill $WRITER_PID; wait $WRITER_PID 2>/dev/null || true; WRITER_PID=
cmp $T/pit1.img $T/copy1.img || fail "readable all: the copy differs from the disk at its point in time"
cmp -s $T/pit1.img $T/a.img && fail "the guest writes did not change the disk: test not testing"
got=$(dirty_map "$PIT")
[ "$got" = "$EXPECT_DIRTY" ] || fail "readable all: dirty bitmap reports
$got
expected
$EXPECT_DIRTY"
# (20M was overwritten after the point in time: its old zeroes come from the store, "data")
nbdinfo --map "$PIT" | grep -E "^ *$((16 * M)) +$((4 * M)) +3 +hole,zero" >/dev/null ||
  fail "readable all: base:allocation lost the hole: $(nbdinfo --map "$PIT")"
"$CBW" backup end >/dev/null || fail "backup end"

# ---- readable changed ----
sync
cp --sparse=always $T/a.img $T/pit2.img
"$CBW" backup begin --incremental c1 --readable changed > $T/begin.out ||
  fail "backup begin --readable changed: $(cat $T/begin.out)"
mode=$("$CBW" --json backup status | jq -r .readable)
[ "$mode" = changed ] || fail "readable: $mode (expected changed)"
# the changes since c1 now: the two first ranges, the 0x33, 0x55 and 0x66 writes
dirty_map "$PIT" > $T/dirty2.txt
grep -qx "$((9 * M)) $((3 * G))" $T/dirty2.txt || fail "changed: 9M not dirty: $(cat $T/dirty2.txt)"
guest_write $((5 * M)) $G 0x77                    # a changed block, after the PIT
guest_write $((12 * M)) $G 0x78                   # an unchanged one, after the PIT
qemu-io -r -f raw -c "read -P 0x22 $((5 * M)) $G" "$PIT" > $T/qio.out ||
  fail "changed: a changed block read wrong: $(cat $T/qio.out)"
grep -q 'Pattern verification failed' $T/qio.out && fail "changed: wrong data: $(cat $T/qio.out)"
for off in $((12 * M)) $((13 * M)); do
  if qemu-io -r -f raw -c "read $off $G" "$PIT" > $T/qio.out 2>&1 &&
      ! grep -qi 'error' $T/qio.out; then
    fail "changed: an unchanged block ($off) was readable: $(cat $T/qio.out)"
  fi
done
# The reason reaches the client in the structured error reply.
rc=0
nbdcopy --verbose "$PIT" $T/copy2.img 2> $T/nbdcopy.err || rc=$?
[ $rc != 0 ] || fail "changed: nbdcopy of the whole export succeeded"
grep -q "is not readable: backup backup is an incremental since checkpoint c1 begun with readable=changed" \
  $T/nbdcopy.err || fail "changed: no reason in the error reply: $(grep -i 'error' $T/nbdcopy.err | tail -5)"
# base:allocation: unreadable blocks are data (never hole/zero), readable ones as usual
nbdinfo --map "$PIT" > $T/map2.txt
grep -q 'hole' $T/map2.txt && fail "changed: unreadable blocks reported as holes: $(cat $T/map2.txt)"
"$CBW" backup end >/dev/null || fail "backup end"

# a bad value, and readable with a full backup, are refused
"$CBW" backup begin --incremental c1 --readable some > $T/out 2>&1 && fail "--readable some accepted"
grep -q 'readable must be all or changed' $T/out || fail "bad --readable: $(cat $T/out)"
"$CBW" backup begin --readable all > $T/out 2>&1 && fail "--readable with a full backup accepted"
grep -q 'only makes sense with mode incremental' $T/out || fail "full --readable: $(cat $T/out)"

"$CBW" disk remove vda >/dev/null || fail "disk remove"
stop_cbwd
log PASS
