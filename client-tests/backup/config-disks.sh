#!/bin/bash
# cbw — client-tests/backup/config-disks.sh: disks declared in cbwd's
# config file ("disks" section, applied at start-up with --state-dir).
#  - two disks (one with a path relative to the config file, one with a
#    granularity) are added and served: `cbw disk list`, data reaches the
#    image;
#  - restart with the same config: nothing changes (same nbdkit pids,
#    state generation unchanged), the log says "kept";
#  - a changed granularity or image, an unknown key, a wrongly typed value,
#    a duplicate name: cbwd refuses to start, exit 1, the error names the
#    disk and the key, and nothing was changed or added (all-or-nothing);
#  - "disks" without --state-dir is an error; a new disk added to the
#    config is added on the next start, the others kept.
. "$(dirname "$0")/lib.sh"
need_modules noprobe
requires jq
requires qemu-io
CBWD=$CBW_BUILD/server/cbwd
[ -x "$CBWD" ] || skip "cbwd not built"

truncate -s 16M "$T/a.img" "$T/b.img" "$T/c.img" "$T/d.img"
mkdir -p "$T/etc"
mv "$T/a.img" "$T/etc/a.img"     # relative to the config file's directory
conf() { cat > "$T/etc/cbwd.json"; }
conf <<EOF2
{ "disks": [ { "name": "vda", "file": "a.img" },
             { "name": "vdb", "file": "$T/b.img", "granularity": 4096 } ] }
EOF2

CBWD_PID=
# start_cbwd: cbwd with the orchestrator and the config; waits for its
# control socket
start_cbwd() {
  rm -f "$CBW_SOCKET"
  start_bg env CBW_NBDKIT="${NBDKIT[*]}" CBW_ORCH_PLUGIN="$PLUGIN" "$CBWD" \
    --listen "unix:$T/nbd.sock" --state-dir "$STATE" --module-dir "$CBW_MODULES" \
    --config "$T/etc/cbwd.json" 2>>"$T/cbwd.log"
  CBWD_PID=$BG_PID
  local i
  for i in $(seq 600); do
    [ -S "$CBW_SOCKET" ] && return 0
    alive_pid "$CBWD_PID" || fail "cbwd exited at start-up: $(tail -5 "$T/cbwd.log")"
    sleep 0.1
  done
  fail "cbwd control socket did not appear"
}
stop_cbwd() { kill "$CBWD_PID" 2>/dev/null || true; wait "$CBWD_PID" 2>/dev/null || true; }
# refused WHAT NEEDLE...: cbwd must exit 1 at start-up, its error naming each NEEDLE
refused() {
  local what=$1 rc=0 n; shift
  : > "$T/refused.log"
  env CBW_NBDKIT="${NBDKIT[*]}" CBW_ORCH_PLUGIN="$PLUGIN" timeout 60 "$CBWD" \
    --listen "unix:$T/nbd.sock" --state-dir "$STATE" --module-dir "$CBW_MODULES" \
    --config "$T/etc/cbwd.json" 2>"$T/refused.log" || rc=$?
  [ "$rc" = 1 ] || fail "$what: cbwd exited $rc, expected 1: $(cat "$T/refused.log")"
  for n in "$@"; do
    grep -qF -- "$n" "$T/refused.log" || fail "$what: error does not name [$n]: $(cat "$T/refused.log")"
  done
  log "$what: $(grep -m1 orchestrator "$T/refused.log")"
}
disks() { "$CBW" --json disk list | jq -c '[.disks[] | {name, file, state, pid, granularity}]'; }
generation() { "$CBW" --json status | jq .generation; }

start_cbwd
disks > "$T/disks1"
jq -e --arg t "$T" 'length == 2 and
     (.[0] | .name == "vda" and .file == ($t + "/etc/a.img") and .state == "running" and .granularity == 65536) and
     (.[1] | .name == "vdb" and .file == ($t + "/b.img") and .state == "running" and .granularity == 4096)' \
  "$T/disks1" >/dev/null || fail "disk list: $(cat "$T/disks1")"
