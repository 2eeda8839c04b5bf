#!/bin/bash
# cbw — client-tests/cbwd/exports.sh: nbdinfo --list / --map / --map=qemu:
# dirty-bitmap and qemu-img map (x-dirty-bitmap) against a file export with
# bitmaps from an extents file and a raw bit array; every expectation comes
# from model.py, computed independently of cbwd.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/lib.sh"
requires nbdinfo; requires qemu-img; requires jq
M="python3 $(dirname "$0")/model.py"
SOCK=$T/cbwd.sock
SEED=${CBW_SEED:-$RANDOM}
log "seed $SEED"
SIZE=$((64 * 1024 * 1024 + 12345))   # not a multiple of the granularity
$M gen "$SEED" "$SIZE" 65536 "$T"

start_cbwd cbwd \
  --export "name=disk,type=file,path=$T/data.img,description=test disk,bitmap=backup-sda:extents:$T/dirty.txt,bitmap=bm-raw:raw:$T/dirty.bits:65536" \
  --export "name=other,type=store,path=$T/store.img,size=1M"

# --list: both exports, the description, the contexts.
nbdinfo --list --json "nbd+unix:///?socket=$SOCK" > $T/list.json
assert_eq "export names" "disk other" "$(jq -r '[.exports[]."export-name"] | sort | join(" ")' $T/list.json)"
assert_eq "description" "test disk" "$(jq -r '.exports[] | select(."export-name"=="disk") | .description' $T/list.json)"
assert_eq "disk contexts" "base:allocation qemu:allocation-depth qemu:dirty-bitmap:backup-sda qemu:dirty-bitmap:bm-raw" \
  "$(jq -r '.exports[] | select(."export-name"=="disk") | .contexts | sort | join(" ")' $T/list.json)"
assert_eq "disk size" "$SIZE" "$(jq -r '.exports[] | select(."export-name"=="disk") | ."export-size"' $T/list.json)"
assert_eq "disk read-only" "true" "$(jq -r '.exports[] | select(."export-name"=="disk") | .is_read_only' $T/list.json)"

# --map: base:allocation, dirty bitmaps.
# merge_runs: "start length flags" lines -> adjacent equal flags merged,
# anything at or past the export size dropped (qemu rounds the size up to 512).
merge_runs() {
  awk -v size="$SIZE" '$1 < size { if ($1 + $2 > size) $2 = size - $1;
      if (n && f == $3 && s + l == $1) { l += $2 } else { if (n) print s, l, f; s = $1; l = $2; f = $3; n = 1 } }
      END { if (n) print s, l, f }'
}
check_map() {  # CONTEXT KIND
  nbdinfo --json --map="$1" "$(uri disk)" > $T/map.json
  jq -r '.[] | "\(.offset) \(.length) \(.type)"' $T/map.json | merge_runs > $T/got
  diff -u $T/want.$2 $T/got >&2 || fail "nbdinfo --map=$1 differs from the model"
  log "nbdinfo --map=$1: $(wc -l < $T/want.$2) extents as expected"
}
check_map base:allocation alloc
check_map qemu:dirty-bitmap:backup-sda extents
check_map qemu:dirty-bitmap:bm-raw raw

# qemu-img map with x-dirty-bitmap (what libvirt-era tools use).
qemu-img map --output=json --image-opts \
  "driver=nbd,server.type=unix,server.path=$SOCK,export=disk,x-dirty-bitmap=qemu:dirty-bitmap:backup-sda" > $T/qmap.json
# with x-dirty-bitmap, qemu-img reports dirty areas as data=false
jq -r '.[] | "\(.start) \(.length) \(if .data then 0 else 1 end)"' $T/qmap.json | merge_runs > $T/got
diff -u $T/want.extents $T/got >&2 || fail "qemu-img map x-dirty-bitmap differs from the model"

# Small block-status requests at odd offsets (REQ_ONE and partial ranges) via nbdsh.
if python3 -c 'import nbd' 2>/dev/null; then
  python3 - "$SOCK" "$T" <<'PYEOF' || fail "REQ_ONE/partial block status"
import json, sys, nbd
sock, d = sys.argv[1], sys.argv[2]
m = json.load(open(d + "/model.json"))
size = m["size"]
dirty = []
for s, l in sorted((s, s + l) for s, l in m["ranges"]):
    if dirty and s <= dirty[-1][1]: dirty[-1][1] = max(dirty[-1][1], l)
    else: dirty.append([s, l])
def is_dirty(o): return any(s <= o < e for s, e in dirty)
h = nbd.NBD()
h.add_meta_context("qemu:dirty-bitmap:backup-sda")
h.connect_uri("nbd+unix:///disk?socket=" + sock)
import random
rnd = random.Random(1)
for _ in range(200):
    off = rnd.randrange(0, size - 1)
    cnt = rnd.randint(1, min(size - off, 4 << 20))
    got = []
    def cb(ctx, o, entries, err):
        got.extend(entries)
    h.block_status(cnt, off, cb, nbd.CMD_FLAG_REQ_ONE)
    assert len(got) == 2, got
    ln, fl = got
    assert 0 < ln <= cnt, (off, cnt, ln)
    # every byte of the extent has the reported state; the next byte differs or is past cnt
    for probe in (off, off + ln - 1):
        assert is_dirty(probe) == bool(fl & 1), (off, ln, fl, probe)
    if ln < cnt:
        assert is_dirty(off + ln) != bool(fl & 1), (off, ln, fl)
print("ok")
PYEOF
fi
stop_cbwd
