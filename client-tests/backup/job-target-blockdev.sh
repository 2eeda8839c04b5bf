#!/bin/bash
# cbw — client-tests/backup/job-target-blockdev.sh: a push job never writes
# to a block device behind one of cbwd's files, whatever its name.
#
# Disk vda is a loop device; disk vdb is an image on an ext4 filesystem on a
# second loop device (mounted in the scratch directory).  `cbw job start`
# refuses, naming the reason:
#  - another device node (mknod) of vda's loop device: same block device;
#  - vdb's filesystem's loop device: it holds the filesystem of a served image.
# The served data is unchanged, and a regular new target still works.  Skipped
# (77) where loop devices or mounts cannot be set up (not root, container).
. "$(dirname "$0")/lib.sh"
need_modules
requires jq
requires losetup
requires mkfs.ext4
[ "$(id -u)" = 0 ] || skip "needs root for losetup and mount"

SIZE=$((16 << 20))
truncate -s $SIZE "$T/dev.img"
head -c $((2 << 20)) /dev/urandom | dd of="$T/dev.img" conv=notrunc status=none
truncate -s $((48 << 20)) "$T/fs.img"
mkfs.ext4 -q -F "$T/fs.img" || skip "mkfs.ext4 failed"
L1=$(losetup --find --show "$T/dev.img" 2>"$T/losetup.err") || skip "losetup: $(cat "$T/losetup.err")"
L2=$(losetup --find --show "$T/fs.img" 2>"$T/losetup.err") || { losetup -d "$L1"; skip "losetup: $(cat "$T/losetup.err")"; }
mkdir "$T/mnt"
# Cleanup: cbwd and the nbdkits first (they hold the devices), then the
# mount and the loop devices, then the usual.
_dev_exit() {
  local rc=$?
  [ -n "${ORCHD_PID:-}" ] && stop_orchd
  ORCHD_PID=
  _bk_kill_ours
  if mountpoint -q "$T/mnt"; then umount "$T/mnt" || umount -l "$T/mnt"; fi
  losetup -d "$L1" "$L2" 2>/dev/null || true
  (exit $rc)
  _bk_exit
}
trap _dev_exit EXIT
[ -b "$L1" ] && [ -b "$L2" ] || skip "loop devices are not block device nodes here"
mount "$L2" "$T/mnt" 2>"$T/mount.err" || skip "mount: $(cat "$T/mount.err")"
truncate -s $SIZE "$T/mnt/b.img"
head -c $((2 << 20)) /dev/urandom | dd of="$T/mnt/b.img" conv=notrunc status=none

start_orchd
expect_rc 0 "$CBW" disk add vda --file "$L1"
expect_rc 0 "$CBW" disk add vdb --file "$T/mnt/b.img"
expect_rc 0 "$CBW" backup begin
sum1=$(md5sum <"$L1")
sum2=$(md5sum <"$T/mnt/b.img")   # (the mounted device itself changes: ext4)

refused() {
  local target=$1 pattern=$2
  expect_rc 1 "$CBW" job start --disk vda --target "vda=$target"
  grep -qE -- "$pattern" "$T/err" || fail "target $target: expected /$pattern/, got: $ERR"
  log "refused $target: $ERR"
}
mm() { printf '%d:%d' "0x$(stat -L -c %t "$1")" "0x$(stat -L -c %T "$1")"; }

log "section: another node of the served block device"
mknod "$T/alias-blk" b "0x$(stat -c %t "$L1")" "0x$(stat -c %T "$L1")"
refused "$T/alias-blk" "is disk vda's served image \(same block device $(mm "$L1") as $L1\); refusing to overwrite a live disk"

log "section: the device holding a served image's filesystem"
refused "$L2" "is block device $(mm "$L2"), which holds the filesystem of disk vdb's served image \($T/mnt/b.img\); refusing to overwrite a live disk"

assert_eq "vda's device after the refusals" "$sum1" "$(md5sum <"$L1")"
assert_eq "vdb's image after the refusals" "$sum2" "$(md5sum <"$T/mnt/b.img")"

log "section: a regular new target still works"
expect_rc 0 "$CBW" --json job start --disk vda --target "vda=$T/copy.raw"
JOB=$(jq -r .id "$T/out")
timeout 60 "$CBW" job wait "$JOB" >/dev/null 2>"$T/wait.err" || fail "job: $(cat "$T/wait.err")"
cmp "$L1" "$T/copy.raw" || fail "the pushed copy differs from the device"
expect_rc 0 "$CBW" backup end
log "OK"
