#!/bin/bash
# cbw — client-tests/cbwd/bounds-memory.sh: the global bound on buffered
# request/reply bytes (--max-memory).  56 clients send 8 READs of 32 MiB
# each and never read a reply; 4 more send the same and read everything.
# cbwd's peak RSS must stay under --max-memory plus a fixed overhead, the
# readers must get all their replies (nothing deadlocks), and the clients
# that read nothing are dropped after --idle-timeout.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/lib.sh"
requires python3
SOCK=$T/cbwd.sock
MAXMEM_MIB=128
# Overhead: one request past the bound (32 MiB + header: a request is
# admitted while the sum is below the bound) plus the process itself
# (code, libraries, malloc arenas, 60 sessions, worker stacks): 32 MiB.
# The sanitizer build needs more: its allocator keeps freed buffers in a
# quarantine (256 MiB by default) and it adds shadow memory.
OVERHEAD_MIB=64
if ldd "$CBWD" | grep -q libasan; then OVERHEAD_MIB=320; fi
truncate -s 256M $T/disk.img
start_cbwd cbwd --max-memory ${MAXMEM_MIB}M --idle-timeout 3 \
  --export "name=disk,type=file,path=$T/disk.img"
base=$(awk '/VmRSS/ {print $2}' /proc/$CBWD_PID/status)
log "cbwd RSS at start: ${base} kB"
python3 "$(dirname "$0")/bounds.py" memory "$SOCK" disk 56 4 8 $((32 * 1024 * 1024)) 7 ||
  { tail -20 "$CBWD_LOG" >&2; fail "memory bound"; }
hwm=$(awk '/VmHWM/ {print $2}' /proc/$CBWD_PID/status)
limit=$(( (MAXMEM_MIB + OVERHEAD_MIB) * 1024 ))
log "cbwd peak RSS: ${hwm} kB (bound ${MAXMEM_MIB} MiB + overhead ${OVERHEAD_MIB} MiB = ${limit} kB)"
[ "$hwm" -lt "$limit" ] || fail "cbwd peak RSS ${hwm} kB over ${limit} kB"
n=$(grep -c "read no reply for" "$CBWD_LOG" || true)
log "clients dropped for reading no reply: $n"
[ "$n" -ge 1 ] || { tail -20 "$CBWD_LOG" >&2; fail "no client dropped for reading nothing"; }
nbdinfo --size "$(uri disk)" >/dev/null || fail "nbdinfo afterwards"
stop_cbwd
