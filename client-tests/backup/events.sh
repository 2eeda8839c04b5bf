#!/bin/bash
# cbw — client-tests/backup/events.sh: events pushed on cbwd's control
# socket (`subscribe`, `cbw events --follow`), checked against the ring
# (`event-list`) and against what the test did:
#  - a follower started before anything (`--since 0` by default) gets the
#    `started` event replayed, then live: disk-added, backup-begun,
#    job-started, job-progress (bytes-done growing, below the total),
#    job-completed, backup-ended and, once the disk's nbdkit is killed,
#    disk-dead; sequence numbers 1, 2, 3 ... with no gap;
#  - each line is an event (event, data, seq, timestamp), never a reply;
#  - a second follower started late with --since N gets exactly the first
#    one's events after N (replay, then live, no gap, no duplicate);
#  - the pushed lines equal event-list's entries (minus its "time");
#  - `cbw events` without --follow prints the ring; when cbwd stops, a
#    follower ends with exit status 3.
. "$(dirname "$0")/lib.sh"
need_modules
requires jq

MiB=$((1 << 20))
head -c $((24 * MiB)) /dev/urandom > "$T/a.img"
start_orchd
start_bg "$CBW" events --follow --json >"$T/f1.jsonl" 2>"$T/f1.err"
F1=$BG_PID

# wait_event FILE NAME [secs]: until FILE has an event NAME
wait_event() {
  local i
  for i in $(seq $(( ${3:-20} * 10 ))); do
    grep -q "\"event\":\"$2\"" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  fail "no $2 event in $1 after ${3:-20} s: $(cat "$1") $(cat "${1%.jsonl}.err" 2>/dev/null)"
}
wait_event "$T/f1.jsonl" started

expect_rc 0 "$CBW" disk add vda --file "$T/a.img"
wait_event "$T/f1.jsonl" disk-added
expect_rc 0 "$CBW" backup begin
# 24 MiB at 8 MiB/s: about 3 s, so progress is reported while it runs
expect_rc 0 "$CBW" --json job start --target "$T/copy.raw" --speed 8M --id j1
timeout 60 "$CBW" job wait j1 >/dev/null || fail "job j1 did not complete"
wait_event "$T/f1.jsonl" job-completed
expect_rc 0 "$CBW" backup end
wait_event "$T/f1.jsonl" backup-ended

# a late follower, from the middle of the story
N=$(jq -r 'select(.event == "disk-added") | .seq' "$T/f1.jsonl")
start_bg "$CBW" events --follow --json --since "$N" >"$T/f2.jsonl" 2>"$T/f2.err"
F2=$BG_PID
wait_event "$T/f2.jsonl" backup-ended

# kill the disk's nbdkit: disk-dead is pushed to both
PID=$("$CBW" --json disk list | jq -r '.disks[0].pid')
kill -9 "$PID"
wait_event "$T/f1.jsonl" disk-dead
wait_event "$T/f2.jsonl" disk-dead
jq -e 'select(.event == "disk-dead") | .data.disk == "vda"' "$T/f1.jsonl" >/dev/null ||
  fail "disk-dead does not name vda: $(cat "$T/f1.jsonl")"

# every line is an event of the documented shape, numbered 1, 2, 3 ...
jq -e -s 'all(.[]; has("event") and has("data") and has("seq") and
              (.timestamp | has("seconds") and has("microseconds")) and
              (has("return") or has("error") | not))
          and ([.[].seq] == [range(1; length + 1)])' "$T/f1.jsonl" >/dev/null ||
  fail "bad event lines or sequence: $(cat "$T/f1.jsonl")"
# the story, in order (job-progress collapsed)
got=$(jq -r .event "$T/f1.jsonl" | uniq | tr '\n' ' ')
want="started disk-added backup-begun job-started job-progress job-completed backup-ended disk-dead "
[ "$got" = "$want" ] || fail "events: got [$got], want [$want]"
# progress: for j1, growing, and below the total until completion
jq -e -s '[.[] | select(.event == "job-progress" and .data.job == "j1") | .data] as $p
          | ($p | length) >= 1 and ($p | all(."bytes-done" <= ."bytes-total"))
          and ([$p[]."bytes-done"] == ([$p[]."bytes-done"] | sort))' "$T/f1.jsonl" >/dev/null ||
  fail "job-progress: $(grep job-progress "$T/f1.jsonl")"
jq -e -s --argjson s $((24 * MiB)) '[.[] | select(.event == "job-completed")][0].data.job == "j1"' \
  "$T/f1.jsonl" >/dev/null || fail "job-completed: $(grep job-completed "$T/f1.jsonl")"

# the late follower: exactly the events after N
cmp <(jq -c "select(.seq > $N)" "$T/f1.jsonl") <(jq -c . "$T/f2.jsonl") ||
  fail "follower --since $N differs: $(diff <(jq -c "select(.seq > $N)" "$T/f1.jsonl") <(jq -c . "$T/f2.jsonl"))"

# pushed == polled
"$CBW" --json event list | jq -c '.events[] | del(.time)' > "$T/ring.jsonl"
cmp <(jq -c . "$T/f1.jsonl") "$T/ring.jsonl" ||
  fail "pushed events differ from event-list: $(diff <(jq -c . "$T/f1.jsonl") "$T/ring.jsonl")"
# `cbw events` prints the ring (one line per event), --json as pushed
expect_rc 0 "$CBW" events
[ "$(wc -l < "$T/out")" = "$(wc -l < "$T/ring.jsonl")" ] || fail "cbw events: $(cat "$T/out")"
grep -q " disk-dead  *{\"disk\":\"vda\"" "$T/out" || fail "cbw events (human): $(cat "$T/out")"
expect_rc 0 "$CBW" events --json --since "$N"
cmp <(jq -c . "$T/out") <(jq -c "select(.seq > $N)" "$T/ring.jsonl") || fail "cbw events --json --since"
expect_rc 2 "$CBW" events --since x
expect_rc 2 "$CBW" events --bogus

# cbwd stops: the followers end with status 3
stop_orchd
rc=0; wait "$F1" || rc=$?
[ "$rc" = 3 ] || fail "follower exited $rc after cbwd stopped, expected 3: $(cat "$T/f1.err")"
grep -q "event stream ended" "$T/f1.err" || fail "follower stderr: $(cat "$T/f1.err")"
rc=0; wait "$F2" || rc=$?
[ "$rc" = 3 ] || fail "second follower exited $rc"
log "OK: $(wc -l < "$T/f1.jsonl") events pushed"
