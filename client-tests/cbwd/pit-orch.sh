#!/bin/bash
# cbw — client-tests/cbwd/pit-orch.sh: cbwd's orchestrator turns direct PIT
# reads on by itself.  cbwd --state-dir, a raw disk, `cbw backup begin`:
# the cbw session gets a state map (in $XDG_RUNTIME_DIR), the PIT export
# reads the disk image and the store file directly.  Concurrent guest writes
# while the PIT export is read (cbw-io stress) and then copied whole
# (nbdcopy): it must equal the disk at begin; cbwd's log must show the
# direct path enabled and serving at least one whole copy (so the speed-up
# cannot be lost silently); `backup end` removes the map.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/lib.sh"
requires nbdcopy
CBW=$CBW_BUILD/server/cli/cbw
CBW_IO=$CBW_BUILD/client-tests/cbw/cbw-io
[ -x "$CBW" ] || skip "cbw CLI not built"
[ -x "$CBW_IO" ] || skip "cbw-io not built"
[ -f "$CBW_FILTER" ] && [ -f "$DIRTYBITMAP_FILTER" ] || skip "cbw/dirtybitmap filters not built"
[ -f "$CHAIN_PLUGIN" ] || skip "chain plugin not built (cbwd's orchestrator uses it)"

STATE=$T/state
mkdir -p "$STATE" "$T/run"; chmod 700 "$T/run"
export CBW_SOCKET=$STATE/control.sock XDG_RUNTIME_DIR=$T/run CBW_NBDKIT="${NBDKIT[*]}"
# The disk's nbdkit is detached (survives cbwd): stop everything of ours.
_orch_exit() {
  local rc=$? f p
  "$CBW" disk remove vda >/dev/null 2>&1 || true
  for f in $(grep -lF -- "$T/" /proc/[0-9]*/cmdline 2>/dev/null); do
    p=${f#/proc/}; p=${p%/cmdline}
    [ "$p" != $$ ] && kill "$p" 2>/dev/null || true
  done
  [ $rc != 0 ] && [ -f "$STATE/disks/vda/nbdkit.log" ] && tail -20 "$STATE/disks/vda/nbdkit.log" >&2
  _cbw_cleanup
}
trap _orch_exit EXIT

SIZE=$((24 * 1024 * 1024 + 8192))
head -c $SIZE /dev/urandom > $T/a.img
SOCK=$T/cbwd.sock
start_cbwd cbwd --state-dir "$STATE" --module-dir "$CBW_MODULES"
for _ in $(seq 100); do [ -S "$CBW_SOCKET" ] && break; sleep 0.1; done
"$CBW" disk add vda --file $T/a.img >/dev/null || fail "disk add"
LIVE="nbd+unix:///?socket=$STATE/disks/vda/nbd.sock"
cp $T/a.img $T/a0.img                     # no writer yet: the disk at begin
"$CBW" backup begin > $T/begin.out || fail "backup begin: $(cat $T/begin.out)"
PIT=$(uri vda)
grep -qF "$PIT" $T/begin.out || log "note: backup begin printed: $(cat $T/begin.out)"
map=$(ls $T/run/cbw-*-backup-vda.states 2>/dev/null) || fail "no state map in \$XDG_RUNTIME_DIR: $(ls -la $T/run)"
grep -q "export 'vda': direct point-in-time reads" "$CBWD_LOG" ||
  fail "the orchestrator did not enable direct reads: $(grep -v 'conn ' "$CBWD_LOG" | tail -5)"

"$CBW_IO" stress "$LIVE" "$PIT" $T/a0.img ${CBW_SEED:-$RANDOM} 2 2 2 > $T/stress.out ||
  fail "stress through the orchestrated PIT export: $(cat $T/stress.out)"
log "stress: $(cat $T/stress.out)"
nbdcopy --connections=4 "$PIT" $T/pit.img || fail "nbdcopy of the PIT export"
cmp $T/a0.img $T/pit.img || fail "PIT export differs from the disk at begin"
cmp -s $T/a0.img $T/a.img && fail "the guest writes did not change the disk: test not testing"

"$CBW" backup end >/dev/null || fail "backup end"
[ -e "$map" ] && fail "state map $map left after backup end"
for _ in $(seq 50); do grep -q "export 'vda': point-in-time reads" "$CBWD_LOG" && break; sleep 0.1; done
line=$(grep "export 'vda': point-in-time reads" "$CBWD_LOG" | tail -1)
direct=$(echo "$line" | sed -n 's/.*reads: \([0-9]*\) bytes direct.*/\1/p')
log "cbwd: ${line#*: }"
[ -n "$direct" ] && [ "$direct" -ge $SIZE ] || fail "direct reads served ${direct:-?} bytes (< $SIZE): $line"
"$CBW" disk remove vda >/dev/null || fail "disk remove"
stop_cbwd
log PASS
