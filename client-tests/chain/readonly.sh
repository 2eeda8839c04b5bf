#!/bin/bash
# cbw — client-tests/chain/readonly.sh: readonly=true serves the data, tells
# clients the export is read-only, rejects every kind of write, and leaves
# the file untouched; it also serves a file the server may not write.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/chain-lib.sh"
requires qemu-io

img=$T/disk.img
head -c 2M /dev/urandom > "$img"
sum=$(sha256sum < "$img")
chmod 0444 "$img"
start_chain ro file="$img" readonly=true

nbdinfo --json "$URI" | jq -e '.exports[0]."is_read_only" == true' >/dev/null \
  || fail "export not advertised read-only"
nbdcopy "$URI" "$T/copy.img" && cmp "$img" "$T/copy.img" || fail "read-only export reads wrong"
if qemu-io -f raw "$URI" -c 'write -P 0x33 0 4096' >"$T/qio.out" 2>&1 && \
   ! grep -qi 'error\|denied\|read-only' "$T/qio.out"; then
  fail "qemu-io write succeeded on a read-only export"
fi
nbd_py "$URI" <<'PYEOF'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
for name, f in [("pwrite", lambda: h.pwrite(b"x" * 512, 0)),
                ("zero", lambda: h.zero(4096, 0)),
                ("trim", lambda: h.trim(4096, 0))]:
    try:
        f()
    except nbd.Error as e:
        continue
    sys.exit(f"{name} succeeded on a read-only export")
h.flush()                                  # allowed, harmless
PYEOF
stop_nbdkit "$NBDKIT_PID"
assert_eq "file unchanged" "$sum" "$(sha256sum < "$img")"
log "ok"
