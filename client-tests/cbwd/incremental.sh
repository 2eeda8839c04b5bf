#!/bin/bash
# cbw — client-tests/cbwd/incremental.sh: an incremental backup with
# incremental_reader (libnbd): full copy of v0, random changes (data and
# zeroes) recorded by the test as the dirty bitmap, cbwd serves v1 with
# qemu:dirty-bitmap:backup-sda, the reader applies only dirty data to the
# full copy, which must then equal v1.  Then the same with one changed range
# left out of the bitmap: the copy must differ (the test can fail).
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/lib.sh"
READER=$CBW_BUILD/client-tests/cbwd/incremental_reader
[ -x "$READER" ] || skip "incremental_reader not built"
SOCK=$T/cbwd.sock
SIZE=$((96 * 1024 * 1024 + 4096))      # crosses several 32 MiB steps
truncate -s $SIZE $T/v1.img
for mb in $(seq 0 7 95); do head -c 1M /dev/urandom | dd of=$T/v1.img bs=1M seek=$mb conv=notrunc status=none; done
cp --sparse=always $T/v1.img $T/full.img          # the previous full backup
: > $T/dirty.txt
for i in $(seq 40); do
  off=$(( (RANDOM * 32768 + RANDOM) % (SIZE - 200000) ))
  len=$(( RANDOM % 150000 + 1 ))
  if [ $((i % 4)) = 0 ]; then
    fallocate -p -o $off -l $len $T/v1.img 2>/dev/null ||
      dd if=/dev/zero of=$T/v1.img bs=1 seek=$off count=$len conv=notrunc status=none
  else
    head -c $len /dev/urandom | dd of=$T/v1.img bs=64K seek=$off oflag=seek_bytes conv=notrunc status=none iflag=fullblock
  fi
  echo "$off $len" >> $T/dirty.txt
done
# A range written at the very end.
head -c 4096 /dev/urandom | dd of=$T/v1.img bs=4096 seek=$(( SIZE / 4096 - 1 )) conv=notrunc status=none
echo "$(( SIZE - 4096 )) 4096" >> $T/dirty.txt
cmp -s $T/v1.img $T/full.img && fail "test setup: no change"

head -n -1 $T/dirty.txt > $T/dirty-missing.txt     # forgets the last change
start_cbwd cbwd \
  --export "name=disk,type=file,path=$T/v1.img,bitmap=backup-sda:extents:$T/dirty.txt" \
  --export "name=bad,type=file,path=$T/v1.img,bitmap=backup-sda:extents:$T/dirty-missing.txt"
cp --sparse=always $T/full.img $T/inc.img
out=$("$READER" "$(uri disk)" backup-sda $T/inc.img) || fail "incremental_reader failed"
log "incremental_reader: $out"
cmp $T/v1.img $T/inc.img || fail "full + incremental differs from v1"
read -r _ dirty _ nread _ zeroed <<< "$out"
total=$(awk '{s += $2} END {print s}' $T/dirty.txt)
[ "$dirty" -ge 1 ] && [ "$nread" -le "$dirty" ] || fail "read $nread bytes of $dirty dirty"
[ "$dirty" -le $(( total + 2 * 4096 * 41 )) ] || fail "reader saw $dirty dirty bytes, model has at most $total"
cp --sparse=always $T/full.img $T/inc-bad.img
"$READER" "$(uri bad)" backup-sda $T/inc-bad.img >/dev/null || fail "incremental_reader (bad) failed"
cmp -s $T/v1.img $T/inc-bad.img && fail "an under-reported bitmap still produced the right image: test cannot fail"
stop_cbwd
