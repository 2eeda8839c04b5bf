#!/bin/bash
# client-tests/overlay/snapshot-commit.sh: live snapshots and commits of a raw
# disk through nbdkit-chain-plugin, driven by qemu-io (writes) and nbdcopy
# (reads) with snapshot/commit over the control socket.  The same writes go
# to a local raw model and to a qcow2 chain built with qemu-img; after a full
# commit the raw base must equal the model and `qemu-img convert` of the
# qcow2 chain (interop).
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/common.sh"
require_chain_support
requires jq

SIZE=$((32 * 1024 * 1024))
head -c $SIZE /dev/urandom > "$T/base.img"
cp "$T/base.img" "$T/model.img"
cp "$T/base.img" "$T/qbase.img"
QTOP=$T/qbase.img; QFMT=raw

S=$T/nbd.sock C=$T/ctl.sock U=$(uri "$T/nbd.sock")
start_chain "$S" "$C" file="$T/base.img" chain="$T/disk.chain" chain-create=true

RANDOM=4242
# writes N: N random writes (or zeroes), applied in one qemu-io run each to
# the export, the raw model and the qcow2 top
writes() {
  local i off len cmds=()
  for i in $(seq "$1"); do
    off=$(( (RANDOM % (SIZE / 512)) * 512 )) len=$(( (1 + RANDOM % 512) * 512 ))
    [ $((off + len)) -le $SIZE ] || len=$((SIZE - off))
    if [ $((RANDOM % 5)) = 0 ]; then cmds+=("write -z $off $len")
    else cmds+=("write -P $((1 + RANDOM % 255)) $off $len"); fi
  done
  qio "$U" "${cmds[@]}"
  local a=() c
  for c in "${cmds[@]}"; do a+=(-c "$c"); done
  qemu-io -f raw "$T/model.img" "${a[@]}" >/dev/null
  qemu-io -f "$QFMT" "$QTOP" "${a[@]}" >/dev/null
}
# snapshot LABEL: live snapshot of the export and a new qcow2 top; sets
# SNAP_INDEX (no subshell: QTOP/QFMT must change here)
snapshot() {
  local r; r=$(ctl_ok "$C" "{\"execute\":\"snapshot\",\"arguments\":{\"label\":\"$1\"}}")
  local q=$T/q$1.qcow2
  qemu-img create -q -f qcow2 -b "$QTOP" -F "$QFMT" "$q" $SIZE
  QTOP=$q; QFMT=qcow2
  SNAP_INDEX=$(echo "$r" | jq -r .index)
}
overlays() { ctl_ok "$C" '{"execute":"status"}' | jq -r '.overlays'; }

writes 10
compare_export "$U" "$T/model.img"
for round in 1 2 3; do
  snapshot "s$round"
  assert_eq "snapshot index" "$round" "$SNAP_INDEX"
  writes 15
  qio "$U" flush
  compare_export "$U" "$T/model.img"
done
assert_eq overlays 3 "$(overlays)"
ctl_ok "$C" '{"execute":"list"}' | jq -e '.layers | length == 4' >/dev/null || fail "list"

# Intermediate commit (layer 2 into 1, keep it emptied) while writes go on.
ctl_ok "$C" '{"execute":"commit","arguments":{"base":1,"top":2,"mode":"make-empty"}}' >/dev/null
writes 10
assert_eq "intermediate commit" completed "$(wait_commit "$C")"
assert_eq overlays 3 "$(overlays)"
ctl_ok "$C" '{"execute":"status"}' | jq -e '.chain.layers[2].allocated_bytes == 0' >/dev/null ||
  fail "make-empty left data in layer 2"
compare_export "$U" "$T/model.img"

# Bad commit ranges are refused with a clear class, the disk unchanged.
assert_eq "bad range" InvalidParameter "$(ctl_err "$C" '{"execute":"commit","arguments":{"base":3,"top":3}}')"
assert_eq "bad range" InvalidParameter "$(ctl_err "$C" '{"execute":"commit","arguments":{"top":9}}')"
assert_eq "bad mode" InvalidParameter "$(ctl_err "$C" '{"execute":"commit","arguments":{"mode":"x"}}')"

# Active commit of everything into the base, speed-limited so that guest
# writes really run during it.
ctl_ok "$C" '{"execute":"commit","arguments":{"base":0,"speed":1048576}}' >/dev/null
assert_eq "snapshot during commit" Busy "$(ctl_err "$C" '{"execute":"snapshot"}')"
for w in $(seq 4); do writes 5; done
octl "$C" '{"execute":"commit-speed","arguments":{"speed":0}}' >/dev/null
assert_eq "active commit" completed "$(wait_commit "$C")"
assert_eq overlays 0 "$(overlays)"
writes 5
qio "$U" flush
compare_export "$U" "$T/model.img"

kill "$NBDKIT_PID"; wait "$NBDKIT_PID" 2>/dev/null || true
cmp "$T/base.img" "$T/model.img" || fail "base after full commit differs from the model"
[ "$QFMT" = qcow2 ] && [ "$(qemu-img info --output=json --backing-chain "$QTOP" | jq length)" = 4 ] ||
  fail "the qcow2 peer chain was not built"
qemu-img convert -O raw "$QTOP" "$T/qconv.img"
cmp "$T/base.img" "$T/qconv.img" || fail "base differs from qemu-img convert of the qcow2 chain"
ls "$T"/disk.chain.ov* >/dev/null 2>&1 && fail "deleted overlays left files: $(ls "$T"/disk.chain.ov*)"
log "OK: 3 snapshots, intermediate + active commit, base == model == qemu-img convert"
