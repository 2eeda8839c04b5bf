#!/bin/bash
# cbw — client-tests/backup/freeze-hook-name.sh: freeze hooks are configured
# in the daemon (--freeze-hook NAME=/PATH) and chosen by name from the
# control socket; nothing a control client sends is run as a command.
#  - a configured hook runs as `PATH freeze` / `PATH thaw`, with no shell
#    (its argv is exactly PATH and the phase);
#  - an unknown name, a path, and a shell string are InvalidParameter, run
#    nothing, and leave no backup;
#  - the daemon refuses to start with a relative or non-executable hook.
. "$(dirname "$0")/lib.sh"
need_modules
requires jq
SIZE=$((4 << 20))
truncate -s $SIZE "$T/a.img"
cat > "$T/hook.sh" <<HOOK
#!/bin/sh
# one line per call: the number of arguments, then each argument
echo "\$# \$*" >> "$T/hook.log"
exit 0
HOOK
chmod +x "$T/hook.sh"

log "section: start-up refuses bad hooks"
for bad in "rel=hook.sh" "noexec=$T/a.img" "bad name=$T/hook.sh" "=$T/hook.sh" "nopath"; do
  rc=0
  timeout 20 "$ORCHD" --state-dir "$T/bad-state" --freeze-hook "$bad" >"$T/bad.log" 2>&1 || rc=$?
  [ "$rc" != 0 ] && [ "$rc" != 124 ] || fail "cbwd-orch started with --freeze-hook '$bad' (rc $rc)"
  grep -q "freeze hook" "$T/bad.log" || fail "--freeze-hook '$bad': $(cat "$T/bad.log")"
done

ORCHD_ARGS=(--freeze-hook "fsfreeze=$T/hook.sh")
start_orchd
expect_rc 0 "$CBW" disk add vda --file "$T/a.img"

log "section: a hook chosen by name"
expect_rc 0 "$CBW" backup begin --freeze-hook fsfreeze --freeze-required
assert_eq "hook calls" "1 freeze|1 thaw|" "$(tr '\n' '|' < "$T/hook.log")"
expect_rc 0 "$CBW" backup end

log "section: names only: unknown names, paths and shell strings are refused"
rm -f "$T/hook.log"
for bad in "nosuch" "$T/hook.sh" "$T/hook.sh; touch $T/pwned" "touch $T/pwned" \
           "\$(touch $T/pwned)"; do
  expect_rc 1 "$CBW" backup begin --freeze-hook "$bad"
  grep -q "InvalidParameter\|unknown freeze hook" "$T/err" || fail "freeze-hook '$bad': $ERR"
  grep -q "unknown freeze hook" "$T/err" || fail "freeze-hook '$bad': no reason: $ERR"
  grep -q "configured: fsfreeze" "$T/err" || fail "freeze-hook '$bad': hooks not listed: $ERR"
  expect_rc 0 "$CBW" --json status
  jq -e '.backup == null' "$T/out" >/dev/null || fail "a refused begin left a backup: $(cat "$T/out")"
done
# the raw control request gets the same class
expect_rc 1 "$CBW" raw backup-begin "{\"freeze-hook\":\"touch $T/pwned\"}"
grep -q "InvalidParameter" "$T/out" "$T/err" || fail "raw backup-begin: $(cat "$T/out") $ERR"
sleep 0.2
[ ! -e "$T/pwned" ] || fail "a freeze-hook string from the control socket was run"
[ ! -e "$T/hook.log" ] || fail "a refused begin ran the hook: $(cat "$T/hook.log")"
log "freeze hooks by name ok"
