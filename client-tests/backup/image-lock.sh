#!/bin/bash
# cbw — client-tests/backup/image-lock.sh: a served image carries QEMU's
# image locks, with real QEMU tools on both sides.
#  - while cbw serves an image (raw fast path, and the layer files of a disk
#    with overlays), `qemu-io -c write`, `qemu-nbd`, `qemu-img resize` and
#    `qemu-img convert -n` into it fail with QEMU's "Failed to get ... lock"
#    error and change nothing.  (`qemu-img info` of a raw image takes no
#    permission at all and shares all, so no lock can refuse it: it also
#    works on the raw disk of a running QEMU guest.  Readers share the image
#    like QEMU's guest devices do.)
#  - `cbw disk add` of an image held by `qemu-nbd --persistent` or by a
#    `qemu-io` that has it open is refused with a clear Busy error naming
#    the image and the lock (not "nbdkit did not start"), and nothing is
#    added; so is `cbw disk start` of a stopped disk whose image QEMU took
#    meanwhile;
#  - `--force-share` serves an image qemu-nbd holds, is shown by `disk list`
#    (text and JSON) and survives a cbwd restart; once the holder is gone
#    the plain `disk add` works.
. "$(dirname "$0")/lib.sh"
need_modules noprobe
requires jq
requires qemu-img
requires qemu-io
requires qemu-nbd
[ "$PLUGIN" = chain ] || skip "image locks are taken by the chain plugin"

truncate -s 16M "$T/a.img" "$T/b.img" "$T/c.img" "$T/d.img"
start_orchd

# expect_qemu_refused WHAT REGEX CMD...: CMD fails with QEMU's lock error.
expect_qemu_refused() {
  local what=$1 re=$2 rc=0; shift 2
  timeout 20 "$@" >"$T/q.out" 2>&1 || rc=$?
  [ $rc != 0 ] && [ $rc != 124 ] || fail "$what: exit $rc: $(cat "$T/q.out")"
  grep -Eq "$re" "$T/q.out" || fail "$what: not the lock error: $(cat "$T/q.out")"
  log "$what refused: $(grep -E "$re" "$T/q.out" | head -1)"
}

# 1. cbw serves a.img: QEMU's tools refuse it.
expect_rc 0 "$CBW" disk add vda --file "$T/a.img"
expect_qemu_refused "qemu-io write" 'Failed to get "write" lock' \
  qemu-io -f raw -c 'write -P 0x11 0 4k' "$T/a.img"
expect_qemu_refused "qemu-nbd" 'Failed to get "write" lock' \
  qemu-nbd -f raw -k "$T/steal.sock" "$T/a.img"
expect_qemu_refused "qemu-img resize" 'Failed to get "(write|resize)" lock' \
  qemu-img resize -f raw "$T/a.img" 32M
head -c 65536 /dev/urandom > "$T/src.img"; truncate -s 16M "$T/src.img"
expect_qemu_refused "qemu-img convert into it" 'Failed to get "write" lock' \
  qemu-img convert -n -f raw -O raw "$T/src.img" "$T/a.img"
[ "$(stat -c %s "$T/a.img")" = $((16 << 20)) ] || fail "a refused resize resized"
cmp -n 65536 "$T/a.img" /dev/zero || fail "a refused qemu-io/qemu-img wrote anyway"

# ... and the layer files of a disk with overlays.
expect_rc 0 "$CBW" disk add vdd --file "$T/d.img" --chain "$T/ch/vdd.chain"
expect_rc 0 "$CBW" disk snapshot vdd
layer=$("$CBW" --json disk chain vdd | jq -r '.layers[-1].name')
expect_qemu_refused "qemu-io on an overlay's data file" 'Failed to get "write" lock' \
  qemu-io -f raw -c 'write 0 4k' "$T/ch/$(jq -r .data "$T/ch/$layer")"
