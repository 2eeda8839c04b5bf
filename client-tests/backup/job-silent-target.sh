#!/bin/bash
# cbw — client-tests/backup/job-silent-target.sh: a push job towards an NBD
# server that accepts the connection and never answers.  The control thread
# never waits for it: `job start` answers at once, `cbw status` keeps
# answering in well under a second, and the job itself fails after its
# connect timeout with a reason naming the target, having written nothing.
# A cancel while it waits stops it at once.
. "$(dirname "$0")/lib.sh"
need_modules
requires jq
requires python3
SIZE=$((4 << 20))
truncate -s $SIZE "$T/a.img"
start_orchd
expect_rc 0 "$CBW" disk add vda --file "$T/a.img"
expect_rc 0 "$CBW" backup begin

# the silent server: accepts every connection, reads nothing, says nothing
start_bg python3 -c '
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0)); s.listen(16)
open(sys.argv[1] + ".tmp", "w").write(str(s.getsockname()[1]))
import os; os.rename(sys.argv[1] + ".tmp", sys.argv[1])
held = []
while True:
    c, _ = s.accept(); held.append(c)
' "$T/port"
for _ in $(seq 100); do [ -s "$T/port" ] && break; sleep 0.1; done
PORT=$(cat "$T/port")
[ -n "$PORT" ] || fail "the silent server did not start"

# ms CMD...: run CMD (bounded), print its wall time in ms; $T/out, $T/err
ms() {
  local t0 t1 rc=0
  t0=$(date +%s%N)
  timeout 10 "$@" >"$T/out" 2>"$T/err" || rc=$?
  t1=$(date +%s%N)
  echo "$(( (t1 - t0) / 1000000 )) $rc"
}

log "section: job start answers at once, status keeps answering"
started_ns=$(date +%s%N)
read -r t rc < <(ms "$CBW" --json job start --target "nbd://127.0.0.1:$PORT/x" \
                   --connect-timeout 4 --id silent)
[ "$rc" = 0 ] || fail "job start towards a silent server: rc $rc: $(cat "$T/err")"
[ "$t" -lt 2000 ] || fail "job start took $t ms (connected on the control thread?)"
log "job start answered in $t ms"
for i in 1 2 3; do
  read -r t rc < <(ms "$CBW" --json status)
  [ "$rc" = 0 ] || fail "cbw status while the job waits: rc $rc: $(cat "$T/err")"
  [ "$t" -lt 1000 ] || fail "cbw status took $t ms while a job waits for a silent server"
  read -r t rc < <(ms "$CBW" --json job status silent)
  [ "$rc" = 0 ] && [ "$t" -lt 1000 ] || fail "job status: rc $rc, $t ms"
  # Still running while less than 3.5 s of its 4 s connect timeout have
  # passed (the state was read before this point); rounds that slow (a
  # loaded machine) end the loop, the failure is checked below.
  [ $(( ($(date +%s%N) - started_ns) / 1000000 )) -ge 3500 ] && break
  jq -e '.state == "running"' "$T/out" >/dev/null || fail "job state: $(cat "$T/out")"
  sleep 0.5
done

log "section: the job fails after its connect timeout, with the reason"
expect_rc 1 timeout 30 "$CBW" job wait silent
"$CBW" --json job status silent > "$T/st.json"
jq -e '.state == "failed"' "$T/st.json" >/dev/null || fail "job: $(cat "$T/st.json")"
jq -e --arg p "$PORT" '.error | test("disk vda: cannot connect to target nbd://127.0.0.1:" + $p + "/x: no NBD handshake within 4 s")' \
  "$T/st.json" >/dev/null || fail "job error: $(jq -r .error "$T/st.json")"
jq -e '."bytes-done" == 0' "$T/st.json" >/dev/null || fail "a job without a target copied: $(cat "$T/st.json")"

log "section: a cancel while connecting stops the job at once"
expect_rc 0 "$CBW" job start --target "nbd://127.0.0.1:$PORT/x" --connect-timeout 60 --id cancelled
read -r t rc < <(ms "$CBW" --json job cancel cancelled)
[ "$rc" = 0 ] && [ "$t" -lt 3000 ] || fail "job cancel while connecting: rc $rc, $t ms: $(cat "$T/err")"
"$CBW" --json job status cancelled | jq -e '.state == "cancelled"' >/dev/null ||
  fail "cancelled job: $("$CBW" job status cancelled)"

log "section: bad connect-timeout"
expect_rc 1 "$CBW" raw job-start "{\"targets\":[\"nbd://127.0.0.1:$PORT/x\"],\"connect-timeout\":0}"
grep -q "connect-timeout must be 1..3600" "$T/out" "$T/err" || fail "connect-timeout 0: $(cat "$T/out") $ERR"
expect_rc 0 "$CBW" backup end
log "silent target ok"
