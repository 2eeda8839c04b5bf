#!/bin/bash
# cbw — client-tests/overlay/disk-commit.sh: every commit a user runs with
# `cbw disk commit`, through the real CLI, cbwd-orch and nbdkit, while
# qemu-io writes to the disk (each write also goes to a raw model of the
# disk, and every batch is flushed):
#  - LAYER arguments: unknown names, indices out of range, --top 0, a --base
#    that is the active layer or not below --top are refused naming the
#    problem, and the chain is unchanged;
#  - intermediate commit (image <- a <- b <- c <- d, guest on d; --base 0
#    --top c, by name): while it copies, the disk read whole by nbdcopy equals
#    the model after every write batch; afterwards the chain is image <- d;
#  - a final full commit makes the image itself equal to the model;
#  - make-empty (--keep) of the active layer keeps it as the top, emptied,
#    taking writes; a second --keep merge works; --keep of an intermediate
#    range empties the range and keeps it;
#  - commit-cancel of an intermediate, a make-empty and a delete commit
#    leaves the chain as it was and the disk equal to the model.
. "$(dirname "$0")/../backup/lib.sh"
need_modules noprobe
[ "$PLUGIN" = chain ] || skip "the chain plugin is not built (overlays need it)"
requires qemu-io
requires nbdcopy
requires jq

MiB=$((1 << 20))
SIZE=$((32 * MiB))
head -c $SIZE /dev/urandom > "$T/img.raw"
cp "$T/img.raw" "$T/model.raw"
start_orchd
expect_rc 0 "$CBW" disk add vda --file "$T/img.raw" --overlays
U=$(disk_uri vda)

RANDOM=1818
# writes N: N random 4k-aligned writes (1 in 6 write-zeroes) to the disk,
# flushed, then to the model.
writes() {
  local i off len cmds=() a=() c
  for i in $(seq "$1"); do
    off=$(( (RANDOM % (SIZE / 4096)) * 4096 )) len=$(( (1 + RANDOM % 128) * 4096 ))
    [ $((off + len)) -le $SIZE ] || len=$((SIZE - off))
    if [ $((RANDOM % 6)) = 0 ]; then cmds+=("write -z $off $len")
    else cmds+=("write -P $((1 + RANDOM % 255)) $off $len"); fi
  done
  cmds+=(flush)
  for c in "${cmds[@]}"; do a+=(-c "$c"); done
  qemu-io -f raw "$U" "${a[@]}" >/dev/null || fail "writes to the disk failed"
  qemu-io -f raw "$T/model.raw" "${a[@]}" >/dev/null
}
# same: the whole disk, read by nbdcopy, equals the model
same() {
  nbdcopy "$U" "$T/read.raw" || fail "nbdcopy of the disk failed"
  cmp -s "$T/read.raw" "$T/model.raw" || fail "$1: the disk differs from the model"
}
chain() { "$CBW" --json disk chain vda; }
names() { chain | jq -r '[.layers[].name] | join(" ")'; }
overlays() { chain | jq -r .overlays; }
op_state() { chain | jq -r '.operation.state // "none"'; }
# snap LABEL: snapshot; prints nothing, the new layer's name is in $LAYER
snap() {
  expect_rc 0 "$CBW" --json disk snapshot vda --label "$1"
  LAYER=$(jq -r .layer "$T/out")
}
# refuse ERR-REGEX ARGS...: `cbw disk commit vda ARGS` exits 1 naming the
# problem, and the chain is unchanged.
refuse() {
  local want=$1 before; shift
  before=$(names)
  expect_rc 1 "$CBW" disk commit vda "$@"
  echo "$ERR" | grep -Eq "$want" || fail "commit $*: error '$ERR' does not match '$want'"
  assert_eq "chain after refused commit $*" "$before" "$(names)"
}
# during_commit: write batches while the commit runs, the disk equal to the
# model after each; fails if the commit ended before the first check (the
# test would not have tested a concurrent commit).
during_commit() {
  local n=0
  writes 5
  [ "$(op_state)" = running ] || fail "the commit was not running during the writes"
  while [ "$(op_state)" = running ]; do
    same "during the commit (batch $n)"
    writes 5
    n=$((n + 1))
    [ $n -lt 200 ] || fail "the commit did not end"
  done
  log "  $n write batches during the commit"
}

log "section: image <- a <- b <- c <- d"
writes 10
snap a; A=$LAYER; writes 20
snap b; B=$LAYER; writes 20
snap c; Cn=$LAYER; writes 20
snap d; D=$LAYER; writes 10
same "before any commit"
IMG=$(chain | jq -r '.layers[0].name')

