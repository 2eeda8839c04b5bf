#!/bin/bash
# cbw — client-tests/cbwd/pit-allow.sh: authorization of the exports cbwd's
# orchestrator publishes at `backup begin`.  cbwd with a Unix listener and a
# TLS-PSK TCP listener, --pit-allow psk:bob, stores reached over NBD
# (CBW_ORCH_STORE_TARGET=nbd, so a store export exists):
#  - bob's LIST over TCP shows just the PIT export, and bob reads it;
#  - alice (a valid key, not allowed) sees nothing and cannot open it;
#  - the store export is on the Unix listener only, for nobody over TCP;
#  - --pit-allow with something that is not an identity refuses to start.
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/lib.sh"
for p in psktool nbdinfo nbdcopy python3 jq; do requires $p; done
CBW=$CBW_BUILD/server/cli/cbw
[ -x "$CBW" ] || skip "cbw CLI not built"
[ -f "$CBW_FILTER" ] && [ -f "$DIRTYBITMAP_FILTER" ] || skip "cbw/dirtybitmap filters not built"
[ -f "$CHAIN_PLUGIN" ] || skip "chain plugin not built (cbwd's orchestrator uses it)"

STATE=$T/state
mkdir -p "$STATE" "$T/run"; chmod 700 "$T/run"
export CBW_SOCKET=$STATE/control.sock XDG_RUNTIME_DIR=$T/run CBW_NBDKIT="${NBDKIT[*]}"
export CBW_ORCH_STORE_TARGET=nbd
_orch_exit() {
  local rc=$? f p
  "$CBW" disk remove vda >/dev/null 2>&1 || true
  for f in $(grep -lF -- "$T/" /proc/[0-9]*/cmdline 2>/dev/null); do
    p=${f#/proc/}; p=${p%/cmdline}
    [ "$p" != $$ ] && kill "$p" 2>/dev/null || true
  done
  _cbw_cleanup
}
trap _orch_exit EXIT
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
SIZE=$((4 * 1024 * 1024))
head -c $SIZE /dev/urandom > $T/a.img
SOCK=$T/cbwd.sock
mkdir -p $T/psk
psktool -u alice -p $T/psk/keys.psk >/dev/null 2>&1
psktool -u bob -p $T/psk/keys.psk >/dev/null 2>&1
PORT=$(free_port)

rc=0
timeout 10 "$CBWD" --listen "unix:$T/bad.sock" --state-dir "$T/bad-state" --pit-allow bob \
  > $T/bad.log 2>&1 || rc=$?
[ "$rc" != 0 ] && [ "$rc" != 124 ] || fail "cbwd started with --pit-allow bob (rc $rc)"
grep -q "is not an identity" $T/bad.log || fail "--pit-allow bob: $(cat $T/bad.log)"

start_cbwd cbwd --listen "tcp:127.0.0.1:$PORT" --tls=require --tls-psk $T/psk/keys.psk \
  --pit-allow psk:bob --state-dir "$STATE" --module-dir "$CBW_MODULES"
for _ in $(seq 100); do [ -S "$CBW_SOCKET" ] && break; sleep 0.1; done
"$CBW" disk add vda --file $T/a.img >/dev/null || fail "disk add"
"$CBW" backup begin > $T/begin.out || fail "backup begin: $(cat $T/begin.out)"

u() { echo "nbds://$1@127.0.0.1:$PORT/$2?tls-psk-file=$T/psk/keys.psk"; }
names() { nbdinfo --list --json "$1" | jq -r '[.exports[]."export-name"] | sort | join(" ")'; }
local_names=$(names "$(uri '')")
log "exports on the Unix listener: $local_names"
case " $local_names " in *" vda "*) ;; *) fail "no PIT export vda: $local_names" ;; esac
[ "$(echo $local_names | wc -w)" -ge 2 ] || fail "no store export on the Unix listener: $local_names"
assert_eq "bob's LIST" "vda" "$(names "$(u bob '')")"
assert_eq "alice's LIST" "" "$(names "$(u alice '')")"
nbdcopy "$(u bob vda)" $T/pit.img || fail "bob cannot read the PIT export"
cmp $T/a.img $T/pit.img || fail "bob's copy of the PIT export differs"
nbdinfo "$(u alice vda)" > $T/alice.out 2>&1 && fail "alice opened the PIT export"
for s in $local_names; do
  [ "$s" = vda ] && continue
  nbdinfo "$(u bob "$s")" > $T/st.out 2>&1 && fail "bob opened store export $s over TCP"
done
"$CBW" backup end >/dev/null || fail "backup end"
"$CBW" disk remove vda >/dev/null || fail "disk remove"
stop_cbwd
log "orchestrator exports: PIT for --pit-allow only, stores never over TCP"
