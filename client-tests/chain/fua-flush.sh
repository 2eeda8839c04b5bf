#!/bin/bash
# cbw — client-tests/chain/fua-flush.sh: FUA and flush reach the disk.
# The plugin runs under strace: a FUA write must become a synchronous write
# (pwritev2 with RWF_DSYNC, or a write followed by fdatasync), a plain write
# must not sync, a flush must fdatasync, FUA zero/trim must sync too; and the
# data must be in the file.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/chain-lib.sh"
requires strace
strace -f -o /dev/null true 2>/dev/null || skip "strace cannot trace here"

img=$T/disk.img
truncate -s 4M "$img"
sock=$T/nbd.sock
start_bg strace -f -qq -o "$T/trace" -e trace=pwrite64,pwritev2,fdatasync,fsync,fallocate \
  "${NBDKIT[@]}" -f -U "$sock" "$CHAIN_PLUGIN" file="$img"
STRACE_PID=$BG_PID
wait_nbd "nbd+unix:///?socket=$sock" 60
URI="nbd+unix:///?socket=$sock"

# Each step runs alone, then we snapshot the trace and diff.
step() {  # NAME PYTHON-STATEMENT
  local before; before=$(wc -l < "$T/trace")
  nbd_py "$URI" "$2" <<'PYEOF'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
exec(sys.argv[2])
h.shutdown()
PYEOF
  sleep 0.2
  tail -n +"$((before + 1))" "$T/trace" | grep -v -e resumed -e '+++' -e '---' > "$T/step.$1" || true
}

step plain 'h.pwrite(b"a" * 4096, 0)'
grep -q 'pwrite' "$T/step.plain" || fail "plain write not seen"
grep -Eq 'fdatasync|fsync|RWF_DSYNC' "$T/step.plain" && { cat "$T/step.plain"; fail "plain write was synced"; }

step fua 'h.pwrite(b"b" * 4096, 8192, nbd.CMD_FLAG_FUA)'
grep -Eq 'pwritev2\(.*RWF_DSYNC' "$T/step.fua" || \
  { grep -q 'pwrite' "$T/step.fua" && grep -q 'fdatasync' "$T/step.fua"; } || \
  { cat "$T/step.fua"; fail "FUA write was not synchronous"; }

step flush 'h.flush()'
grep -q 'fdatasync' "$T/step.flush" || { cat "$T/step.flush"; fail "flush did not fdatasync"; }

step zerofua 'h.zero(65536, 65536, nbd.CMD_FLAG_FUA)'
grep -q 'fallocate' "$T/step.zerofua" && grep -q 'fdatasync' "$T/step.zerofua" || \
  { cat "$T/step.zerofua"; fail "FUA zero not punched+synced"; }

step trimfua 'h.pwrite(b"c" * 65536, 131072); h.trim(65536, 131072, nbd.CMD_FLAG_FUA)'
grep -q 'PUNCH_HOLE' "$T/step.trimfua" && grep -q 'fdatasync' "$T/step.trimfua" || \
  { cat "$T/step.trimfua"; fail "FUA trim not punched+synced"; }

# the data is in the file
cmp -n 4096 "$img" <(head -c 4096 /dev/zero | tr '\0' a) || fail "plain write not in file"
cmp -i 8192:0 -n 4096 "$img" <(head -c 4096 /dev/zero | tr '\0' b) || fail "FUA write not in file"
cmp -i 131072:0 -n 65536 "$img" /dev/zero || fail "trimmed range not zero"

# stop nbdkit (strace's child), then strace exits
kill "$(pgrep -P "$STRACE_PID" | head -1)" 2>/dev/null || true
wait "$STRACE_PID" 2>/dev/null || true
log "ok"
