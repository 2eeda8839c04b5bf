#!/bin/bash
# cbw-source: copies from the raw image to a local target inside the kernel
# (filter parameter cbw-source=PATH), through real clients:
#  - a begin whose cbw-source is not the disk (another size) or not a
#    regular file is refused with InvalidParameter naming the problem;
#  - with the image named, 1 MiB guest writes are copied by the kernel
#    (status kernel-copy-bytes or clone-bytes), 4 KiB writes of 4 KiB
#    blocks still through user space, and the point-in-time export reads
#    the disk as it was at begin (qemu-img compare), the hole of the image
#    included;
#  - an NBD target ignores cbw-source (nothing to copy into in the kernel).
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/cbw-lib.sh"
requires qemu-img
M=1048576 size=$((16 * 1048576))
truncate -s $size "$T/disk.img"                 # 0..4M: a hole
head -c $((12 * M)) /dev/urandom | dd of="$T/disk.img" bs=1M seek=4 conv=notrunc status=none
cp "$T/disk.img" "$T/ref.img"
truncate -s $((size + 4096)) "$T/other.img"

# wrong size, not a regular file
start_live "$T/disk.img" cbw-granularity=4096 cbw-source="$T/other.img"
start_file_target tgt $size
r=$(cctl "$CTL" "{\"execute\":\"begin\",\"arguments\":{\"target\":\"$TGT_URI\"}}")
[ "$(jget "$r" '.error.class // empty')" = InvalidParameter ] || fail "begin with a wrong-size cbw-source: $r"
case $(jget "$r" .error.desc) in *"not the image below"*) ;; *) fail "unclear error: $r" ;; esac
kill "$LIVE_PID"; wait "$LIVE_PID" 2>/dev/null || true
start_live "$T/disk.img" cbw-granularity=4096 cbw-source="$T"
err_ctl InvalidParameter "{\"execute\":\"begin\",\"arguments\":{\"target\":\"$TGT_URI\"}}"
kill "$LIVE_PID"; wait "$LIVE_PID" 2>/dev/null || true

# the real thing
start_live "$T/disk.img" cbw-granularity=4096 cbw-source="$T/disk.img"
begin_full
"$CBW_IO" pwrite "$LIVE" $((3 * M)) $((2 * M)) 1 >/dev/null     # hole + data
"$CBW_IO" pwrite "$LIVE" $((8 * M)) $M 2 >/dev/null
"$CBW_IO" pwrite "$LIVE" $((12 * M)) 4096 3 >/dev/null           # one block
st=$(ok_ctl '{"execute":"status"}')
k=$(( $(jget "$st" '.return["kernel-copy-bytes"]') + $(jget "$st" '.return["clone-bytes"]') ))
# 2 MiB of data went through the kernel; the hole MiB is a hole of the
# target (zero-bytes, as the user-space copy counts zeros); the 4 KiB block
# went through user space
assert_eq kernel-copied-bytes $((2 * M)) "$k"
assert_eq copied-bytes $((2 * M + 4096)) "$(jget "$st" '.return["copied-bytes"]')"
assert_eq zero-bytes $M "$(jget "$st" '.return["zero-bytes"]')"
assert_eq kernel-copy-fallbacks 0 "$(jget "$st" '.return["kernel-copy-fallbacks"]')"
qemu-img compare -q -f raw -F raw "$T/ref.img" "$PIT" || fail "PIT export differs from the disk at begin"
ok_ctl '{"execute":"end"}' >/dev/null
kill "$LIVE_PID"; wait "$LIVE_PID" 2>/dev/null || true

# NBD target: cbw-source unused
cp "$T/ref.img" "$T/disk.img"
start_target ntgt $size
start_live "$T/disk.img" cbw-granularity=4096 cbw-source="$T/disk.img"
begin_full
"$CBW_IO" pwrite "$LIVE" $((8 * M)) $M 4 >/dev/null
wait_copies
assert_eq kernel-copy-bytes 0 "$(status_field kernel-copy-bytes)"
qemu-img compare -q -f raw -F raw "$T/ref.img" "$PIT" || fail "PIT export (NBD target) differs"
log "ok"
