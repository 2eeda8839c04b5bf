#!/bin/bash
# cbw — client-tests/overlay/disk-chains.sh: the files of disks' overlay
# chains, through the real `cbw` CLI, cbwd-orch and nbdkit:
#  - two disks whose chains are ch/vm.chain.json and ch/vm.chain (same stem)
#    take snapshots in turn; every write to either, before and after the
#    other's snapshot, is still there (also after a restart of both);
#  - files already at the names an old-style layer or descriptor temp would
#    take are never truncated or replaced by a snapshot;
#  - a missing chain descriptor makes `cbw disk start` fail naming it, and
#    nothing is created: no new empty chain, the overlays and the image stay
#    as they were; with the file back the disk serves its data again;
#  - a layer (descriptor or data file) that is missing or truncated: `disk
#    start` fails naming the file, nothing is recreated.
#  - a chain kept in the state directory whose descriptor is lost while its
#    layers remain: `disk remove` is refused (it would delete them); one
#    that never had a layer (an interrupted disk add) can be removed.
. "$(dirname "$0")/../backup/lib.sh"
need_modules noprobe
[ "$PLUGIN" = chain ] || skip "the chain plugin is not built (overlays need it)"
requires qemu-io
requires jq

MiB=$((1 << 20))
head -c $((8 * MiB)) /dev/urandom > "$T/a.img"
head -c $((8 * MiB)) /dev/urandom > "$T/b.img"
mkdir "$T/ch"
CA=$T/ch/vm.chain.json CB=$T/ch/vm.chain
start_orchd

# w DISK PATTERN OFF LEN / r DISK PATTERN OFF LEN: write / check through NBD
w() { qemu-io -f raw -c "write -P $2 $3 $4" "$(disk_uri "$1")" >/dev/null || fail "write $*"; }
r() {
  qemu-io -f raw -c "read -P $2 $3 $4" "$(disk_uri "$1")" >"$T/rd" 2>&1 ||
    fail "disk $1: pattern $2 at $3+$4 lost: $(grep -m1 -i 'fail\|pattern\|error' "$T/rd")"
}
WA=() WB=()          # "PATTERN OFF LEN" of every write, per disk
wa() { w da "$@"; WA+=("$*"); }
wb() { w db "$@"; WB+=("$*"); }
check_all() {
  local x
  for x in "${WA[@]}"; do r da $x; done
  for x in "${WB[@]}"; do r db $x; done
}
layers() { jq -r '.layers[]' "$1"; }
# start RC DISK: `cbw disk start DISK` must exit RC (stderr in $ERR).
start() { expect_rc "$1" "$CBW" disk start "$2"; }

expect_rc 0 "$CBW" disk add da --file "$T/a.img" --chain "$CA"
expect_rc 0 "$CBW" disk add db --file "$T/b.img" --chain "$CB"

log "section: two chains with the same stem, snapshots in turn"
wa 0x11 $((1 * MiB)) 64k                    # in da's base
wb 0x21 $((1 * MiB)) 64k                    # in db's base
for round in 1 2; do
  expect_rc 0 "$CBW" disk snapshot da
  wa $((0x30 + round)) $((round * 2 * MiB)) 192k    # in da's new top
  expect_rc 0 "$CBW" disk snapshot db                # must not touch da's files
  wb $((0x40 + round)) $((round * 2 * MiB + 4096)) 128k
  wa $((0x50 + round)) $((round * 2 * MiB + MiB)) 64k
  check_all
done
[ -z "$(comm -12 <(layers "$CA" | sort) <(layers "$CB" | sort))" ] ||
  fail "the chains share layer names: $(comm -12 <(layers "$CA" | sort) <(layers "$CB" | sort))"
for d in da db; do expect_rc 0 "$CBW" disk stop $d; done
for d in da db; do start 0 $d; done
check_all
for d in da db; do
  expect_rc 0 "$CBW" --json disk chain $d
  jq -e '.overlays == 2' "$T/out" >/dev/null || fail "disk $d: $(cat "$T/out")"
done

log "section: planted files at the old layer names are never touched"
g=$(jq -r .generation "$CA")
old=$T/ch/vm.chain.ov$((g + 1)).json        # the name the next layer once got
for f in "$old" "$old.data" "$old.map" "$CA.tmp" "$CB.tmp"; do
  echo "planted: $f" > "$f"
done
expect_rc 0 "$CBW" disk snapshot da
expect_rc 0 "$CBW" disk snapshot db
wa 0x61 $((7 * MiB)) 64k
wb 0x62 $((7 * MiB)) 64k
for f in "$old" "$old.data" "$old.map" "$CA.tmp" "$CB.tmp"; do
  [ "$(cat "$f" 2>/dev/null)" = "planted: $f" ] || fail "$f was overwritten or removed"