log "section: bad LAYER arguments"
refuse "no layer of that name" --top nosuch
refuse "no layer of that name" --base nosuch --top "$Cn"
refuse "layers are 0\.\.4" --top 5
refuse "layers are 0\.\.4" --base 7
refuse "is the image" --top 0
refuse "is the active layer" --base 4
refuse "is the active layer" --base "$D" --top "$D"
refuse "is not below --top" --base 3 --top 2
refuse "is not below --top" --base "$B" --top "$B"
refuse "empty layer" --top ""
expect_rc 2 "$CBW" disk commit vda --top          # missing value: usage error

log "section: intermediate commit --base 0 --top c (by name), guest writing to d"
expect_rc 0 "$CBW" --json disk commit vda --base "$IMG" --top "$Cn" --speed 4M
jq -e '.lo == 1 and .hi == 3 and .active == false and .mode == "delete"' "$T/out" >/dev/null ||
  fail "commit reply: $(cat "$T/out")"
during_commit
assert_eq "intermediate commit" completed "$(op_state)"
assert_eq "chain after the intermediate commit" "$IMG $D" "$(names)"
same "after the intermediate commit"

log "section: final full commit: the image equals the disk"
writes 5
expect_rc 0 "$CBW" disk commit vda --speed 8M --wait
assert_eq overlays 0 "$(overlays)"
expect_rc 0 "$CBW" disk stop vda
cmp -s "$T/img.raw" "$T/model.raw" || fail "the image after the final commit differs from the model"
expect_rc 0 "$CBW" disk start vda

log "section: make-empty (--keep) of the active layer, twice"
snap k; K=$LAYER
writes 40
expect_rc 0 "$CBW" --json disk commit vda --keep --speed 4M
jq -e '.lo == 1 and .hi == 1 and .active and .mode == "make-empty"' "$T/out" >/dev/null ||
  fail "keep reply: $(cat "$T/out")"
during_commit
assert_eq "make-empty commit" completed "$(op_state)"
assert_eq "chain after --keep" "$IMG $K" "$(names)"
same "after --keep"
writes 20                                  # the kept top takes writes
[ "$(chain | jq -r '.layers[1].allocated_bytes')" -gt 0 ] || fail "the kept top took no writes"
same "writes after --keep"
expect_rc 0 "$CBW" disk commit vda --keep --wait
assert_eq "chain after the second --keep" "$IMG $K" "$(names)"
# (no write since the switch: the top is empty)
assert_eq "emptied top" 0 "$(chain | jq -r '.layers[1].allocated_bytes + .layers[1].zero_bytes')"
same "after the second --keep"
writes 5
same "writes after the second --keep"

log "section: --keep of an intermediate range"
snap l; L=$LAYER; writes 20
snap m; M=$LAYER; writes 10
expect_rc 0 "$CBW" --json disk commit vda --base 0 --top "$L" --keep --speed 4M
jq -e '.lo == 1 and .hi == 2 and (.active | not) and .mode == "make-empty"' "$T/out" >/dev/null ||
  fail "keep range reply: $(cat "$T/out")"
during_commit
assert_eq "chain after --keep of 1..2" "$IMG $K $L $M" "$(names)"
assert_eq "emptied range" 0 "$(chain | jq -r '[.layers[1,2] | .allocated_bytes + .zero_bytes] | add')"
same "after --keep of a range"

log "section: commit-cancel of each kind"
expect_rc 0 "$CBW" disk commit vda --base 0 --wait
snap x; writes 40
snap y; writes 40
snap z; writes 40
for kind in "--base 0 --top 2" "--keep" "" "--base 1 --top 2 --keep"; do
  before=$(names)
  # shellcheck disable=SC2086
  expect_rc 0 "$CBW" disk commit vda $kind --speed 256K
  writes 3
  [ "$(op_state)" = running ] || fail "commit $kind was not running at cancel"
  expect_rc 0 "$CBW" disk commit-cancel vda
  for i in $(seq 100); do [ "$(op_state)" = running ] || break; sleep 0.1; done
  assert_eq "commit $kind after cancel" cancelled "$(op_state)"
  assert_eq "chain after cancel of $kind" "$before" "$(names)"
  same "after cancel of $kind"
done
expect_rc 1 "$CBW" disk commit-cancel vda
echo "$ERR" | grep -q "no commit is running" || fail "cancel without a commit: $ERR"

log "section: everything into the image; it equals the disk"
expect_rc 0 "$CBW" disk commit vda --base 0 --wait
assert_eq overlays 0 "$(overlays)"
expect_rc 0 "$CBW" disk stop vda
cmp -s "$T/img.raw" "$T/model.raw" || fail "the image after the last commit differs from the model"
log "OK: intermediate, make-empty and delete commits under writes; cancel of each; bad layers refused"
