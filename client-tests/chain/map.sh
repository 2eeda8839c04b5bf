#!/bin/bash
# cbw — client-tests/chain/map.sh: block status (nbdinfo --map) after writes,
# trims and zeroes matches a model of what the file must look like.
# Operations are 64 KiB aligned (whole filesystem blocks), so the model is
# exact: written -> data (0), trimmed or zeroed with trim allowed -> hole,zero
# (3).  Zeroes with NO_HOLE are checked for content (they may be unwritten
# extents or data depending on the filesystem) and excluded from the map.
# On tmpfs (no FALLOC_FL_ZERO_RANGE) a FAST_ZERO|NO_HOLE must fail with
# ENOTSUP and never write anything, while a plain NO_HOLE zero succeeds.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/chain-lib.sh"
requires nbdinfo
requires jq

SEED=${SEED:-$RANDOM}
log "seed $SEED"
img=$T/disk.img
truncate -s 8M "$img"
start_chain nbd file="$img"

# Apply random ops through libnbd and print the model's map as
# "offset length type" runs; unknown units are printed as type "?".
nbd_py "$URI" "$SEED" > "$T/model.map" <<'PYEOF'
import nbd, random, sys
uri, seed = sys.argv[1], int(sys.argv[2])
h = nbd.NBD(); h.connect_uri(uri)
size = h.get_size(); U = 65536; n = size // U
r = random.Random(seed)
state = ["3"] * n            # 3 = hole,zero ; 0 = data ; ? = zero (NO_HOLE)
content = [0] * n            # byte value of each unit
for i in range(200):
    a = r.randrange(n); b = min(n, a + r.randrange(1, 8))
    off, ln = a * U, (b - a) * U
    op = r.random()
    if op < 0.5:
        v = r.randrange(1, 256)
        h.pwrite(bytes([v]) * ln, off)
        for u in range(a, b): state[u] = "0"; content[u] = v
    elif op < 0.7:
        h.trim(ln, off)
        # trim is advisory; on a file it punches a hole, so the model is exact
        for u in range(a, b): state[u] = "3"; content[u] = 0
    elif op < 0.9:
        h.zero(ln, off)                          # may trim
        for u in range(a, b): state[u] = "3"; content[u] = 0
    else:
        h.zero(ln, off, nbd.CMD_FLAG_NO_HOLE)
        for u in range(a, b): state[u] = "?"; content[u] = 0
# content check of every unit
for u in range(n):
    got = h.pread(U, u * U)
    if got != bytes([content[u]]) * U:
        sys.exit(f"unit {u}: content mismatch (want {content[u]})")
h.shutdown()
i = 0
while i < n:
    j = i
    while j < n and state[j] == state[i]: j += 1
    print(i * U, (j - i) * U, state[i])
    i = j
PYEOF

nbdinfo --map --json "$URI" | jq -r '.[] | "\(.offset) \(.length) \(.type)"' > "$T/got.map"
# Compare unit by unit (runs may be split differently), skipping "?" units.
nbd_py "$T/model.map" "$T/got.map" <<'PYEOF'
import sys
U = 65536
def units(path):
    d = {}
    for line in open(path):
        off, ln, t = line.split()
        off, ln = int(off), int(ln)
        if off % U or ln % U:
            sys.exit(f"{path}: extent not 64k aligned: {line.strip()}")
        for u in range(off // U, (off + ln) // U): d[u] = t
    return d
want, got = units(sys.argv[1]), units(sys.argv[2])
if set(want) != set(got):
    sys.exit("map does not cover the disk exactly")
bad = [u for u in want if want[u] != "?" and want[u] != got[u]]
checked = sum(1 for u in want if want[u] != "?")
if bad:
    sys.exit(f"{len(bad)} units differ, first {bad[:5]}: want {[want[u] for u in bad[:5]]} got {[got[u] for u in bad[:5]]}")
print(f"map matches the model on {checked} units ({len(want) - checked} NO_HOLE units skipped)", file=sys.stderr)
PYEOF
holes=$(awk '$3=="3"{n++} END{print n+0}' "$T/model.map")
data=$(awk '$3=="0"{n++} END{print n+0}' "$T/model.map")
[ "$holes" -gt 0 ] && [ "$data" -gt 0 ] || fail "model too trivial (seed $SEED): $holes hole runs, $data data runs"
stop_nbdkit "$NBDKIT_PID"

# tmpfs: no ZERO_RANGE.  Fast zero without trim must be refused (ENOTSUP),
# slow zero must work (nbdkit writes zeroes), fast zero with trim punches.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
  shm=$(mktemp /dev/shm/cbw-map.XXXXXX)
  trap 'rm -f "$shm"; _cbw_cleanup' EXIT
  head -c 1M /dev/urandom > "$shm"
  start_chain shm file="$shm"
  nbd_py "$URI" <<'PYEOF'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
before = h.pread(65536, 0)
try:
    h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    zr = True
except nbd.Error as e:
    zr = False
    if e.errno not in ("ENOTSUP", "EOPNOTSUPP"):
        sys.exit(f"fast zero failed with {e.errno}, want ENOTSUP: {e}")
    if h.pread(65536, 0) != before:
        sys.exit("refused fast zero changed the data")
print("tmpfs fast zero (no hole):", "supported" if zr else "refused with ENOTSUP", file=sys.stderr)
h.zero(65536, 0, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(65536, 0) == bytes(65536), "slow zero did not zero"
h.pwrite(b"\x01" * 65536, 65536)
h.zero(65536, 65536, nbd.CMD_FLAG_FAST_ZERO)     # may trim: punch hole
assert h.pread(65536, 65536) == bytes(65536), "fast zero with trim did not zero"
PYEOF
  nbdinfo --map --json "$URI" | jq -e '.[] | select(.offset == 65536) | .type == 3' >/dev/null \
    || fail "punched range on tmpfs not reported as a hole"
fi
log "ok"
