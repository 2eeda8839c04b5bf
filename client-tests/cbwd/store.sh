#!/bin/bash
# cbw — client-tests/cbwd/store.sh: the store export (backup target):
# qemu-io writes/reads/discards/zeroes checked against a local model file,
# TRIM releases space, the allocation limit fails writes with ENOSPC without
# disturbing other clients or filling the host, nbdcopy full pulls with 1
# and 4 connections over Unix and TCP equal the source.  (A store is served
# on TCP only through allow=; this listener is plain, so allow=* opens it.)
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/lib.sh"
requires qemu-io; requires nbdcopy; requires nbdinfo
SOCK=$T/cbwd.sock
PORT=$(( 20000 + RANDOM % 20000 ))
SIZE=$((48 * 1024 * 1024))

start_cbwd cbwd --listen "tcp:127.0.0.1:$PORT" --tls=off \
  --export "name=store,type=store,path=$T/store.img,size=$SIZE,allow=*" \
  --export "name=small,type=store,path=$T/small.img,size=$SIZE,limit=1M,allow=*"
S=$(uri store)

# 1. qemu-io patterns; the same operations are applied to a local model file.
truncate -s $SIZE $T/model.img
model_fill() {  # PATTERN OFFSET LENGTH: what the store must now hold there
  head -c "$3" /dev/zero | tr '\0' "\\$(printf %03o $(($1)))" |
    dd of=$T/model.img bs=64K seek="$2" oflag=seek_bytes conv=notrunc status=none
}
ops=(
  "write -P 0x11 0 1M"
  "write -P 0x22 4095 8193"
  "write -P 0x33 40M 3M"
  "write -z 512K 128K"
  "discard 41M 1M"
  "write -P 0x44 47M 1M"
)
for op in "${ops[@]}"; do
  qemu-io -f raw "$S" -c "$op" >/dev/null || fail "qemu-io $op"
  set -- $op
  case $1 in
    write) if [ "$2" = -z ]; then off=$3 len=$4; pat=0; else pat=$3 off=$4 len=$5; fi ;;
    discard) pat=0 off=$2 len=$3 ;;
  esac
  off=$(numfmt --from=iec "$off"); len=$(numfmt --from=iec "$len")
  model_fill "$pat" "$off" "$len"
done
qemu-io -f raw "$S" -c "read -P 0x33 40M 1M" -c "read -P 0 41M 1M" -c "read -P 0x33 42M 1M" >/dev/null ||
  fail "qemu-io read patterns"
nbdcopy "$S" $T/pull.img
cmp $T/model.img $T/pull.img || fail "store content differs from the model after qemu-io ops"
# The discarded MiB is a hole in the store file, reported as a hole.
nbdinfo --map "$S" | awk '$1 == 42991616 && $3 == 3 {found=1} END {exit !found}' ||
  { nbdinfo --map "$S" >&2; fail "discarded range not reported as hole at 41M"; }

# 2. TRIM releases space.
before=$(( $(stat -c %b $T/store.img) * 512 ))
qemu-io -f raw "$S" -c "discard 40M 3M" >/dev/null
after=$(( $(stat -c %b $T/store.img) * 512 ))
[ $((before - after)) -ge $((2 * 1024 * 1024)) ] || fail "discard released only $((before - after)) bytes"

# 3. Limit: 1 MiB of allocation.  The first 1 MiB fits; more fails ENOSPC.
qemu-io -f raw "$(uri small)" -c "write -P 0x55 0 512K" >/dev/null || fail "write under the limit failed"
out=$(qemu-io -f raw "$(uri small)" -c "write -P 0x66 8M 2M" 2>&1 || true)
echo "$out" | grep -q "No space left on device" || fail "write over the limit: expected ENOSPC, got: $out"
alloc=$(( $(stat -c %b $T/small.img) * 512 ))
[ "$alloc" -le $((1024 * 1024)) ] || fail "store allocated $alloc bytes over its 1 MiB limit"
# Rewriting allocated space is still fine at the limit, and other exports are unaffected.
qemu-io -f raw "$(uri small)" -c "write -P 0x77 0 512K" -c "read -P 0x77 0 512K" >/dev/null ||
  fail "overwrite of allocated range at the limit failed"
qemu-io -f raw "$S" -c "write -P 0x12 0 2M" >/dev/null || fail "other export disturbed by the limit"
model_fill 0x12 0 $((2 * 1024 * 1024))
qemu-io -f raw "$S" -c "discard 40M 3M" >/dev/null
dd if=/dev/zero of=$T/model.img bs=1M seek=40 count=3 conv=notrunc status=none

# 4. nbdcopy full pulls: 1 and 4 connections, Unix and TCP.
nbdcopy --connections=1 "$S" $T/c1.img
nbdcopy --connections=4 "nbd://127.0.0.1:$PORT/store" $T/c4.img
cmp $T/model.img $T/c1.img || fail "nbdcopy -C 1 differs"
cmp $T/model.img $T/c4.img || fail "nbdcopy -C 4 (tcp) differs"
# And a push of random data through 4 connections, pulled back.
head -c $SIZE /dev/urandom > $T/rand.img
nbdcopy --connections=4 $T/rand.img "$S"
nbdcopy --connections=4 "$S" $T/back.img
cmp $T/rand.img $T/back.img || fail "push/pull of random data differs"
stop_cbwd

# 5. direct=on: aligned WRITEs go past the page cache (the file's pages are
# not cached after a push of 48 MiB), unaligned ones through it; the
# content is the same as through the plain store.  Bad values and direct=
# on other types are refused naming the key.
for bad in "type=store,path=$T/d.img,size=1M,direct=maybe" \
           "type=file,path=$T/rand.img,direct=on"; do
  out=$("$CBWD" --listen "unix:$T/bad.sock" --export "name=x,$bad" 2>&1) &&
    fail "cbwd accepted --export name=x,$bad"
  case $out in *direct*) ;; *) fail "--export $bad: error does not name direct: $out" ;; esac
done
if dd if=/dev/zero of=$T/probe bs=4096 count=1 oflag=direct status=none 2>/dev/null; then
  start_cbwd cbwd-direct --export "name=store,type=store,path=$T/dstore.img,size=$SIZE,direct=on"
  nbdcopy --connections=4 --request-size=1048576 $T/rand.img "$S"
  qemu-io -f raw "$S" -c "write -P 0x22 4095 8193" -c "write -z 512K 128K" >/dev/null ||
    fail "direct store: unaligned write / zero"
  cp $T/rand.img $T/dmodel.img
  printf '\x22%.0s' $(seq 8193) | dd of=$T/dmodel.img bs=1 seek=4095 conv=notrunc status=none
  dd if=/dev/zero of=$T/dmodel.img bs=64K seek=8 count=2 conv=notrunc status=none
  cached=$(fincore -b -n -o RES $T/dstore.img 2>/dev/null | tr -d ' ') || cached=
  nbdcopy --connections=4 "$S" $T/dback.img
  cmp $T/dmodel.img $T/dback.img || fail "direct store: content differs from the model"
  stop_cbwd
  if [ -n "$cached" ]; then
    [ "$cached" -lt $((SIZE / 8)) ] ||
      fail "direct store: $cached bytes of the file in the page cache after the push"
    log "direct store: $cached bytes cached after a $SIZE-byte push"
  fi
else
  log "no O_DIRECT on $T: direct=on store not tested"
fi
log "store ok"
