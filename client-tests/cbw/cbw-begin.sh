#!/bin/bash
# cbw-begin: the point in time is `begin`.  Writers keep rewriting their own
# blocks with increasing sequence numbers while `begin` is sent (cbw-io
# begin-race): in the PIT view each block must hold one whole write (no
# tearing) no older than the last one acknowledged before begin was sent and
# no newer than the last one issued when begin returned.  Repeated with and
# without the write-back buffer.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/cbw-lib.sh"
size=$((8 * 1048576)) g=65536
for buffer in 64M 0; do
  for i in 1 2 3; do
    random_disk "$T/disk.img" $size
    start_target tgt $size
    start_live "$T/disk.img" cbw-granularity=$g cbw-buffer=$buffer
    "$CBW_IO" begin-race "$LIVE" "$PIT" "$CTL" "$TGT_URI" $g > "$T/br.out" ||
      fail "buffer=$buffer run $i: $(cat "$T/br.out")"
    log "buffer=$buffer run $i: $(tr '\n' ';' < "$T/br.out")"
    ok_ctl '{"execute":"end"}' >/dev/null
    kill "$LIVE_PID" "$TGT_PID"; wait "$LIVE_PID" "$TGT_PID" 2>/dev/null || true
  done
done
log PASS
