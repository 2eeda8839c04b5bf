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
start_chain "$S" "$C" file="$T/base.img" chain="$T/disk.chain"

RANDOM=4242
# one_write: a random write (or zero) applied to the export, the model and
# the qcow2 top
one_write() {
  local off=$(( (RANDOM % (SIZE / 512)) * 512 )) len=$(( (1 + RANDOM % 512) * 512 ))
  [ $((off + len)) -le $SIZE ] || len=$((SIZE - off))
  local cmd
  if [ $((RANDOM % 5)) = 0 ]; then cmd="write -z $off $len"
  else cmd="write -P $((1 + RANDOM % 255)) $off $len"; fi
  qio "$U" "$cmd"
  qemu-io -f raw "$T/model.img" -c "$cmd" >/dev/null
  qemu-io -f "$QFMT" "$QTOP" -c "$cmd" >/dev/null
}
snapshot() {
  local r; r=$(ctl_ok "$C" "{\"execute\":\"snapshot\",\"arguments\":{\"label\":\"$1\"}}")
  local q=$T/q$1.qcow2
  qemu-img create -q -f qcow2 -b "$QTOP" -F "$QFMT" "$q" $SIZE
  QTOP=$q; QFMT=qcow2
  echo "$r" | jq -r .index
}
overlays() { ctl_ok "$C" '{"execute":"status"}' | jq -r '.overlays'; }

for w in $(seq 10); do one_write; done
compare_export "$U" "$T/model.img"
for round in 1 2 3; do
  idx=$(snapshot "s$round")
  assert_eq "snapshot index" "$round" "$idx"
  for w in $(seq 15); do one_write; done
  qio "$U" flush
  compare_export "$U" "$T/model.img"
done
assert_eq overlays 3 "$(overlays)"
ctl_ok "$C" '{"execute":"list"}' | jq -e '.layers | length == 4' >/dev/null || fail "list"

# Intermediate commit (layer 2 into 1, keep it emptied) while writes go on.
ctl_ok "$C" '{"execute":"commit","arguments":{"base":1,"top":2,"mode":"make-empty"}}' >/dev/null
for w in $(seq 10); do one_write; done
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
ctl_ok "$C" '{"execute":"commit","arguments":{"base":0,"speed":33554432}}' >/dev/null
assert_eq "snapshot during commit" Busy "$(ctl_err "$C" '{"execute":"snapshot"}')"
for w in $(seq 20); do one_write; done
ctl_ok "$C" '{"execute":"commit-speed","arguments":{"speed":0}}' >/dev/null || true
assert_eq "active commit" completed "$(wait_commit "$C")"
assert_eq overlays 0 "$(overlays)"
for w in $(seq 5); do one_write; done
qio "$U" flush
compare_export "$U" "$T/model.img"

kill "$NBDKIT_PID"; wait "$NBDKIT_PID" 2>/dev/null || true
cmp "$T/base.img" "$T/model.img" || fail "base after full commit differs from the model"
qemu-img convert -O raw "$QTOP" "$T/qconv.img"
cmp "$T/base.img" "$T/qconv.img" || fail "base differs from qemu-img convert of the qcow2 chain"
ls "$T"/disk.chain.ov* >/dev/null 2>&1 && fail "deleted overlays left files: $(ls "$T"/disk.chain.ov*)"
log "OK: 3 snapshots, intermediate + active commit, base == model == qemu-img convert"
