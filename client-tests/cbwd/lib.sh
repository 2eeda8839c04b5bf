# cbw — client-tests/cbwd/lib.sh: helpers for the cbwd client tests (sourced
# after ../functions.sh).
CBWD=${CBWD:-$CBW_BUILD/server/cbwd}
[ -x "$CBWD" ] || skip "cbwd not built ($CBWD)"

# start_cbwd LOGNAME ARGS...: start cbwd on $SOCK (unix) with ARGS; waits until
# the socket answers.  Sets CBWD_PID, CBWD_LOG.
start_cbwd() {
  local name=$1; shift
  CBWD_LOG=$T/$name.log
  rm -f "$SOCK"
  start_bg env ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=0:exitcode=66} \
    "$CBWD" --listen "unix:$SOCK" "$@" 2>"$CBWD_LOG"
  CBWD_PID=$BG_PID
  local i
  for i in $(seq 200); do
    [ -S "$SOCK" ] && break
    kill -0 "$CBWD_PID" 2>/dev/null || { cat "$CBWD_LOG" >&2; fail "cbwd died at start"; }
    sleep 0.05
  done
  for i in $(seq 100); do
    nbdinfo --list "nbd+unix:///?socket=$SOCK" >/dev/null 2>&1 && return 0
    kill -0 "$CBWD_PID" 2>/dev/null || { cat "$CBWD_LOG" >&2; fail "cbwd died at start"; }
    sleep 0.05
  done
  fail "cbwd did not answer"
}

# stop_cbwd: SIGTERM, wait, and check it exited cleanly (in the sanitizer
# build this catches leaks and memory errors of the whole run).
stop_cbwd() {
  kill -TERM "$CBWD_PID" 2>/dev/null || fail "cbwd is not running"
  local rc=0
  wait "$CBWD_PID" || rc=$?
  if [ "$rc" != 0 ] || grep -q -E "AddressSanitizer|runtime error|LeakSanitizer" "$CBWD_LOG"; then
    tail -50 "$CBWD_LOG" >&2
    fail "cbwd exited with status $rc"
  fi
}

uri() { echo "nbd+unix:///$1?socket=$SOCK"; }
