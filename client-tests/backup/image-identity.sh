#!/bin/bash
# cbw — client-tests/backup/image-identity.sh: `cbw disk add` tells images
# apart by device + inode, never by name, and `cbw disk remove` deletes only
# the files cbwd made for the disk.
#  - a hard link, a symbolic link and a path through a symlinked directory
#    of a served image are refused ("already served as disk vda"), and so is
#    an image that is a file of cbwd's state directory (by path or through a
#    hard link) or a layer file of another disk's overlay chain kept outside
#    the state directory;
#  - a chain inside another disk's directory or inside the state directory
#    is refused (a disk's directory goes with the disk);
#  - `disk remove` of a disk whose directory holds a file cbwd did not make
#    leaves that file (content intact), reports it (text and --json "left")
#    and deletes only its own files; a disk with its own (committed, empty)
#    overlay chain leaves nothing behind.
. "$(dirname "$0")/lib.sh"
need_modules noprobe
requires jq
[ "$PLUGIN" = chain ] || skip "needs the chain plugin (overlays)"

truncate -s 16M "$T/a.img" "$T/c.img" "$T/d.img" "$T/e.img"
start_orchd
expect_rc 0 "$CBW" disk add vda --file "$T/a.img"

# Other names of the served image.
ln "$T/a.img" "$T/hard.img"
ln -s "$T/a.img" "$T/sym.img"
ln -s "$T" "$T/dirlink"
for f in "$T/hard.img" "$T/sym.img" "$T/dirlink/a.img"; do
  expect_rc 1 "$CBW" disk add vdb --file "$f"
  grep -q "Exists.*already served as disk vda" <<<"$ERR" || fail "$f: $ERR"
done
# Files of cbwd itself.
expect_rc 1 "$CBW" disk add vdb --file "$STATE/disks/vda/nbdkit.log"
grep -q "InvalidParameter: image $STATE/disks/vda/nbdkit.log is a file in cbwd's state directory" <<<"$ERR" ||
  fail "state file by path: $ERR"
ln "$STATE/disks/vda/bitmaps.json.lock" "$T/bm-link.img"
expect_rc 1 "$CBW" disk add vdb --file "$T/bm-link.img"
grep -q "is a file in cbwd's state directory (same device and inode as $STATE/disks/vda/bitmaps.json.lock)" <<<"$ERR" ||
  fail "hard link of a bitmap descriptor: $ERR"

# A layer file of another disk's chain kept outside the state directory.
mkdir "$T/ch"
expect_rc 0 "$CBW" disk add vdd --file "$T/d.img" --chain "$T/ch/vdd.chain"
expect_rc 0 "$CBW" disk snapshot vdd
layer=$("$CBW" --json disk chain vdd | jq -r '.layers[-1].name')
data=$(jq -r .data "$T/ch/$layer")
[ -f "$T/ch/$data" ] || fail "no data file $T/ch/$data for layer $layer"
ln "$T/ch/$data" "$T/overlay-link.img"
expect_rc 1 "$CBW" disk add vdb --file "$T/overlay-link.img"
grep -q "is the data file of overlay $layer of disk vdd's chain" <<<"$ERR" || fail "overlay data file: $ERR"

# Chains inside the state directory.
expect_rc 1 "$CBW" disk add vde --file "$T/e.img" --chain "$STATE/disks/vda/vde.chain"
grep -q "InvalidParameter.*inside cbwd's state directory" <<<"$ERR" || fail "chain in vda's dir: $ERR"
expect_rc 1 "$CBW" disk add vde --file "$T/e.img" --chain "$STATE/new/sub/vde.chain"
grep -q "inside cbwd's state directory" <<<"$ERR" || fail "chain in the state dir: $ERR"
[ ! -e "$STATE/new" ] || fail "a refused disk-add created $STATE/new"
expect_rc 1 "$CBW" disk add vde --file "$T/e.img" --chain "$T/dirlink/state/disks/vda/vde.chain"
grep -q "inside cbwd's state directory" <<<"$ERR" || fail "chain via a symlinked dir: $ERR"
[ "$("$CBW" --json disk list | jq -r '[.disks[].name] | join(",")')" = vda,vdd ] ||
  fail "a refused disk was added"

# disk remove leaves what it did not make, and says so.
echo precious > "$STATE/disks/vda/notes.txt"
touch "$STATE/disks/vda/bitmaps.json.lost-1700000000"   # as `disk repair` keeps one
expect_rc 0 "$CBW" disk remove vda
grep -qF "left in place (not made by cbwd): $STATE/disks/vda/notes.txt" "$T/out" ||
  fail "foreign file not reported: $(cat "$T/out")"
[ "$(cat "$STATE/disks/vda/notes.txt")" = precious ] || fail "foreign file deleted or changed"
for f in nbd.sock chain.ctl cbw.ctl dirtybitmap.ctl nbdkit.log bitmaps.json; do
  [ ! -e "$STATE/disks/vda/$f" ] || fail "$f of vda left behind"
done
[ "$(ls "$STATE/disks/vda")" = notes.txt ] || fail "vda's dir: $(ls "$STATE/disks/vda")"
# the --json form lists it too; a disk re-added over the leftover directory works
expect_rc 0 "$CBW" disk add vda --file "$T/a.img"
expect_rc 0 "$CBW" --json disk remove vda
jq -e --arg p "$STATE/disks/vda/notes.txt" '.left == [$p]' "$T/out" >/dev/null ||
  fail "--json left: $(cat "$T/out")"
[ -f "$T/a.img" ] || fail "image removed"

# A disk with its own chain, committed: nothing of it remains.
expect_rc 0 "$CBW" disk add vdc --file "$T/c.img" --overlays
expect_rc 0 "$CBW" disk snapshot vdc
expect_rc 0 "$CBW" disk commit vdc --wait
expect_rc 0 "$CBW" --json disk remove vdc
jq -e '.left == []' "$T/out" >/dev/null || fail "vdc left: $(cat "$T/out")"
[ ! -e "$STATE/disks/vdc" ] || fail "vdc's directory left: $(find "$STATE/disks/vdc")"
log "OK"
