#!/bin/bash
# client-tests/overlay/crash-restart.sh: kill -9 nbdkit in the middle of an
# active commit, restart: the disk holds every flushed write, the commit is
# cleanly undone (chain unchanged) and can be run again; then bad chains
# (corrupt or missing descriptor, missing or wrong-size layer) are refused
# at start with a clear error, and nothing is created in their place.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/common.sh"
require_chain_support
requires jq

SIZE=$((64 * 1024 * 1024))
head -c $SIZE /dev/urandom > "$T/base.img"
cp "$T/base.img" "$T/model.img"
S=$T/nbd.sock C=$T/ctl.sock U=$(uri "$T/nbd.sock")
start_chain "$S" "$C" file="$T/base.img" chain="$T/disk.chain" chain-create=true

RANDOM=77
# writes N: N random 4k-aligned writes to the export (then flush) and to the
# model, one qemu-io run each
writes() {
  local i off len cmds=() a=() c
  for i in $(seq "$1"); do
    off=$(( (RANDOM % (SIZE / 4096)) * 4096 )) len=$(( (1 + RANDOM % 256) * 4096 ))
    [ $((off + len)) -le $SIZE ] || len=$((SIZE - off))
    cmds+=("write -P $((1 + RANDOM % 255)) $off $len")
  done
  qio "$U" "${cmds[@]}" flush
  for c in "${cmds[@]}"; do a+=(-c "$c"); done
  qemu-io -f raw "$T/model.img" "${a[@]}" >/dev/null
}
ctl_ok "$C" '{"execute":"snapshot"}' >/dev/null
writes 40
ctl_ok "$C" '{"execute":"snapshot"}' >/dev/null
writes 40

# 2 MiB/s: the commit is still copying when we kill it.
ctl_ok "$C" '{"execute":"commit","arguments":{"base":0,"speed":2097152}}' >/dev/null
writes 1
sleep 0.5
st=$(ctl_ok "$C" '{"execute":"status"}')
echo "$st" | jq -e '.chain.operation.state == "running" and .chain.operation.done > 0' >/dev/null ||
  fail "commit not running mid-way: $st"
kill9 "$NBDKIT_PID"

start_chain "$S" "$C" file="$T/base.img" chain="$T/disk.chain"
st=$(ctl_ok "$C" '{"execute":"status"}')
assert_eq "overlays after crash (commit undone)" 2 "$(echo "$st" | jq -r .overlays)"
compare_export "$U" "$T/model.img"
writes 1
ctl_ok "$C" '{"execute":"commit","arguments":{"base":0}}' >/dev/null
assert_eq "commit after restart" completed "$(wait_commit "$C")"
compare_export "$U" "$T/model.img"
ctl_ok "$C" '{"execute":"snapshot"}' >/dev/null
writes 1
kill "$NBDKIT_PID"; wait "$NBDKIT_PID" 2>/dev/null || true

# --- bad chains: nbdkit must refuse to start, naming the problem
try_start() {   # try_start EXPECTED-REGEX [PARAM...]
  local want=$1; shift
  rm -f "$S" "$C"
  if timeout 20 "${NBDKIT[@]}" -f -U "$S" "$CHAIN_PLUGIN" chain="$T/disk.chain" \
       control="$C" "$@" --run true 2>"$T/err"; then
    fail "nbdkit served a bad chain ($want)"
  fi
  grep -Eq "$want" "$T/err" || fail "error does not match '$want': $(cat "$T/err")"
  log "refused as expected: $(grep -E "$want" "$T/err" | head -1)"
}
cp "$T/disk.chain" "$T/good.chain"
sed -i 's/"size"/"sizE"/' "$T/disk.chain"
try_start 'bad checksum|"size" missing'
head -c 40 "$T/good.chain" > "$T/disk.chain"
try_start 'not valid JSON|truncated'
cp "$T/good.chain" "$T/disk.chain"
top=$(jq -r '.layers[-1]' "$T/disk.chain")
mv "$T/$top" "$T/$top.hidden"
try_start "$top.*No such file"
mv "$T/$top.hidden" "$T/$top"
cp --sparse=always "$T/$top.data" "$T/saved.data"
truncate -s 1M "$T/$top.data"
try_start 'wrong size'
mv "$T/saved.data" "$T/$top.data"
truncate -s $((SIZE + 4096)) "$T/base.img"
try_start 'base.*wrong size'
truncate -s $SIZE "$T/base.img"
# A missing descriptor is an error naming it, also with file= (which once
# made a new, empty chain over the base: the overlays' data vanished);
# chain-create=true is for a new chain and needs file=.
mv "$T/disk.chain" "$T/saved.chain"
try_start "$T/disk.chain: No such file.*not creating a new empty chain" file="$T/base.img"
[ -e "$T/disk.chain" ] && fail "a new chain was created in place of the missing one"
try_start 'chain-create=true needs file=' chain-create=true
[ -e "$T/disk.chain" ] && fail "a chain was created without file="
mv "$T/saved.chain" "$T/disk.chain"
# chain-create=true with an existing descriptor opens it as it is
start_chain "$S" "$C" file="$T/base.img" chain="$T/disk.chain" chain-create=true
compare_export "$U" "$T/model.img"
kill "$NBDKIT_PID"; wait "$NBDKIT_PID" 2>/dev/null || true
# and the good chain still serves the right content
start_chain "$S" "$C" chain="$T/disk.chain"
compare_export "$U" "$T/model.img"
log "OK: crash mid-commit undone and re-run; bad chains refused"
