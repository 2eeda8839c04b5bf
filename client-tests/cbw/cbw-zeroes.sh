#!/bin/bash
# cbw-zeroes: copy accounting, checked on the target's own request log
# (nbdkit log filter):
#  - old data that is a hole or zeros goes to the target as write-zeroes;
#  - each block is copied at most once, however often the guest writes it;
#  - a guest write-zeroes and a trim copy before-hand like writes do.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/cbw-lib.sh"
size=$((16 * 1048576)) g=65536 M=1048576
truncate -s $size "$T/disk.img"                       # 0..8M: hole
head -c $((8 * M)) /dev/urandom | dd of="$T/disk.img" bs=1M seek=8 conv=notrunc status=none
cp "$T/disk.img" "$T/ref.img"
TGT_IMG=$T/tgt.img; truncate -s $size "$TGT_IMG"
start_nbdkit "$T/tgt.sock" --filter=log file "$TGT_IMG" logfile="$T/tgt.log"
TGT_PID=$NBDKIT_PID; TGT_URI="nbd+unix:///?socket=$T/tgt.sock"
start_live "$T/disk.img" cbw-granularity=$g
begin_full

"$CBW_IO" pwrite "$LIVE" 0 $M 1 >/dev/null            # 1 MiB of hole
"$CBW_IO" pwrite "$LIVE" $((8 * M)) $M 2 >/dev/null   # 1 MiB of data
"$CBW_IO" pwrite "$LIVE" $((8 * M)) 4096 3 >/dev/null # again: no new copy
"$CBW_IO" pwrite "$LIVE" $((8 * M + 8192)) 4096 4 >/dev/null
qemu-io -f raw -c "write -z $((10 * M)) $M" "$LIVE" >/dev/null   # guest write-zeroes
qemu-io -f raw -c "discard $((12 * M)) $M" "$LIVE" >/dev/null    # guest trim

wait_copies
st=$(ok_ctl '{"execute":"status"}')
assert_eq zero-bytes $M "$(jget "$st" '.return["zero-bytes"]')"
assert_eq copied-bytes $((3 * M)) "$(jget "$st" '.return["copied-bytes"]')"
assert_eq copied-blocks $((4 * M / g)) "$(jget "$st" '.return["copied-blocks"]')"
# The target saw: zero requests covering exactly the hole MiB, writes covering
# exactly the three data MiBs, each byte once.
python3 - "$T/tgt.log" $M <<'PYEOF' || fail "target request log does not match"
import re, sys
M = int(sys.argv[2]); w = {}; z = {}
for l in open(sys.argv[1]):
    m = re.search(r' (Write|Zero) id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)', l)
    if m and '...' in l:
        d = w if m.group(1) == 'Write' else z
        o, c = int(m.group(2), 16), int(m.group(3), 16)
        for b in range(o, o + c, 4096): d[b] = d.get(b, 0) + 1
want_w = {b for s in (8, 10, 12) for b in range(s * M, (s + 1) * M, 4096)}
want_z = set(range(0, M, 4096))
ok = set(w) == want_w and set(z) == want_z and max(w.values()) == 1 and max(z.values()) == 1
print("writes %d KiB, zeroes %d KiB, max copies per 4K %d" % (len(w) * 4, len(z) * 4, max(list(w.values()) + list(z.values()))))
sys.exit(0 if ok else 1)
PYEOF
nbdcopy "$PIT" "$T/pit.img"
cmp "$T/pit.img" "$T/ref.img" || fail "PIT view differs from the disk at begin"
# Block status of the PIT view: what it reports as zero must be zero in the
# copy taken at begin, it must cover the whole disk, and the untouched hole
# (1M..8M, still on the live disk) must be reported as a hole.
nbdinfo --map --json "$PIT" > "$T/map.json" || fail "block status on the PIT export failed"
python3 - "$T/map.json" "$T/ref.img" $size $M <<'PYEOF' || fail "PIT block status is wrong"
import json, sys
m = json.load(open(sys.argv[1])); ref = open(sys.argv[2], "rb").read()
size, M = int(sys.argv[3]), int(sys.argv[4]); pos = 0; hole_seen = False
for e in m:
    assert e["offset"] == pos, e; pos += e["length"]
    if e["type"] & 2:
        assert ref[e["offset"]:pos].count(0) == e["length"], ("zero claimed over data", e)
        if e["offset"] <= 4 * M < pos: hole_seen = True
assert pos == size, pos
assert hole_seen, "untouched hole not reported"
print("PIT map: %d extents" % len(m))
PYEOF
ok_ctl '{"execute":"end"}' >/dev/null
log PASS
