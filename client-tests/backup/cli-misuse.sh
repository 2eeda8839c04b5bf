#!/bin/bash
# cbw — client-tests/backup/cli-misuse.sh: CLI misuse and bad control
# requests get clear errors and the documented exit codes (0 ok, 1 command
# failed, 2 usage, 3 cannot connect), and change nothing: the state file's
# bytes are identical before and after.  Runs without any nbdkit module.
. "$(dirname "$0")/lib.sh"

# Cannot connect: exit 3, message names the socket.
expect_rc 3 "$CBW" -c "$T/nope.sock" disk list
grep -q "cannot connect" <<<"$ERR" || fail "no 'cannot connect' in: $ERR"
grep -qF "$T/nope.sock" <<<"$ERR" || fail "socket path not named: $ERR"

start_orchd
# A disk-add of a missing file fails (1) without touching the state.
expect_rc 0 "$CBW" status
before=$(cat "$STATE/cbwd-state.json" 2>/dev/null || echo none)

# Usage errors: exit 2, nothing sent.
expect_rc 2 "$CBW"
expect_rc 2 "$CBW" frobnicate
grep -q 'unknown command "frobnicate"' <<<"$ERR" || fail "bad message: $ERR"
expect_rc 2 "$CBW" disk
grep -q "needs a subcommand" <<<"$ERR" || fail "bad message: $ERR"
expect_rc 2 "$CBW" disk add
grep -q "needs a NAME" <<<"$ERR" || fail "bad message: $ERR"
expect_rc 2 "$CBW" disk add vda
grep -q "needs --file" <<<"$ERR" || fail "bad message: $ERR"
expect_rc 2 "$CBW" disk add vda --file
grep -q "needs a value" <<<"$ERR" || fail "bad message: $ERR"
expect_rc 2 "$CBW" disk add vda --file x --granularity 12abc
grep -q "not a non-negative integer" <<<"$ERR" || fail "bad message: $ERR"
expect_rc 2 "$CBW" disk add vda --file x --bogus 1
grep -q "unknown option --bogus" <<<"$ERR" || fail "bad message: $ERR"
expect_rc 2 "$CBW" disk list extra
expect_rc 2 "$CBW" backup begin --full --incremental c1
grep -q "conflicts" <<<"$ERR" || fail "bad message: $ERR"
expect_rc 2 "$CBW" backup begin --freeze-required=yes
expect_rc 2 "$CBW" raw status '[1]'
expect_rc 2 "$CBW" --bogus status
expect_rc 0 "$CBW" --help
grep -q "exit status" "$T/out" || fail "--help lacks the exit codes"
expect_rc 0 "$CBW" backup begin --help
grep -q -- "--incremental" "$T/out" || fail "backup begin --help incomplete"

# Command errors: exit 1 with class and message.
expect_rc 1 "$CBW" disk add vda --file "$T/missing.img"
grep -q "NotFound" <<<"$ERR" && grep -qF "$T/missing.img" <<<"$ERR" || fail "bad message: $ERR"
expect_rc 1 "$CBW" disk add ../evil --file /etc/hostname
grep -q "invalid disk name" <<<"$ERR" || fail "bad message: $ERR"
expect_rc 1 "$CBW" disk add vda --file "$T" 
grep -q "not a regular file" <<<"$ERR" || fail "bad message: $ERR"
expect_rc 1 "$CBW" disk add vda --file /etc/hostname --granularity 1000
grep -q "power of two" <<<"$ERR" || fail "bad message: $ERR"
expect_rc 1 "$CBW" disk remove nosuch
grep -q "NotFound: no disk named nosuch" <<<"$ERR" || fail "bad message: $ERR"
expect_rc 1 "$CBW" checkpoint create c1
grep -q "no disks" <<<"$ERR" || fail "bad message: $ERR"
expect_rc 1 "$CBW" checkpoint create "bad name"
expect_rc 1 "$CBW" checkpoint delete c1
expect_rc 1 "$CBW" backup begin --incremental nosuch --disk x
expect_rc 1 "$CBW" backup begin --mode sideways --disk x
grep -q "mode must be" <<<"$ERR" || fail "bad message: $ERR"
expect_rc 1 "$CBW" backup end
grep -q "no backup is running" <<<"$ERR" || fail "bad message: $ERR"
expect_rc 1 "$CBW" raw no-such-command
grep -q "CommandNotFound" "$T/out" || fail "raw: no CommandNotFound"
expect_rc 1 "$CBW" raw disk-add '{"name": 7, "file": "/x"}'
grep -q "InvalidParameter" "$T/out" || fail "raw: wrong type not refused"

# Raw protocol garbage straight on the socket: the daemon answers and lives.
reply=$(ctl "$CBW_SOCKET" 'this is not json')
grep -q ParseError <<<"$reply" || fail "garbage: $reply"
reply=$(ctl "$CBW_SOCKET" '{"execute":"disk-add","arguments":{"name":"a","file":"/x","extra":1}}')
grep -q InvalidParameter <<<"$reply" || fail "extra arg: $reply"

# --json gives machine-readable output.
expect_rc 0 "$CBW" --json disk list
jq -e '.disks | length == 0' "$T/out" >/dev/null || fail "--json disk list: $(cat "$T/out")"

after=$(cat "$STATE/cbwd-state.json" 2>/dev/null || echo none)
[ "$before" = "$after" ] || fail "state file changed by failed commands"
kill -0 "$ORCHD_PID" || fail "cbwd-orch died"
log "OK"
