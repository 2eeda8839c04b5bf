#!/bin/bash
# cbw — client-tests/chain/io.sh: data written through the chain plugin by
# real clients reads back exactly, from the export and from the file.
#  1. qemu-io writes a random (seeded, printed) series of patterns at aligned
#     and unaligned offsets; a Python model applies the same writes; every
#     region is read back with qemu-io "read -P" and the file is compared
#     byte for byte with the model.
#  2. nbdcopy (multi-conn) copies a random image in and out: all three equal.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/chain-lib.sh"
requires qemu-io
requires nbdcopy

SIZE=$((16 * 1024 * 1024))
SEED=${SEED:-$RANDOM}
log "seed $SEED"
img=$T/disk.img
truncate -s $SIZE "$img"
start_chain nbd file="$img"

# The model: a list of qemu-io commands and the expected image.
nbd_py "$SEED" "$SIZE" "$T" <<'PYEOF'
import random, sys
seed, size, t = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
r = random.Random(seed)
model = bytearray(size)
writes, reads = [], []
for i in range(60):
    kind = r.random()
    if kind < 0.3:                      # aligned 4k..256k
        ln = r.choice([4096, 65536, 262144]); off = r.randrange(size // ln) * ln
    elif kind < 0.6:                    # unaligned small
        ln = r.randrange(1, 9000); off = r.randrange(size - ln)
    else:                               # unaligned large, crossing many blocks
        ln = r.randrange(1, 1 << 20); off = r.randrange(size - ln)
    pat = r.randrange(1, 256)
    model[off:off + ln] = bytes([pat]) * ln
    writes.append((pat, off, ln))
with open(t + "/writes.qio", "w") as f:
    for pat, off, ln in writes:
        f.write(f"write -P {pat} {off} {ln}\n")
# reads: every segment between write boundaries holds one byte value, so
# read -P can check it (adjacent equal segments merged).
cuts = sorted({0, size} | {o for _, o, _ in writes} | {o + l for _, o, l in writes})
with open(t + "/reads.qio", "w") as f:
    start = 0
    for a, b in zip(cuts, cuts[1:]):
        if b == size or model[b] != model[a]:
            f.write(f"read -P {model[start]} {start} {b - start}\n")
            start = b
open(t + "/model.img", "wb").write(model)
PYEOF

qio() {  # qemu-io on the export, one command file
  local cmds=()
  while read -r line; do cmds+=(-c "$line"); done < "$1"
  qemu-io -f raw "$URI" "${cmds[@]}" > "$T/qio.out" 2>&1 || { tail "$T/qio.out"; fail "qemu-io failed on $1"; }
  if grep -Eq "Pattern verification failed|error|failed" "$T/qio.out"; then
    grep -E "Pattern verification failed|error|failed" "$T/qio.out" | head >&2
    fail "qemu-io reported a mismatch or error ($1, seed $SEED)"
  fi
}
qio "$T/writes.qio"
nwrites=$(grep -c '^wrote' "$T/qio.out")
assert_eq "writes done" "$(wc -l < "$T/writes.qio")" "$nwrites"
qio "$T/reads.qio"
nreads=$(grep -c '^read' "$T/qio.out")
assert_eq "reads done" "$(wc -l < "$T/reads.qio")" "$nreads"
cmp "$img" "$T/model.img" || fail "file differs from the model (seed $SEED)"
log "qemu-io: $nwrites writes, $nreads pattern reads verified"

# nbdcopy round trip through 4 connections
head -c $SIZE /dev/urandom > "$T/src.img"
nbdcopy --connections=4 "$T/src.img" "$URI" || fail "nbdcopy in failed"
nbdcopy --connections=4 "$URI" "$T/out.img" || fail "nbdcopy out failed"
cmp "$T/src.img" "$T/out.img" || fail "nbdcopy round trip differs"
cmp "$T/src.img" "$img" || fail "served file differs from what was copied in"
log "nbdcopy round trip ok"
