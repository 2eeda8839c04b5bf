#!/bin/bash
# cbw — client-tests/backup/kernel-copy.sh: a raw image file served on the
# fast path copies its old data to the backup's local store inside the
# kernel (cbwd passes cbw-source=IMAGE to the disk's cbw filter), and the
# point-in-time export is still exactly the image at begin.  A disk with an
# overlay chain must not get cbw-source (the copies would read the base
# image, not the disk), and neither does a block device.
. "$(dirname "$0")/lib.sh"
need_modules
requires qemu-io
requires qemu-img
requires nbdcopy
requires jq

SIZE=$((8 << 20))
head -c $SIZE /dev/urandom > "$T/a.img"
head -c $SIZE /dev/urandom > "$T/b.img"
start_orchd
expect_rc 0 "$CBW" disk add vda --file "$T/a.img"
expect_rc 0 "$CBW" disk add vdb --file "$T/b.img" --overlays

cmdline() { tr '\0' ' ' < /proc/"$(jq -r ".disks[] | select(.name==\"$1\") | .pid" <<<"$("$CBW" --json disk list)")"/cmdline; }
cmdline vda | grep -q "cbw-source=$T/a.img" || fail "vda's nbdkit has no cbw-source: $(cmdline vda)"
! cmdline vdb | grep -q "cbw-source=" || fail "vdb (overlay chain) got cbw-source: $(cmdline vdb)"

cp "$T/a.img" "$T/a-at-begin.img"
expect_rc 0 "$CBW" backup begin --disk vda
# 1 MiB writes into fresh blocks: each first write copies 64 KiB blocks.
qemu-io -f raw -c "write -P 7 0 1M" -c "write -P 9 3M 1M" "$(disk_uri vda)" >/dev/null ||
  fail "guest writes"
st=$(ctl "$(cbw_ctl vda)" '{"execute":"status"}')
k=$(( $(jq -r '.return["kernel-copy-bytes"] + .return["clone-bytes"]' <<<"$st") ))
[ "$k" -ge $((2 << 20)) ] || fail "only $k bytes copied in the kernel: $st"
nbdcopy "$(pit_uri vda)" "$T/pit.img" || fail "nbdcopy of the PIT export"
qemu-img compare -q -f raw -F raw "$T/pit.img" "$T/a-at-begin.img" ||
  fail "the PIT export differs from the image at begin"
expect_rc 0 "$CBW" backup end
log "PASS"
