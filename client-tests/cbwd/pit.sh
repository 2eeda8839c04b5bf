#!/bin/bash
# cbw — client-tests/cbwd/pit.sh: the point-in-time export proxy.
# Part 1 (always): upstream = nbdkit file plugin (read-only): nbdcopy with 1
# and 4 connections equals the source, base:allocation equals the upstream's
# map, writes fail EPERM, a dead upstream gives errors (never data) and a
# restarted one is reconnected, release=on forwards TRIM.
# Part 2 (when the cbw filter is built): a real backup session; nbdcopy of
# the PIT export during concurrent guest writes equals the disk at begin.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/lib.sh"
requires nbdcopy; requires nbdinfo; requires qemu-io; requires jq
SOCK=$T/cbwd.sock
UP=$T/up.sock
SIZE=$((40 * 1024 * 1024))

# A sparse source: random MiBs, holes between.
truncate -s $SIZE $T/src.img
for mb in 0 3 4 5 17 30 39; do
  head -c 1M /dev/urandom | dd of=$T/src.img bs=1M seek=$mb conv=notrunc status=none
done
: > $T/empty.txt
start_nbdkit "$UP" -r file "$T/src.img"
start_cbwd cbwd \
  --export "name=pit,type=pit,upstream=nbd+unix:///?socket=$UP,connections=4,bitmap=backup-sda:extents:$T/empty.txt" \
  --export "name=pit1,type=pit,upstream=nbd+unix:///?socket=$UP,connections=1"

for c in 1 4; do
  nbdcopy --connections=$c "$(uri pit)" $T/copy$c.img
  cmp $T/src.img $T/copy$c.img || fail "nbdcopy -C $c of the PIT export differs from the source"
done
nbdcopy --connections=4 "$(uri pit1)" $T/copyp1.img
cmp $T/src.img $T/copyp1.img || fail "PIT export with a pool of 1 differs"

# base:allocation is the upstream's.
norm() { jq -r '.[] | "\(.offset) \(.length) \(.type)"' | awk '{ if (n && f == $3 && s + l == $1) l += $2; else { if (n) print s, l, f; s = $1; l = $2; f = $3; n = 1 } } END { print s, l, f }'; }
nbdinfo --json --map "nbd+unix:///?socket=$UP" | norm > $T/up.map
nbdinfo --json --map "$(uri pit)" | norm > $T/pit.map
diff -u $T/up.map $T/pit.map >&2 || fail "PIT base:allocation differs from the upstream's"
grep -q " 3$" $T/pit.map || fail "no holes reported (expected holes in the sparse source)"
# Empty bitmap: one clean extent.
assert_eq "empty bitmap map" "0 $SIZE 0" "$(nbdinfo --json --map=qemu:dirty-bitmap:backup-sda "$(uri pit)" | norm)"

# Read-only.
out=$(qemu-io -f raw "$(uri pit)" -c "write 0 4k" 2>&1 || true)
echo "$out" | grep -q -i "permission\|not permitted\|read-only\|read only" || fail "write to PIT: $out"

# Upstream dies: errors, never data; restarted: served again.
kill9 "$NBDKIT_PID"
if nbdcopy "$(uri pit)" $T/dead.img 2>$T/dead.err; then
  fail "nbdcopy succeeded with the upstream dead"
fi
log "with the upstream dead: $(head -1 $T/dead.err)"
: > $T/empty.txt
start_nbdkit "$UP" -r file "$T/src.img"
nbdcopy --connections=4 "$(uri pit)" $T/again.img
cmp $T/src.img $T/again.img || fail "after the upstream came back the copy differs"
stop_cbwd

# release=on forwards TRIM upstream.
cp --sparse=always $T/src.img $T/rel.img
start_nbdkit "$T/up2.sock" file "$T/rel.img"
SOCK=$T/cbwd2.sock
start_cbwd cbwd2 --export "name=pit,type=pit,upstream=nbd+unix:///?socket=$T/up2.sock,release=on"
before=$(stat -c %b $T/rel.img)
qemu-io -f raw "$(uri pit)" -c "discard 0 1M" >/dev/null || fail "discard on release=on export"
after=$(stat -c %b $T/rel.img)
[ "$after" -lt "$before" ] || fail "release=on: trim not forwarded ($before -> $after blocks)"
out=$(qemu-io -f raw "$(uri pit)" -c "write 0 4k" 2>&1 || true)
echo "$out" | grep -q -i "not permitted" || fail "write on release=on PIT: $out"
stop_cbwd

# Part 2: the real copy-before-write filter.
if [ ! -f "$CBW_FILTER" ]; then
  log "cbw filter not built: skipping the live PIT part"
  exit 0
fi
. "$(dirname "$0")/pit_cbw.sh"
