# cbw — client-tests/cbwd/pit_cbw.sh (sourced by pit.sh): cbwd's PIT export
# over the real cbw filter.  The backup target is cbwd's own store export.
# A guest writes while nbdcopy pulls the PIT export; the copy must equal the
# disk as it was at `begin`.
head -c $SIZE /dev/urandom > $T/disk.img
cp $T/disk.img $T/disk-at-begin.img
SOCK=$T/cbwd3.sock
start_cbwd cbwd3 --export "name=store,type=store,path=$T/store.img,size=$SIZE"
STORE_SOCK=$SOCK
start_nbdkit "$T/live.sock" --filter="$CBW_FILTER" file "$T/disk.img" \
  cbw-control="$T/cbw.ctl" cbw-pit-export=pit
r=$(timeout 15 bash -c "$(declare -f ctl); ctl '$T/cbw.ctl' '{\"execute\":\"begin\",\"arguments\":{\"target\":\"nbd+unix:///store?socket=$STORE_SOCK\"}}'" || true)
echo "$r" | grep -q '"return"' ||
  fail "cbw filter begin failed or timed out: ${r:-no reply}"
SOCK=$T/cbwd4.sock
start_cbwd cbwd4 --export "name=pit,type=pit,upstream=nbd+unix:///pit?socket=$T/live.sock,connections=4"
# Guest writes during the pull.
( for i in $(seq 60); do
    off=$(( (RANDOM % (SIZE / 65536)) * 65536 ))
    qemu-io -f raw "nbd+unix:///?socket=$T/live.sock" -c "write -P $((i % 250 + 1)) $off 64k" >/dev/null 2>&1 || true
  done ) &
writer=$!
nbdcopy --connections=4 "$(uri pit)" $T/pit-copy.img
wait $writer
cmp -s $T/disk.img $T/disk-at-begin.img && log "warning: the guest writes did not change the disk"
qemu-img compare -f raw -F raw $T/disk-at-begin.img $T/pit-copy.img >&2 ||
  fail "PIT copy differs from the disk at begin"
ctl "$T/cbw.ctl" '{"execute":"end"}' >/dev/null
stop_cbwd
log "live PIT ok"
