#!/bin/bash
# cbw — client-tests/cbwd/negative.sh: raw-socket protocol attacks on cbwd
# (negative.py), then a good client and a clean, leak-free shutdown.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/lib.sh"
requires python3
SOCK=$T/cbwd.sock
head -c $((8 * 1024 * 1024 + 777)) /dev/urandom > $T/data.img
printf '0 65536\n1048576 4096\n' > $T/bm.txt
start_cbwd cbwd --handshake-timeout 3 --export "name=ro,type=file,path=$T/data.img,bitmap=bm:extents:$T/bm.txt" \
  --export "name=rw,type=store,path=$T/store.img,size=16M"
CBW_SEED=${CBW_SEED:-$RANDOM} python3 "$(dirname "$0")/negative.py" "$SOCK" $T/data.img "$CBWD_PID" ||
  { tail -20 "$CBWD_LOG" >&2; fail "negative protocol tests"; }
rss=$(awk '/VmHWM/ {print $2}' /proc/$CBWD_PID/status)
log "cbwd peak RSS after the attacks: ${rss} kB"
[ "$rss" -lt $((1024 * 1024)) ] || fail "cbwd peak RSS ${rss} kB"
nbdinfo "$(uri ro)" >/dev/null || fail "nbdinfo after the attacks"
stop_cbwd