qemu-io -f raw -c "write -P 0x33 0 64k" "$(disk_uri vda)" >/dev/null || fail "write vda"
cmp -n 65536 "$T/etc/a.img" <(head -c 65536 /dev/zero | tr '\0' '\063') || fail "vda does not serve a.img"
expect_rc 0 "$CBW" disk list
grep -q "^vdb .*running" "$T/out" || fail "cbw disk list: $(cat "$T/out")"
g1=$(generation)

# same config again: nothing changes
stop_cbwd
start_cbwd
disks > "$T/disks2"
cmp -s "$T/disks1" "$T/disks2" || fail "restart changed the disks: $(cat "$T/disks1") -> $(cat "$T/disks2")"
[ "$(generation)" = "$g1" ] || fail "restart with the same config changed the state ($g1 -> $(generation))"
grep -q 'disk "vdb" already in the state directory (running): kept' "$T/cbwd.log" || fail "log: $(cat "$T/cbwd.log")"
stop_cbwd

# conflicts and bad entries: refused, nothing changed
conf <<EOF2
{ "disks": [ { "name": "vda", "file": "a.img" },
             { "name": "vdb", "file": "$T/b.img", "granularity": 65536 } ] }
EOF2
refused "granularity changed" 'disk "vdb"' '"granularity"' 4096 65536
conf <<EOF2
{ "disks": [ { "name": "vda", "file": "$T/c.img" } ] }
EOF2
refused "image changed" 'disk "vda"' '"file"' "$T/c.img" "$T/etc/a.img"
conf <<EOF2
{ "disks": [ { "name": "vdc", "file": "$T/c.img" },
             { "name": "vdd", "file": "$T/d.img", "granulrity": 4096 } ] }
EOF2
refused "unknown key" 'disk "vdd"' 'unknown key "granulrity"'
conf <<EOF2
{ "disks": [ { "name": "vdc", "file": "$T/c.img" },
             { "name": "vdd", "file": "$T/d.img", "granularity": "4k" } ] }
EOF2
refused "wrong type" 'disk "vdd"' "'granularity'" "expected uint"
conf <<EOF2
{ "disks": [ { "name": "vdc", "file": "$T/c.img" }, { "name": "vdc", "file": "$T/d.img" } ] }
EOF2
refused "duplicate" 'disk "vdc" defined twice'
conf <<EOF2
{ "disks": [ { "file": "$T/c.img" } ] }
EOF2
refused "no name" 'disks[0]' '"name"'
conf <<EOF2
{ "disks": { "name": "vdc" } }
EOF2
refused "not an array" '"disks" must be an array'
# without the orchestrator
rc=0
timeout 20 "$CBWD" --listen "unix:$T/nbd.sock" --export "name=x,type=memory,size=1M" \
  --config "$T/etc/cbwd.json" 2>"$T/noorch.log" || rc=$?
[ "$rc" = 1 ] && grep -q "needs the orchestrator" "$T/noorch.log" ||
  fail "disks without --state-dir: rc $rc: $(cat "$T/noorch.log")"

# a new disk joins, the others are kept; none of the refused ones was added
conf <<EOF2
{ "disks": [ { "name": "vda", "file": "a.img" },
             { "name": "vdb", "file": "$T/b.img", "granularity": 4096 },
             { "name": "vdc", "file": "../c.img" } ] }
EOF2
start_cbwd
disks > "$T/disks3"
jq -e --arg t "$T" 'length == 3 and .[2].name == "vdc" and .[2].file == ($t + "/c.img") and
                    .[2].state == "running"' "$T/disks3" >/dev/null || fail "disk list: $(cat "$T/disks3")"
cmp -s <(jq -c '.[0:2]' "$T/disks3") "$T/disks1" || fail "vda/vdb changed: $(cat "$T/disks3")"
"$CBW" --json event list | jq -e '[.events[] | select(.event == "disk-added")] | length == 1' >/dev/null ||
  fail "events of the third start: $("$CBW" event list)"
stop_cbwd
log "OK"
