#!/bin/bash
# cbw — client-tests/cbwd/pit-reader-crash.sh: a backup reader that dies or
# hangs up mid-copy never takes the live disk down (invariant 3).
#
# nbdkit 1.32 (Debian 12) aborts when a client hangs up while several of its
# requests are in flight (nbdkit commit 9d82aa4f fixed it in 1.33.10).  The
# classic trigger is a broken backup session: the PIT export answers EIO,
# nbdcopy exits at once with its other requests still queued, and the next
# reply nbdkit sends hits `assert (sock >= 0)`: the guest's disk is gone.
# Readers therefore read cbwd's PIT export, which talks to the filter over
# connections that carry one request each.  This test drives exactly that
# trigger (and readers killed with -9 while 64 big reads are in flight)
# through cbwd, and checks that the guest's nbdkit survives and the guest
# keeps writing.  Run with CBW_PIT_DIRECT=1 to aim the same readers at the
# filter's own export instead: on nbdkit 1.32 it then fails (nbdkit aborts),
# which shows the test can fail.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/lib.sh"
requires nbdcopy; requires qemu-io
PY=/usr/bin/python3             # Debian's, where python3-libnbd lives
$PY -c 'import nbd' 2>/dev/null || fail "python3-libnbd missing (scripts/test installs it)"
[ -f "$CBW_FILTER" ] || skip "cbw filter not built"
SIZE=$((64 * 1024 * 1024))
ROUNDS=${CBW_ROUNDS:-8}

head -c $SIZE /dev/urandom > $T/disk.img
truncate -s $SIZE $T/tgt.img
start_nbdkit "$T/tgt.sock" file "$T/tgt.img"
TGT_PID=$NBDKIT_PID
start_nbdkit "$T/live.sock" --filter="$CBW_FILTER" file "$T/disk.img" \
  cbw-control="$T/cbw.ctl" cbw-pit-export=pit
LIVE_PID=$NBDKIT_PID
r=$(ctl "$T/cbw.ctl" "{\"execute\":\"begin\",\"arguments\":{\"target\":\"nbd+unix:///?socket=$T/tgt.sock\"}}")
echo "$r" | grep -q '"return"' || fail "begin: $r"
SOCK=$T/cbwd.sock
start_cbwd cbwd --export "name=pit,type=pit,upstream=nbd+unix:///pit?socket=$T/live.sock,connections=8"
if [ "${CBW_PIT_DIRECT:-0}" = 1 ]; then
  PIT="nbd+unix:///pit?socket=$T/live.sock"
else
  PIT=$(uri pit)
fi

alive() { kill -0 "$LIVE_PID" 2>/dev/null || fail "the guest's nbdkit died ($1)"; }
guest_write() {
  qemu-io -f raw "nbd+unix:///?socket=$T/live.sock" -c "write -P $1 $2 64k" \
    >/dev/null 2>&1 || fail "guest write at $2 failed ($3)"
}

# 1. Readers killed with 64 x 2 MiB reads in flight, while the guest writes.
cat > $T/killed_reader.py <<'PY'
import nbd, os, random, signal, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
for i in range(64):
    h.aio_pread(nbd.Buffer(2 << 20), random.randrange(size // (2 << 20)) * (2 << 20))
h.poll(-1)                      # at least one reply under way
os.kill(os.getpid(), signal.SIGKILL)
PY
for i in $(seq $ROUNDS); do
  ( $PY $T/killed_reader.py "$PIT" 2>/dev/null ) 2>/dev/null || true
  guest_write $((i % 200 + 1)) $(( (RANDOM % (SIZE / 65536)) * 65536 )) "after killed reader $i"
  alive "after killed reader $i"
done

# 2. Break the session (target killed -9, then guest writes: the default
# policy lets them succeed and breaks the snapshot), then nbdcopy readers
# that get EIO and hang up at once.
kill -9 "$TGT_PID"
for off in 0 8M 16M 32M 48M; do
  qemu-io -f raw "nbd+unix:///?socket=$T/live.sock" -c "write -P 7 $off 1M" \
    >/dev/null 2>&1 || fail "guest write at $off failed after the target died"
done
ctl "$T/cbw.ctl" '{"execute":"status"}' | grep -q '"broken":true' ||
  fail "the session did not break after its target died"
for i in $(seq $ROUNDS); do
  if nbdcopy --connections=4 "$PIT" null: 2>/dev/null; then
    fail "nbdcopy of a broken PIT export succeeded (round $i)"
  fi
  alive "after EIO reader $i"
  guest_write 9 $(( (RANDOM % (SIZE / 65536)) * 65536 )) "after EIO reader $i"
done
ctl "$T/cbw.ctl" '{"execute":"end"}' >/dev/null
alive "at the end"
stop_cbwd
log "the guest's nbdkit survived $ROUNDS killed readers and $ROUNDS EIO readers"