done
check_all

log "section: a missing chain descriptor is an error, nothing is created"
expect_rc 0 "$CBW" disk stop da
snap_files() { (cd "$T/ch" && find . -type f ! -name 'vm.chain.json' -exec md5sum {} + | sort); }
snap_files > "$T/files.before"
md5sum < "$T/a.img" > "$T/img.before"
mv "$CA" "$T/saved.chain.json"
start 1 da
grep -q "$CA" <<<"$ERR" || fail "disk start does not name the missing descriptor: $ERR"
grep -qi "missing\|No such file" <<<"$ERR" || fail "disk start does not say what is wrong: $ERR"
log "refused as expected: $ERR"
[ -e "$CA" ] && fail "disk start created a new chain descriptor: $(cat "$CA")"
snap_files | cmp -s - "$T/files.before" || fail "overlay files changed by the failed start"
md5sum < "$T/a.img" | cmp -s - "$T/img.before" || fail "image changed by the failed start"
expect_rc 0 "$CBW" --json disk list
jq -e '.disks[] | select(.name == "da") | .state != "running"' "$T/out" >/dev/null ||
  fail "da running without its chain: $(cat "$T/out")"
# a corrupt (truncated) descriptor: the same, naming the file
head -c 50 "$T/saved.chain.json" > "$CA"
start 1 da
grep -q "$CA" <<<"$ERR" || fail "disk start does not name the corrupt descriptor: $ERR"
mv "$T/saved.chain.json" "$CA"
start 0 da
check_all

log "section: a missing or truncated layer is an error, nothing is recreated"
expect_rc 0 "$CBW" disk stop da
top=$(jq -r '.layers[-1]' "$CA")
data=$(jq -r .data "$T/ch/$top")
mv "$T/ch/$top" "$T/saved.desc"
start 1 da
grep -q "$top" <<<"$ERR" || fail "disk start does not name the missing layer: $ERR"
[ -e "$T/ch/$top" ] && fail "the missing layer descriptor was recreated"
mv "$T/saved.desc" "$T/ch/$top"
mv "$T/ch/$data" "$T/saved.data"
start 1 da
grep -q "$data" <<<"$ERR" || fail "disk start does not name the missing data file: $ERR"
[ -e "$T/ch/$data" ] && fail "the missing data file was recreated"
cp --sparse=always "$T/saved.data" "$T/ch/$data"
truncate -s $((4 * MiB)) "$T/ch/$data"
start 1 da
grep -q "$data.*wrong size" <<<"$ERR" || fail "disk start does not report the truncated data file: $ERR"
mv "$T/saved.data" "$T/ch/$data"
snap_files | grep -v "$top" > "$T/files.now"
grep -v "$top" "$T/files.before" | cmp -s - "$T/files.now" || fail "other overlay files changed"
start 0 da
check_all
log "section: a chain in the state directory whose descriptor is lost is not removed"
head -c $((4 * MiB)) /dev/urandom > "$T/c.img"
truncate -s $((4 * MiB)) "$T/d.img"
expect_rc 0 "$CBW" disk add dc --file "$T/c.img" --overlays
expect_rc 0 "$CBW" disk add dd --file "$T/d.img" --overlays
CC=$STATE/disks/dc/overlays/dc.chain CD=$STATE/disks/dd/overlays/dd.chain
[ -f "$CC" ] && [ -f "$CD" ] || fail "disk add did not create the chains"
expect_rc 0 "$CBW" disk snapshot dc
w dc 0x77 $((1 * MiB)) 128k
for d in dc dd; do expect_rc 0 "$CBW" disk stop $d; done
mv "$CC" "$T/saved-dc.chain"
start 1 dc
grep -q "$CC" <<<"$ERR" || fail "disk start does not name the missing descriptor: $ERR"
expect_rc 1 "$CBW" disk remove dc
grep -q "Busy.*$CC.*missing" <<<"$ERR" || fail "remove with a lost descriptor: $ERR"
ls "$STATE"/disks/dc/overlays/dc.chain.ov-*.data >/dev/null || fail "dc's overlay files are gone"
mv "$T/saved-dc.chain" "$CC"
start 0 dc
r dc 0x77 $((1 * MiB)) 128k
# dd's chain never had a layer (as after a disk-add interrupted before its
# first start): without its descriptor it is refused at start, and removable.
rm "$CD"
start 1 dd
expect_rc 0 "$CBW" disk remove dd
log "OK: same-stem chains keep their data; planted files untouched; lost descriptors and layers refused"
