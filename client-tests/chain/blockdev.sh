#!/bin/bash
# cbw — client-tests/chain/blockdev.sh: serving a block device (a loop
# device): size via BLKGETSIZE64, pattern I/O, zero and trim, direct=true
# with the device's logical block size; while served, qemu-io cannot write
# it (image locks), an O_EXCL open fails (EBUSY) and a second server is
# refused.  Skipped (77) where loop devices
# cannot be set up (not root, no /dev/loop-control, container limits).
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/chain-lib.sh"
requires losetup
requires qemu-io
[ "$(id -u)" = 0 ] || skip "needs root for losetup"

backing=$T/backing.img
SIZE=$((8 * 1024 * 1024))
truncate -s $SIZE "$backing"
LOOP=$(losetup --find --show "$backing" 2>"$T/losetup.err") || skip "losetup failed: $(cat "$T/losetup.err")"
[ -b "$LOOP" ] || { losetup -d "$LOOP" 2>/dev/null; skip "$LOOP is not a block device node here"; }
cleanup_loop() {
  local p
  local rc=$?
  for p in "${_CBW_PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for p in "${_CBW_PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
  losetup -d "$LOOP" 2>/dev/null || true
  _cbw_cleanup
  exit $rc
}
trap cleanup_loop EXIT
log "using $LOOP"

for direct in false true; do
  if [ "$CTL_OK" = 1 ]; then
    start_chain "bd-$direct" file="$LOOP" direct=$direct control="$T/ctl-$direct.sock"
    st=$(ctl "$T/ctl-$direct.sock" '{"execute":"status"}')
    echo "$st" | jq -e ".return.flags.block_device == true and .return.direct == $direct" >/dev/null \
      || fail "status: $st"
  else
    start_chain "bd-$direct" file="$LOOP" direct=$direct
  fi
  assert_eq "size via BLKGETSIZE64" "$SIZE" "$(nbdinfo --size "$URI")"
  qemu-io -f raw "$URI" \
    -c 'write -P 0x5a 0 1M' -c 'write -P 0xa5 1000 3333' -c 'write -P 0x11 7M 1M' \
    -c 'read -P 0x5a 0 1000' -c 'read -P 0xa5 1000 3333' -c 'read -P 0x5a 4333 1044243' \
    -c 'read -P 0x11 7M 1M' > "$T/qio.out" 2>&1 || { cat "$T/qio.out"; fail "qemu-io failed"; }
  grep -q 'Pattern verification failed' "$T/qio.out" && { cat "$T/qio.out"; fail "pattern mismatch (direct=$direct)"; }
  nbd_py "$URI" <<'PYEOF'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.zero(65536, 65536)                                  # may trim
h.zero(4096 * 3 + 17, 200000, nbd.CMD_FLAG_NO_HOLE)   # unaligned: nbdkit writes zeroes
h.trim(65536, 7 * 1048576)                            # advisory
h.flush()
assert h.pread(65536, 65536) == bytes(65536), "zero (may trim) not zero"
assert h.pread(4096 * 3 + 17, 200000) == bytes(4096 * 3 + 17), "unaligned zero not zero"
assert h.pread(4096, 0) == b"\x5a" * 1000 + b"\xa5" * 3096, "data around zeroes damaged"
h.shutdown()
PYEOF
  # one writer: QEMU's image locks, and the kernel's exclusive claim
  qemu-io -f raw -c 'write 0 4k' "$LOOP" > "$T/qio2.out" 2>&1 && fail "qemu-io wrote to the served device"
  grep -q 'Failed to get "write" lock' "$T/qio2.out" || fail "qemu-io: $(cat "$T/qio2.out")"
  python3 -c 'import os, sys; os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL)' "$LOOP" 2>"$T/excl.err" &&
    fail "O_EXCL open of the served device succeeded"
  grep -q "Device or resource busy" "$T/excl.err" || fail "O_EXCL: $(cat "$T/excl.err")"
  expect_start_failure "locked by another process|block device in use" "$CHAIN_PLUGIN" file="$LOOP"
  stop_nbdkit "$NBDKIT_PID"
  # the device content is what the client wrote
  cmp -n 1000 "$LOOP" <(head -c 1000 /dev/zero | tr '\0' '\132') || fail "device content wrong (direct=$direct)"
done
log "ok"
