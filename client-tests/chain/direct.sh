#!/bin/bash
# cbw — client-tests/chain/direct.sh: direct=true (O_DIRECT) with requests
# of any alignment.
#  1. random unaligned reads/writes (also over the last, partial block of a
#     file whose size is not a multiple of the alignment) against a model;
#  2. many concurrent 1-byte writes to distinct bytes of the same blocks (the
#     read-modify-write race): none may be lost;
#  3. the file equals the model, its size unchanged; O_DIRECT really in use.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/chain-lib.sh"

SEED=${SEED:-$RANDOM}
log "seed $SEED"
img=$T/disk.img
SIZE=$((4 * 1024 * 1024 + 1000))          # not a multiple of 512 or 4096
head -c $SIZE /dev/urandom > "$img"
cp "$img" "$T/model.img"
if [ "$CTL_OK" = 1 ]; then
  start_chain nbd file="$img" direct=true control="$T/ctl.sock"
  st=$(ctl "$T/ctl.sock" '{"execute":"status"}')
  echo "$st" | jq -e '.return.direct == true and .return.flags.align >= 512' >/dev/null \
    || fail "status does not show direct I/O: $st"
else
  start_chain nbd file="$img" direct=true
fi
# the fd really is O_DIRECT (flags in /proc/PID/fdinfo, octal 040000)
pid=$NBDKIT_PID
for p in $(pgrep -P "$pid") ; do pid=$p; done   # sanitizer build: env → nbdkit
found=0
for fd in /proc/$pid/fd/*; do
  [ "$(readlink "$fd")" = "$img" ] || continue
  fl=$(awk '/^flags/{print $2}' /proc/$pid/fdinfo/${fd##*/})
  (( 0$fl & 040000 )) && found=1
done
[ $found = 1 ] || fail "no O_DIRECT fd open on $img"

nbd_py "$URI" "$SEED" "$T/model.img" <<'PYEOF'
import nbd, random, sys
uri, seed, model_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = bytearray(open(model_path, "rb").read())
size = len(model)
r = random.Random(seed)
h = nbd.NBD(); h.connect_uri(uri)
assert h.get_size() == size
def rnd_range():
    k = r.random()
    if k < 0.2:                                   # at the very end
        ln = r.randrange(1, 6000); return size - ln, ln
    ln = r.choice([1, 7, 511, 513, 4095, 4097, 65536 + 3, r.randrange(1, 300000)])
    return r.randrange(size - ln), ln
for i in range(300):
    off, ln = rnd_range()
    if r.random() < 0.5:
        data = r.randbytes(ln)
        h.pwrite(data, off, nbd.CMD_FLAG_FUA if r.random() < 0.1 else 0)
        model[off:off + ln] = data
    else:
        got = h.pread(ln, off)
        if got != bytes(model[off:off + ln]):
            sys.exit(f"read mismatch at {off}+{ln} (seed {seed})")
# concurrent single-byte writes into the same blocks, including the tail
blocks = [0, 4096 * 7, size - 1000 - 4096, size - 1000]
cmds = []
for b in blocks:
    for j in range(0, min(4096, size - b), 37):
        cmds.append(b + j)
r.shuffle(cmds)
pending = []
for n, off in enumerate(cmds):
    v = bytes([(off * 7 + 1) & 255])
    h.aio_pwrite(v, off)
    model[off] = v[0]
    while h.aio_in_flight() >= 32:
        h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
for b in blocks:
    ln = min(8192, size - b)
    if h.pread(ln, b) != bytes(model[b:b + ln]):
        sys.exit(f"concurrent RMW lost a write near {b}")
# zero / trim in direct mode, unaligned
h.zero(5000, 1234); model[1234:6234] = bytes(5000)
h.trim(3 * 4096, 8192)                           # advisory: content undefined
model[8192:8192 + 3 * 4096] = h.pread(3 * 4096, 8192)
h.zero(100, size - 100); model[size - 100:] = bytes(100)
if h.pread(size, 0) != bytes(model):
    sys.exit("final image mismatch")
h.shutdown()
open(model_path, "wb").write(model)
print(f"{len(cmds)} concurrent 1-byte writes ok", file=sys.stderr)
PYEOF
stop_nbdkit "$NBDKIT_PID"
assert_eq "size unchanged" "$SIZE" "$(stat -c %s "$img")"
cmp "$img" "$T/model.img" || fail "file differs from model (seed $SEED)"
log "ok"
