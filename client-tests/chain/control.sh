#!/bin/bash
# cbw — client-tests/chain/control.sh: the chain plugin's control socket.
# status reports the truth (checked against stat and the options), bad
# requests get the documented error classes, and the man page documents
# exactly the commands and arguments the live table has (query-commands).
. "$(dirname "$0")/../functions.sh"
. "$(dirname "$0")/chain-lib.sh"
requires jq
[ "$CTL_OK" = 1 ] || skip "control sockets cannot be tested in nbdkit under preloaded ASan (see chain-lib.sh)"

img=$T/disk.img
truncate -s 3M "$img"
start_chain nbd file="$img" control="$T/ctl.sock"
C=$T/ctl.sock

st=$(ctl "$C" '{"execute":"status","id":"s1"}')
echo "$st" | jq -e --arg f "$img" --argjson sz "$(stat -c %s "$img")" \
  '.id == "s1" and .return.file == $f and .return.size == $sz and
   .return.readonly == false and .return.direct == false and
   .return.flags.block_device == false and .return.flags.can_extents == true' >/dev/null \
  || fail "status wrong: $st"

cls() { ctl "$C" "$1" | jq -r '.error.class // "none"'; }
assert_eq "unknown command" CommandNotFound "$(cls '{"execute":"no-such"}')"
assert_eq "extra argument"  InvalidParameter "$(cls '{"execute":"status","arguments":{"x":1}}')"
assert_eq "no execute"      InvalidParameter "$(cls '{"arguments":{}}')"
assert_eq "not json"        ParseError "$(cls 'status please')"
assert_eq "not an object"   ParseError "$(cls '["status"]')"

# docs: every command and argument of the live table is in the man page,
# and the man page documents no command the table lacks.
pod=$CBW_SRC/docs/nbdkit-chain-plugin.pod
[ -f "$pod" ] || fail "missing $pod"
qc=$(ctl "$C" '{"execute":"query-commands"}')
for c in $(echo "$qc" | jq -r '.return.commands[].name'); do
  grep -q "^=item B<$c>" "$pod" || fail "command $c not documented in $pod"
  for a in $(echo "$qc" | jq -r --arg c "$c" '.return.commands[] | select(.name == $c) | .args[].name'); do
    grep -q "B<$a>" "$pod" || fail "argument $a of $c not documented"
  done
done
for c in $(sed -n '/^=head1 CONTROL COMMANDS/,/^=head1 /p' "$pod" | sed -n 's/^=item B<\([a-z-]*\)>.*/\1/p'); do
  echo "$qc" | jq -e --arg c "$c" '.return.commands | any(.name == $c)' >/dev/null \
    || fail "$pod documents command $c which the plugin does not have"
done
echo "$qc" | jq -e '.return.markdown | contains("## `status`")' >/dev/null || fail "markdown reference lacks status"

# a second plugin instance with readonly/direct shows them in status
stop_nbdkit "$NBDKIT_PID"
start_chain ro file="$img" readonly=true control="$T/ctl2.sock"
ctl "$T/ctl2.sock" '{"execute":"status"}' | jq -e '.return.readonly == true' >/dev/null \
  || fail "readonly not reported"
log "ok"