expect_qemu_refused "qemu-io on the base of a chain" 'Failed to get "write" lock' \
  qemu-io -f raw -c 'write 0 4k' "$T/d.img"

# 2. QEMU holds the image: cbw refuses it, clearly.
rm -f "$T/q.sock"
start_bg qemu-nbd -f raw --persistent -k "$T/q.sock" "$T/b.img"
QNBD=$BG_PID
wait_socket "$T/q.sock"
expect_rc 1 "$CBW" disk add vdb --file "$T/b.img"
grep -q "Busy" <<<"$ERR" && grep -qF "$T/b.img: locked by another process (QEMU/qemu-nbd?)" <<<"$ERR" ||
  fail "held by qemu-nbd: $ERR"
grep -q "nbdkit did not start" <<<"$ERR" && fail "the refusal came from nbdkit's start: $ERR"
[ "$("$CBW" --json disk list | jq '[.disks[] | select(.name=="vdb")] | length')" = 0 ] ||
  fail "refused disk is listed"
[ ! -e "$STATE/disks/vdb" ] || fail "a refused disk add left $STATE/disks/vdb"

start_bg qemu-io -f raw -c 'sleep 600000' "$T/c.img"   # holds c.img open
QIO=$BG_PID
ino=$(stat -c %i "$T/c.img")
for _ in $(seq 200); do         # until qemu-io has taken its lock bytes
  grep -q "OFDLCK .*:$ino 100 101" /proc/locks && break
  sleep 0.1
done
expect_rc 1 "$CBW" disk add vdc --file "$T/c.img"
grep -qF "$T/c.img: locked by another process (QEMU/qemu-nbd?): failed to get shared \"write\" lock" <<<"$ERR" ||
  fail "held by qemu-io: $ERR"
kill "$QIO"; wait "$QIO" 2>/dev/null || true
expect_rc 0 "$CBW" disk add vdc --file "$T/c.img"

# disk start of a stopped disk whose image QEMU took meanwhile.
expect_rc 0 "$CBW" disk stop vda
rm -f "$T/qa.sock"
start_bg qemu-nbd -f raw --persistent -k "$T/qa.sock" "$T/a.img"
QA=$BG_PID
wait_socket "$T/qa.sock"
expect_rc 1 "$CBW" disk start vda
grep -qF "$T/a.img: locked by another process (QEMU/qemu-nbd?)" <<<"$ERR" || fail "disk start: $ERR"
kill "$QA"; wait "$QA" 2>/dev/null || true
expect_rc 0 "$CBW" disk start vda

# 3. --force-share: explicit, visible, persistent.
expect_rc 0 "$CBW" disk add vdb --file "$T/b.img" --force-share
"$CBW" disk list | grep -E "^vdb .*\(force-share\)$" >/dev/null || fail "disk list: $("$CBW" disk list)"
grep -q "force-share: image locks not exclusive" "$T/out" || fail "disk add output: $(cat "$T/out")"
nbdinfo --size "$(disk_uri vdb)" >/dev/null || fail "vdb not served"
"$BK" ctl "$STATE/disks/vdb/chain.ctl" '{"execute":"status"}' | jq -e '.return."force-share" == true' \
  >/dev/null || fail "chain plugin status: no force-share"
stop_orchd
start_orchd
"$CBW" --json disk list | jq -e '.disks[] | select(.name=="vdb") | ."force-share" == true' \
  >/dev/null || fail "force-share lost across a restart"
"$CBW" --json disk list | jq -e '.disks[] | select(.name=="vda") | ."force-share" == false' \
  >/dev/null || fail "vda shown as force-share"
expect_rc 0 "$CBW" disk remove vdb
kill "$QNBD"; wait "$QNBD" 2>/dev/null || true
expect_rc 0 "$CBW" disk add vdb --file "$T/b.img"
expect_qemu_refused "qemu-nbd on vdb" 'Failed to get "write" lock' \
  qemu-nbd -f raw -k "$T/steal.sock" "$T/b.img"
log "OK"
